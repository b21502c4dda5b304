"""The in-kernel interface between kvmlu.ko and a vAPIC module built apart from it.

A vAPIC swap loads a module built later than the running kvmlu.ko. The test
modules of kmod/test/ (never loaded by the VM runner) stand for three such
builds: one whose per-vCPU command grew past kvmlu.ko's dispatch buffer, one
built for another interface version, and a correct one (kvmlu_vapic_v3). The
first two must fail finit_module() with nothing left behind; the third loads
on the running base and takes part in a swap.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kutil import module_path

from pyctl.check import Fetch, Raise, check
from pyctl.kvmlu import Device, Table
from pyctl.swap import load_module, unload
from pyctl.vapic import VapicDevice

# Where the test modules are: test/ beside the kvmlu.ko this run loaded (the
# checkout's kmod/, or another kernel's build of the sources), or a build of
# them against other modules (KVMLU_TEST_MODULES), to run these tests on those.
TEST_MODULES = Path(os.environ.get("KVMLU_TEST_MODULES", module_path("kvmlu").parent / "test"))
V3_PARAMS = Path("/sys/module/kvmlu_vapic_v3/parameters")

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_FINIT_MODULE = 313  # x86_64


def _finit(name: str) -> int:
    """finit_module() the test module ``name``: 0, or the errno it failed with."""
    fd = os.open(TEST_MODULES / f"{name}.ko", os.O_RDONLY | os.O_CLOEXEC)
    try:
        ret = _libc.syscall(
            ctypes.c_long(_SYS_FINIT_MODULE),
            ctypes.c_int(fd),
            ctypes.c_char_p(b""),
            ctypes.c_int(0),
        )
        return 0 if ret == 0 else ctypes.get_errno()
    finally:
        os.close(fd)


def _loaded(name: str) -> bool:
    return Path("/sys/module", name).exists()


class Kmsg:
    """The kernel log records written after this object was made."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self.fd, 0, os.SEEK_END)

    def read(self) -> list[str]:
        out = []
        while True:
            try:
                rec = os.read(self.fd, 8192).decode(errors="replace")
            except BlockingIOError:
                return out
            except BrokenPipeError:  # records overwritten: go on after them
                continue
            out.append(rec.split(";", 1)[-1].split("\n", 1)[0])

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def kmsg() -> Iterator[Kmsg]:
    k = Kmsg()
    yield k
    k.close()


@pytest.fixture
def v2() -> Iterator[VapicDevice]:
    with VapicDevice(2) as d:
        yield d


def _refused(name: str) -> int:
    """Load ``name``, expected to fail; if it loads, unload it (issuing no
    ioctl) and report 0."""
    err = _finit(name)
    if err == 0:
        subprocess.run(["rmmod", name], check=True)
    return err


def _base_works(dev: Device, table: Table, v2: VapicDevice) -> None:
    """kvmlu.ko and the vAPIC that runs on it still do their work."""
    assert dev.query().nr_tables >= 1
    with v2.create(table) as va:
        table.post(2, 0x45)
        assert va.sync(2).moved == {0x45}
        assert va.ack(2) == 0x45


def test_grown_command_refused_at_load(
    dev: Device, table: Table, v2: VapicDevice, kmsg: Kmsg
) -> None:
    """A vAPIC whose per-vCPU command is larger than kvmlu.ko's dispatch buffer
    fails to load with EOVERFLOW, says which command and both sizes, and
    leaves the base as it was."""
    assert not _loaded("kvmlu_vapic_grown")
    err = _refused("kvmlu_vapic_grown")
    assert err == errno.EOVERFLOW, f"finit_module: {os.strerror(err) if err else 'loaded'}"
    assert not _loaded("kvmlu_vapic_grown")
    said = re.compile(
        r"kvmlu_vapic_grown: command 0x([0-9a-f]+) takes (\d+) bytes, this kvmlu.ko's buffer (\d+)"
    )
    lines = [m for m in map(said.search, kmsg.read()) if m]
    assert len(lines) == 1, lines
    m = lines[0]
    assert int(m[1], 16) == 0xA0 and int(m[2]) == int(m[3]) + 64
    _base_works(dev, table, v2)


