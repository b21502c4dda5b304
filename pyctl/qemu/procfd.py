"""The kvmlu objects a running QEMU holds, read from outside through pidfd_getfd(2).

A test that wants to know what QEMU's kvmlu object bound (which vCPU and
vector each binding posts, what it counted) asks the kernel, not QEMU: it
finds QEMU's ``anon_inode:[kvmlu-binding]`` and ``[kvmlu-table]`` file
descriptors in ``/proc/<pid>/fd``, duplicates each with ``pidfd_getfd()``
(Linux 5.6; needs ptrace access to QEMU, which root in the test VM has) and
issues BINDING_INFO or TABLE_INFO on the copy. The copy is closed again;
QEMU's own descriptor is not touched.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from pyctl.kvmlu import Binding, BindingInfo, Descriptor, Table, TableInfo

#: pidfd_getfd's number: the same on every architecture (the unified table).
SYS_PIDFD_GETFD = 438

BINDING_LINK = "anon_inode:[kvmlu-binding]"
TABLE_LINK = "anon_inode:[kvmlu-table]"
DEVICE_LINK = "/dev/kvmlu"

_libc = ctypes.CDLL(None, use_errno=True)


def fds_of(pid: int, link: str) -> list[int]:
    """QEMU's descriptors whose ``/proc/<pid>/fd`` link reads *link*, in order."""
    out = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(entry) == link:
                out.append(int(entry.name))
        except FileNotFoundError:
            continue  # closed while we looked
    return sorted(out)


def getfd(pid: int, fd: int) -> int:
    """A new descriptor for what descriptor *fd* of process *pid* refers to."""
    pidfd = os.pidfd_open(pid)
    try:
        copy = int(_libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
        if copy < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        return copy
    finally:
        os.close(pidfd)


def bindings(pid: int) -> list[BindingInfo]:
    """BINDING_INFO of every kvmlu binding process *pid* holds, by descriptor number."""
    out = []
    for fd in fds_of(pid, BINDING_LINK):
        try:
            copy = getfd(pid, fd)
        except OSError as e:
            if e.errno == errno.EBADF:
                continue  # QEMU closed it meanwhile
            raise
        with Binding(copy) as b:
            out.append(b.info())
    return out


def borrowed_tables(pid: int) -> Iterator[Table]:
    """Each kvmlu table process *pid* holds, as a copy of its descriptor.

    The copy is closed (and its mapping dropped) when the caller asks for
    the next table or stops iterating.
    """
    for fd in fds_of(pid, TABLE_LINK):
        copy = getfd(pid, fd)
        try:
            table = Table.from_fd(copy)
        except BaseException:
            os.close(copy)
            raise
        with table:
            yield table


def tables(pid: int) -> list[TableInfo]:
    """TABLE_INFO of every kvmlu table process *pid* holds."""
    return [table.info() for table in borrowed_tables(pid)]


def descriptors(pid: int) -> list[list[Descriptor]]:
    """Every descriptor of every kvmlu table process *pid* holds, read through a
    mapping of the table, as anyone holding the table sees them."""
    return [[t.view(i) for i in range(t.nr_vcpus)] for t in borrowed_tables(pid)]


def kvmlu_fds(pid: int) -> dict[str, int]:
    """How many descriptors of process *pid* are kvmlu's: the device, tables, bindings."""
    return {
        "device": len(fds_of(pid, DEVICE_LINK)),
        "table": len(fds_of(pid, TABLE_LINK)),
        "binding": len(fds_of(pid, BINDING_LINK)),
    }
