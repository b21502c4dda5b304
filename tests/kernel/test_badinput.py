"""Bad input: every validation failure of every ioctl gets its errno and changes nothing.

Each test issues one malformed call through the raw ioctl path and then checks
that every descriptor (through the mapping), the table count, the process's
fds and the notification eventfd are exactly as before.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kutil import eventfd_count, fd_count, raw_arg, snapshot

from pyctl.errors import KvmluError
from pyctl.kvmlu import Device, PostResult, Table
from pyctl.uapi import ffi, ioctl, lib

EFD = object()  # stands for the fixture's notification eventfd in a field list


@dataclass
class Cmd:
    """One ioctl, with a valid argument that would change state if it ran."""

    name: str
    request: int
    struct: str
    on: str  # "dev" or "table"
    fields: dict[str, Any] = field(default_factory=dict)
    reserved: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return self.name


CMDS = [
    Cmd("QUERY", lib.KVMLU_QUERY, "kvmlu_query", "dev"),
    Cmd("CREATE_TABLE", lib.KVMLU_CREATE_TABLE, "kvmlu_create_table", "dev", {"nr_vcpus": 4}),
    Cmd(
        "SET_NOTIFY",
        lib.KVMLU_TABLE_SET_NOTIFY,
        "kvmlu_table_set_notify",
        "table",
        {"vcpu": 1, "eventfd": -1, "nv": 0x55, "ndst": 9},
    ),
    Cmd(
        "SET_SN",
        lib.KVMLU_TABLE_SET_SN,
        "kvmlu_table_set_sn",
        "table",
        {"vcpu": 1, "suppress": 1},
    ),
    Cmd("PEEK", lib.KVMLU_TABLE_PEEK, "kvmlu_table_peek", "table", {"vcpu": 1}, ("reserved",)),
    Cmd("FETCH", lib.KVMLU_TABLE_FETCH, "kvmlu_table_fetch", "table", {"vcpu": 1}, ("reserved",)),
    Cmd(
        "POST",
        lib.KVMLU_TABLE_POST,
        "kvmlu_table_post",
        "table",
        {"vcpu": 1, "vector": 0x66},
        ("reserved",),
    ),
]

#: The smallest size each structure accepts: the whole v1 structure.
MIN_SIZES = {
    "kvmlu_query": 32,
    "kvmlu_create_table": 16,
    "kvmlu_table_set_notify": 24,
    "kvmlu_table_set_sn": 16,
    "kvmlu_table_peek": 80,
    "kvmlu_table_fetch": 48,
    "kvmlu_table_post": 24,
}


class Env:
    """A device and a table whose vCPU 1 has a target, NV 0x40 and vector 0x50 pending."""

    def __init__(self, dev: Device, table: Table, efd: int) -> None:
        self.dev, self.table, self.efd = dev, table, efd
        table.set_notify(1, efd, nv=0x40, ndst=1)
        table.post(1, 0x50)
        eventfd_count(efd)

    def fd_for(self, cmd: Cmd) -> int:
        return self.dev.fd if cmd.on == "dev" else self.table.fd

    def state(self) -> tuple[Any, ...]:
        return (snapshot(self.table), self.dev.query().nr_tables, fd_count())

    def refused(self, fd: int, request: int, arg: Any, err: int) -> None:
        """Issue the call, expect ``err``, and check that nothing changed."""
        before = self.state()
        with pytest.raises(KvmluError) as ei:
            ioctl(fd, request, arg)
        assert ei.value.errno == err, f"{os.strerror(ei.value.errno)} != {os.strerror(err)}"
        assert self.state() == before, "a refused call changed the table"
        assert eventfd_count(self.efd) == 0, "a refused call signalled the target"

    def target_intact(self) -> None:
        """vCPU 1 still signals the fixture's eventfd with NV 0x40."""
        assert self.table.view(1).nv == 0x40
        self.table.fetch(1)
        assert self.table.post(1, 0x51) == PostResult.NOTIFIED
        assert eventfd_count(self.efd) == 1


@pytest.fixture
def env(dev: Device, table: Table, efd: int) -> Iterator[Env]:
    yield Env(dev, table, efd)


def arg_for(cmd: Cmd, **over: int) -> bytearray:
    return raw_arg(cmd.struct, **{**cmd.fields, **over})


