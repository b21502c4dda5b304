"""/dev/kvmlu, object lifetime, mmap rules and module references."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import subprocess
from pathlib import Path

import pytest
from kutil import fd_count

from pyctl.kvmlu import Device
from pyctl.uapi import lib

REFCNT = Path("/sys/module/kvmlu/refcnt")


def refcnt() -> int:
    return int(REFCNT.read_text())


def test_device_node_is_root_only() -> None:
    """/dev/kvmlu is a character device with mode 0600."""
    st = os.stat("/dev/kvmlu")
    assert stat.S_ISCHR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_query(dev: Device) -> None:
    """QUERY reports the header's API version, vCPU limit and capabilities."""
    info = dev.query()
    assert info.api_version == lib.KVMLU_API_VERSION
    assert info.max_vcpus == lib.KVMLU_MAX_VCPUS == 1024
    assert info.capabilities & lib.KVMLU_CAP_TABLES
    assert info.capabilities & lib.KVMLU_CAP_BINDINGS


def test_query_counts_tables(dev: Device) -> None:
    """nr_tables follows creation and close."""
    base = dev.query().nr_tables
    with dev.create_table(2), dev.create_table(3):
        assert dev.query().nr_tables == base + 2
    assert dev.query().nr_tables == base


def test_query_counters_survive_table_close(dev: Device) -> None:
    """QUERY's counters include tables already closed; bindings are counted while alive."""
    before = dev.query()
    src = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        with dev.create_table(2) as t:
            t.post(0, 0x40)
            t.post(0, 0x40)
            with t.bind(src, 1, 0x41):
                assert dev.query().nr_bindings == before.nr_bindings + 1
                os.eventfd_write(src, 1)
        after = dev.query()
    finally:
        os.close(src)
    assert after.nr_bindings == before.nr_bindings
    assert after.stats.signals - before.stats.signals == 3
    assert after.stats.posted - before.stats.posted == 2
    assert after.stats.coalesced - before.stats.coalesced == 1
    assert after.stats.notified - before.stats.notified == 2