def test_interface_version_skew_refused_at_load(
    dev: Device, table: Table, v2: VapicDevice, kmsg: Kmsg
) -> None:
    """A vAPIC built for another in-kernel interface version fails to load
    with EPROTO and one line naming both versions."""
    err = _refused("kvmlu_vapic_kapi_skew")
    assert err == errno.EPROTO, f"finit_module: {os.strerror(err) if err else 'loaded'}"
    assert not _loaded("kvmlu_vapic_kapi_skew")
    said = re.compile(
        r"kvmlu_vapic_kapi_skew: .*interface version (\d+), the loaded kvmlu.ko has version (\d+)"
    )
    lines = [m for m in map(said.search, kmsg.read()) if m]
    assert len(lines) == 1, lines
    m = lines[0]
    assert int(m[1]) == int(m[2]) + 1
    _base_works(dev, table, v2)


@pytest.fixture
def v3() -> Iterator[VapicDevice]:
    load_module(TEST_MODULES / "kvmlu_vapic_v3.ko", 3)
    try:
        with VapicDevice(3) as d:
            yield d
    finally:
        unload(3)


def test_successor_loads_and_swaps(table: Table, v2: VapicDevice, v3: VapicDevice) -> None:
    """A correctly built successor loads on the running base: state saved by
    v2 loads into it, PIR posted meanwhile is still there for its SYNC, and
    its state goes back to v2 in v2's format."""
    assert v3.query().version == 3
    with v2.create(table) as old:
        for vec in (0x41, 0x82, 0xC3):
            table.post(5, vec)
        old.sync(5)
        assert old.ack(5) == 0xC3
        blob = old.save()
        table.post(5, 0x64)
        with v3.create(table) as new:
            new.load(blob)
            s = new.get(5)
            assert (s.irr, s.isr) == ({0x41, 0x82}, {0xC3})
            s = new.sync(5)
            assert s.moved == {0x64} and s.irr == {0x41, 0x64, 0x82}
            assert new.eoi(5) == 0xC3
            back = new.save(2)
        old.load(back)
        s = old.get(5)
        assert (s.irr, s.isr) == ({0x41, 0x64, 0x82}, frozenset())


def test_take_pir_refuses_vcpu_beyond_table(table: Table, v3: VapicDevice) -> None:
    """kvmlu_table_take_pir() refuses a vCPU at the table's vCPU count with
    ERANGE (the test module asks for it on each SYNC), and the real SYNC
    beside it works."""
    (V3_PARAMS / "probe_bounds").write_text("1\n")
    try:
        with v3.create(table) as va:
            table.post(7, 0x50)
            assert va.sync(7).moved == {0x50}
    finally:
        (V3_PARAMS / "probe_bounds").write_text("0\n")
    assert int((V3_PARAMS / "probe_result").read_text()) == -errno.ERANGE


def test_upstream_style_load_would_lose_interrupts(
    table: Table, v2: VapicDevice, v3: VapicDevice
) -> None:
    """With PIR cleared on load (upstream KVM's LAPIC restore; the test build
    v3 with clear_pir_on_load), a vector posted while the state travels is
    lost, and the checker says so; kvmlu's load loses nothing."""
    verdicts = {}
    for clear in (False, True):
        raises, fetches = [], []
        with v2.create(table) as old:
            table.post(6, 0x61)
            raises.append(Raise(1, 6, 0x61))
            old.sync(6)
            blob = old.save()
        table.post(6, 0x62)  # posted while the state travels
        raises.append(Raise(2, 6, 0x62))
        (V3_PARAMS / "clear_pir_on_load").write_text("Y" if clear else "N")
        try:
            with v3.create(table) as new:
                new.load(blob)
                fetches.append(Fetch(3, 6, frozenset(new.sync(6).irr)))
        finally:
            (V3_PARAMS / "clear_pir_on_load").write_text("N")
        verdicts[clear] = check(raises, fetches)
    assert verdicts[False].ok, verdicts[False].text()
    assert verdicts[True].lost == 1 and verdicts[True].keys[(6, 0x62)].lost == 1