def test_min_sizes_match_structures() -> None:
    """Every v1 structure is mandatory to its end and padded to 8 bytes."""
    for struct, size in MIN_SIZES.items():
        assert ffi.sizeof(f"struct {struct}") == size, struct
        assert size % 8 == 0, struct


# Checks every command gets.


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
@pytest.mark.parametrize("size", [0, 4, -1], ids=["zero", "four", "min-1"])
def test_size_below_minimum(env: Env, cmd: Cmd, size: int) -> None:
    """A size below the structure's minimum is EINVAL."""
    if size < 0:
        size = MIN_SIZES[cmd.struct] + size
    env.refused(env.fd_for(cmd), cmd.request, arg_for(cmd, size=size), errno.EINVAL)


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
@pytest.mark.parametrize("tail", [b"\0" * 7 + b"\1", b"\1" + b"\0" * 63], ids=["last", "first"])
def test_nonzero_tail(env: Env, cmd: Cmd, tail: bytes) -> None:
    """Bytes beyond the kernel's structure that are not zero give E2BIG."""
    arg = raw_arg(cmd.struct, tail=tail, **cmd.fields)
    env.refused(env.fd_for(cmd), cmd.request, arg, errno.E2BIG)


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
def test_zero_tail_accepted(env: Env, cmd: Cmd) -> None:
    """A larger structure whose extra bytes are zero is accepted (forward compatibility)."""
    arg = raw_arg(cmd.struct, tail=b"\0" * 24, **cmd.fields)
    ioctl(env.fd_for(cmd), cmd.request, arg)
    if cmd.name == "CREATE_TABLE":
        new_fd = int.from_bytes(arg[12:16], "little", signed=True)
        assert new_fd >= 0
        os.close(new_fd)


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
@pytest.mark.parametrize("flags", [1, 1 << 31])
def test_unknown_flags(env: Env, cmd: Cmd, flags: int) -> None:
    """Any flag is unknown in API version 1: EINVAL."""
    env.refused(env.fd_for(cmd), cmd.request, arg_for(cmd, flags=flags), errno.EINVAL)


@pytest.mark.parametrize(
    "cmd,name",
    [(c, r) for c in CMDS for r in c.reserved],
    ids=lambda x: x if isinstance(x, str) else repr(x),
)
def test_reserved_nonzero(env: Env, cmd: Cmd, name: str) -> None:
    """A non-zero reserved field is EINVAL."""
    env.refused(env.fd_for(cmd), cmd.request, arg_for(cmd, **{name: 1}), errno.EINVAL)


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
def test_command_on_wrong_file(env: Env, cmd: Cmd) -> None:
    """A device command on a table fd, or a table command on /dev/kvmlu, is ENOTTY."""
    other = env.table.fd if cmd.on == "dev" else env.dev.fd
    env.refused(other, cmd.request, arg_for(cmd), errno.ENOTTY)


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
def test_bad_pointer(env: Env, cmd: Cmd) -> None:
    """An unreadable argument pointer is EFAULT."""
    env.refused(env.fd_for(cmd), cmd.request, ffi.cast("void *", 8), errno.EFAULT)


@pytest.mark.parametrize("on", ["dev", "table"])
@pytest.mark.parametrize("nr", [0x02, 0x1F, 0x25, 0x3F, 0xFF])
def test_unknown_command(env: Env, on: str, nr: int) -> None:
    """An unknown command number is ENOTTY."""
    fd = env.dev.fd if on == "dev" else env.table.fd
    request = (lib.KVMLU_IOCTL_TYPE << 8) | nr
    env.refused(fd, request, raw_arg("kvmlu_table_peek", vcpu=1), errno.ENOTTY)


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
def test_request_with_size_or_direction_bits(env: Env, cmd: Cmd) -> None:
    """The size travels in the structure: a request with _IOC size/direction bits is ENOTTY."""
    size = ffi.sizeof(f"struct {cmd.struct}")
    request = cmd.request | (3 << 30) | (size << 16)
    env.refused(env.fd_for(cmd), request, arg_for(cmd), errno.ENOTTY)


def test_wrong_ioctl_type(env: Env) -> None:
    """A request of another ioctl type with a kvmlu command number is ENOTTY."""
    request = ((lib.KVMLU_IOCTL_TYPE + 1) << 8) | lib.KVMLU_CMD_QUERY
    env.refused(env.dev.fd, request, raw_arg("kvmlu_query"), errno.ENOTTY)


