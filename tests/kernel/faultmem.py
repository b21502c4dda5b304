"""Ioctl arguments in memory that faults: read-only, running into a read-only or
an inaccessible page, or stalled by userfaultfd.

A kvmlu command with a reply must refuse such an argument with EFAULT before
it acts (or, stalled, act only once the reply can be written). These helpers
place the bytes of an argument where a layout says and return its address,
which :func:`pyctl.uapi.ioctl` takes as an int.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import select
import struct
from collections.abc import Iterator

PAGE = mmap.PAGESIZE
PROT_NONE = 0  # not in Python's mmap module

#: Where an argument is placed, and what the kernel can do with it:
#: ``read-only``: wholly in a read-only page (readable, not writable);
#: ``straddle-read-only``: its first 8 bytes (size and flags) in a writable
#: page, the rest in the read-only page after it; ``straddle-unmapped``: the
#: same with an inaccessible page after the first (PROT_NONE, which faults as
#: a hole does; the argument cannot even be read).
LAYOUTS = ("read-only", "straddle-read-only", "straddle-unmapped")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class Pages:
    """``n`` anonymous private pages, read-write, unmapped on close."""

    def __init__(self, n: int) -> None:
        addr = _libc.mmap(
            None,
            n * PAGE,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            -1,
            0,
        )
        if addr in (None, _MAP_FAILED):
            _check(-1, "mmap")
        assert addr is not None
        self.addr: int = addr
        self.n = n
        self.open = True

    def write(self, offset: int, data: bytes) -> None:
        ctypes.memmove(self.addr + offset, data, len(data))

    def read(self, offset: int, length: int) -> bytes:
        return ctypes.string_at(self.addr + offset, length)

    def protect(self, page: int, prot: int) -> None:
        _check(_libc.mprotect(self.addr + page * PAGE, PAGE, prot), "mprotect")

    def close(self) -> None:
        if self.open:
            _libc.munmap(self.addr, self.n * PAGE)
            self.open = False


@contextlib.contextmanager
def placed(arg: bytes, layout: str) -> Iterator[int]:
    """The address of a copy of ``arg`` laid out as ``layout`` (see :data:`LAYOUTS`)."""
    pages = Pages(2)
    try:
        if layout == "read-only":
            pages.write(0, arg)
            pages.protect(0, mmap.PROT_READ)
            yield pages.addr
        elif layout in ("straddle-read-only", "straddle-unmapped"):
            start = PAGE - 8
            pages.write(start, arg)
            # An inaccessible page rather than a hole: the process's next
            # mmap() could fill a hole before the call is made.
            pages.protect(1, mmap.PROT_READ if layout == "straddle-read-only" else PROT_NONE)
            yield pages.addr + start
        else:
            raise ValueError(f"unknown layout {layout!r}")
    finally:
        pages.close()


# userfaultfd, write-protect mode: reads go through, the first write stalls
# the writer until the page is unprotected.

_NR_USERFAULTFD = 323  # x86_64
_UFFD_API = 0xAA
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
_UFFD_EVENT_PAGEFAULT = 0x12
_UFFD_PAGEFAULT_FLAG_WP = 1 << 1


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xAA << 8) | nr


_UFFDIO_API = _iowr(0x3F, 24)
_UFFDIO_REGISTER = _iowr(0x00, 32)
_UFFDIO_WRITEPROTECT = _iowr(0x06, 24)


class StalledArg:
    """An argument in a page that is write-protected through userfaultfd.

    The kernel may read it; the first write (or writable pin) by the kernel
    stalls the calling thread until :meth:`release`. :meth:`wait_fault` waits
    for that stall and returns the faulting address.
    """

    def __init__(self, arg: bytes) -> None:
        self.pages = Pages(1)
        self.pages.write(0, arg)
        self.addr = self.pages.addr
        self.size = len(arg)
        fd = _libc.syscall(_NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            _check(-1, "userfaultfd")
        self.uffd = int(fd)
        self.protected = False
        try:
            api = bytearray(struct.pack("QQQ", _UFFD_API, 0, 0))
            fcntl.ioctl(self.uffd, _UFFDIO_API, api)
            reg = bytearray(struct.pack("QQQQ", self.addr, PAGE, _UFFDIO_REGISTER_MODE_WP, 0))
            fcntl.ioctl(self.uffd, _UFFDIO_REGISTER, reg)
            self._writeprotect(True)
        except BaseException:
            self.close()
            raise

    def _writeprotect(self, on: bool) -> None:
        mode = _UFFDIO_WRITEPROTECT_MODE_WP if on else 0
        wp = bytearray(struct.pack("QQQ", self.addr, PAGE, mode))
        fcntl.ioctl(self.uffd, _UFFDIO_WRITEPROTECT, wp)
        self.protected = on

    def wait_fault(self, timeout: float) -> int:
        """Wait until a writer stalls on the page; its faulting address."""
        p = select.poll()
        p.register(self.uffd, select.POLLIN)
        if not p.poll(int(timeout * 1000)):
            raise AssertionError(f"no write fault on the stalled page within {timeout} s")
        try:
            msg = os.read(self.uffd, 32)
        except BlockingIOError as e:
            raise AssertionError("userfaultfd was readable but held no message") from e
        event = msg[0]
        flags, address = struct.unpack_from("QQ", msg, 8)
        assert event == _UFFD_EVENT_PAGEFAULT, f"userfaultfd event {event:#x}"
        assert flags & _UFFD_PAGEFAULT_FLAG_WP, f"not a write-protect fault: flags {flags:#x}"
        return int(address)

    def release(self) -> None:
        """Unprotect the page and wake the stalled writer."""
        if self.protected:
            self._writeprotect(False)

    def read(self) -> bytes:
        return self.pages.read(0, self.size)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.release()
        os.close(self.uffd)
        self.pages.close()


def userfaultfd_available() -> bool:
    """Whether this kernel offers userfaultfd's write-protect mode on anonymous memory."""
    try:
        s = StalledArg(b"\0" * 8)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            return False
        raise
    s.close()
    return True