def test_table_fd_is_cloexec(dev: Device) -> None:
    """A table fd is created with O_CLOEXEC."""
    with dev.create_table(1) as t:
        assert fcntl.fcntl(t.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_table_outlives_device_fd() -> None:
    """A table keeps working after /dev/kvmlu is closed."""
    d = Device()
    t = d.create_table(2)
    d.close()
    try:
        t.post(1, 0x55)
        assert t.fetch(1) == {0x55}
    finally:
        t.close()


def test_create_close_loop_leaks_nothing(dev: Device) -> None:
    """10,000 create/close cycles leave the fd count and table count where they were."""
    fds, tables = fd_count(), dev.query().nr_tables
    for i in range(10_000):
        with dev.create_table(1 + i % 16) as t:
            if i % 1000 == 0:
                t.post(0, 0x40)
    assert fd_count() == fds
    assert dev.query().nr_tables == tables


def test_objects_hold_module_references(dev: Device) -> None:
    """Each table fd and each mapping holds a reference on kvmlu.ko."""
    base = refcnt()
    t = dev.create_table(4)
    assert refcnt() == base + 1
    m = mmap.mmap(t.fd, t.map_size, mmap.MAP_SHARED, mmap.PROT_READ)
    fd = t.fd
    t._fd = None  # close the fd behind the Table's back; the mapping stays
    os.close(fd)
    assert refcnt() == base + 1, "the mapping keeps the table and the module"
    m.close()
    assert refcnt() == base


def test_unload_refused_while_a_table_exists(dev: Device) -> None:
    """rmmod kvmlu fails with 'in use' while an object exists and the device keeps working."""
    with dev.create_table(2) as t:
        t.post(0, 0x40)
        r = subprocess.run(["rmmod", "kvmlu"], capture_output=True, text=True, check=False)
        assert r.returncode != 0, "rmmod succeeded with a live table"
        assert "in use" in r.stderr, r.stderr
        assert t.fetch(0) == {0x40}
        assert dev.query().api_version == lib.KVMLU_API_VERSION


def test_mmap_read_only_view(dev: Device) -> None:
    """A shared read-only mapping works; mprotect() makes it neither writable nor executable."""
    import ctypes

    with dev.create_table(8) as t:
        t.post(0, 0x40)
        assert t.pir(0) == {0x40}
        m = mmap.mmap(t.fd, t.map_size, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            mprotect = libc.mprotect
            mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            for prot in (mmap.PROT_WRITE, mmap.PROT_EXEC):
                rc = mprotect(_mmap_address(m), t.map_size, mmap.PROT_READ | prot)
                assert rc == -1
                assert ctypes.get_errno() == errno.EACCES
            assert t.pir(0) == {0x40}
        finally:
            m.close()


def _mmap_address(m: mmap.mmap) -> int:
    """The address of a read-only mmap object, through the buffer protocol."""
    from pyctl.uapi import ffi

    p = ffi.from_buffer(m)
    try:
        return int(ffi.cast("uintptr_t", p))
    finally:
        ffi.release(p)


def test_mmap_writable_refused(dev: Device) -> None:
    """A writable shared mapping is refused with EACCES."""
    with dev.create_table(8) as t:
        with pytest.raises(PermissionError) as ei:
            mmap.mmap(t.fd, t.map_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        assert ei.value.errno == errno.EACCES


def _anon_inode_exec_refused() -> bool:
    """Does this kernel refuse executable mappings of anonymous-inode files
    itself (EPERM, before the file's own mmap is asked)? An eventfd, which
    has no mmap at all, tells: EPERM if so, ENODEV if not."""
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        mmap.mmap(efd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_EXEC)
    except OSError as e:
        assert e.errno in (errno.EPERM, errno.ENODEV), e
        return e.errno == errno.EPERM
    finally:
        os.close(efd)
    raise AssertionError("an eventfd was mapped")


def test_mmap_executable_refused(dev: Device) -> None:
    """An executable shared mapping is refused: EACCES from kvmlu, or EPERM
    from a kernel that refuses it for every anonymous-inode file first."""
    want = errno.EPERM if _anon_inode_exec_refused() else errno.EACCES
    with dev.create_table(8) as t:
        with pytest.raises(PermissionError) as ei:
            mmap.mmap(t.fd, t.map_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_EXEC)
        assert ei.value.errno == want


def test_mmap_every_page_of_the_largest_table(dev: Device) -> None:
    """A whole mapping of a many-page table shows each page's own descriptors.

    The descriptors live in pages that need not be contiguous; each page of
    the mapping must be the right one.
    """
    nr = dev.query().max_vcpus
    per_page = mmap.PAGESIZE // 64
    with dev.create_table(nr) as t:
        assert t.map_size == nr * 64 > mmap.PAGESIZE
        # A different vCPU and vector on each page: vCPU k*per_page + k % per_page.
        posts = {
            page * per_page + page % per_page: 32 + page % 224
            for page in range(t.map_size // mmap.PAGESIZE)
        }
        for vcpu, vector in posts.items():
            t.post(vcpu, vector)
        with mmap.mmap(t.fd, t.map_size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            for vcpu in range(nr):
                pir = int.from_bytes(m[vcpu * 64 : vcpu * 64 + 32], "little")
                want = 1 << posts[vcpu] if vcpu in posts else 0
                assert pir == want, f"vCPU {vcpu}: PIR {pir:#x}, want {want:#x}"


def test_mmap_private_refused(dev: Device) -> None:
    """A private mapping is refused with EINVAL (it would not be a live view)."""
    with dev.create_table(8) as t, pytest.raises(OSError) as ei:
        mmap.mmap(t.fd, t.map_size, mmap.MAP_PRIVATE, mmap.PROT_READ)
    assert ei.value.errno == errno.EINVAL


@pytest.mark.parametrize("pages,offset_pages", [(2, 0), (1, 1), (1, 16)])
def test_mmap_beyond_table_refused(dev: Device, pages: int, offset_pages: int) -> None:
    """A mapping longer than the table, or starting past it, is refused with EINVAL."""
    with dev.create_table(8) as t:  # 512 bytes: one page
        with pytest.raises(OSError) as ei:
            mmap.mmap(
                t.fd,
                pages * mmap.PAGESIZE,
                mmap.MAP_SHARED,
                mmap.PROT_READ,
                offset=offset_pages * mmap.PAGESIZE,
            )
        assert ei.value.errno == errno.EINVAL


def test_mmap_second_page_of_large_table(dev: Device) -> None:
    """An offset mapping shows the descriptors of that page."""
    with dev.create_table(128) as t:  # 8 KiB: two pages
        t.post(64, 0x77)  # first descriptor of the second page
        with mmap.mmap(
            t.fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ, offset=mmap.PAGESIZE
        ) as m:
            assert int.from_bytes(m[8:16], "little") == 1 << (0x77 - 64)