# Range and fd checks, command by command.


@pytest.mark.parametrize("nr", [0, 1025, 0xFFFFFFFF])
def test_create_table_vcpu_count_out_of_range(env: Env, nr: int) -> None:
    """A table of 0 or more than 1024 vCPUs is ERANGE and creates nothing."""
    cmd = CMDS[1]
    env.refused(env.dev.fd, cmd.request, arg_for(cmd, nr_vcpus=nr), errno.ERANGE)


TABLE_CMDS = [c for c in CMDS if c.on == "table"]


@pytest.mark.parametrize("cmd", TABLE_CMDS, ids=repr)
@pytest.mark.parametrize("vcpu", [8, 1024, 0xFFFFFFFF])
def test_vcpu_out_of_range(env: Env, cmd: Cmd, vcpu: int) -> None:
    """A vCPU index at or past the table's count is ERANGE."""
    env.refused(env.table.fd, cmd.request, arg_for(cmd, vcpu=vcpu), errno.ERANGE)


@pytest.mark.parametrize("vector", [0, 1, 31, 256, 0xFFFFFFFF])
def test_post_vector_out_of_range(env: Env, vector: int) -> None:
    """Vectors 0..31 (exceptions) and above 255 are ERANGE."""
    cmd = CMDS[6]
    env.refused(env.table.fd, cmd.request, arg_for(cmd, vector=vector), errno.ERANGE)


@pytest.mark.parametrize("vector", [32, 255])
def test_post_vector_bounds_accepted(env: Env, vector: int) -> None:
    """32 and 255 are the first and last vectors that post."""
    env.table.post(3, vector)
    assert env.table.pir(3) == {vector}


@pytest.mark.parametrize("nv", [0, 31, 256, 0xFFFFFFFF])
def test_set_notify_nv_out_of_range(env: Env, nv: int) -> None:
    """A notification vector outside 32..255 is ERANGE; the old target stays."""
    cmd = CMDS[2]
    env.refused(env.table.fd, cmd.request, arg_for(cmd, nv=nv), errno.ERANGE)
    env.target_intact()


def test_set_sn_value_out_of_set(env: Env) -> None:
    """suppress is 0 or 1; 2 is EINVAL."""
    cmd = CMDS[3]
    env.refused(env.table.fd, cmd.request, arg_for(cmd, suppress=2), errno.EINVAL)


def _closed_fd() -> int:
    """An fd number that was an eventfd and is closed; high, so nothing reuses it meanwhile."""
    fd = os.eventfd(0)
    high = os.dup2(fd, 900)
    os.close(fd)
    os.close(high)
    return high


@pytest.mark.parametrize("fd", [-2, -100, 0x7FFFFFFF], ids=["-2", "-100", "huge"])
def test_set_notify_fd_not_open(env: Env, fd: int) -> None:
    """An eventfd field that names no open file is EBADF; the old target stays."""
    cmd = CMDS[2]
    env.refused(env.table.fd, cmd.request, arg_for(cmd, eventfd=fd), errno.EBADF)
    env.target_intact()


def test_set_notify_closed_fd(env: Env) -> None:
    """A just-closed fd is EBADF."""
    cmd = CMDS[2]
    env.refused(env.table.fd, cmd.request, arg_for(cmd, eventfd=_closed_fd()), errno.EBADF)
    env.target_intact()


@pytest.mark.parametrize("kind", ["table", "device", "pipe", "file", "socket"])
def test_set_notify_fd_not_an_eventfd(env: Env, kind: str) -> None:
    """A table fd, /dev/kvmlu, a pipe, a regular file or a socket is not an eventfd: EINVAL."""
    cmd = CMDS[2]
    opened: list[int] = []
    if kind == "table":
        fd = env.table.fd
    elif kind == "device":
        fd = env.dev.fd
    elif kind == "pipe":
        r, w = os.pipe()
        opened += [r, w]
        fd = r
    elif kind == "file":
        opened.append(os.open("/proc/version", os.O_RDONLY | os.O_CLOEXEC))
        fd = opened[-1]
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        opened.append(s.detach())
        fd = opened[-1]
    try:
        env.refused(env.table.fd, cmd.request, arg_for(cmd, eventfd=fd), errno.EINVAL)
    finally:
        for o in opened:
            os.close(o)
    env.target_intact()
