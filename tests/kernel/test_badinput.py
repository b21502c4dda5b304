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
from kutil import eventfd_count, fd_count, module_param, raw_arg, snapshot

from pyctl.errors import KvmluError
from pyctl.kvmlu import Device, PostResult, Session, Table
from pyctl.uapi import ffi, ioctl, lib
from pyctl.vapic import VapicDevice

SRC = -1000  # in a field list: stands for the eventfd a BIND would consume
TABLE = -1001  # the fixture's table fd
SAVE_BUF, SAVE_LEN = -1002, -1003  # a buffer a vAPIC blob fits in
BLOB_BUF, BLOB_LEN = -1004, -1005  # a valid vAPIC blob


@dataclass
class Cmd:
    """One ioctl, with a valid argument that would change state if it ran."""

    name: str
    request: int
    struct: str
    on: str  # "dev", "table", "binding" or "session"
    fields: dict[str, Any] = field(default_factory=dict)
    reserved: tuple[str, ...] = ()
    known_flags: int = 0

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
        known_flags=lib.KVMLU_SET_NOTIFY_FLAGS,
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
    Cmd(
        "BIND",
        lib.KVMLU_TABLE_BIND,
        "kvmlu_table_bind",
        "table",
        {"eventfd": SRC, "vcpu": 1, "vector": 0x67},
    ),
    Cmd("TABLE_INFO", lib.KVMLU_TABLE_INFO, "kvmlu_table_info", "table"),
    Cmd("BINDING_INFO", lib.KVMLU_BINDING_INFO, "kvmlu_binding_info", "binding"),
    Cmd(
        "CREATE_SESSION",
        lib.KVMLU_CREATE_SESSION,
        "kvmlu_session_create",
        "dev",
        {"name": b"badinput-new"},
        ("reserved",),
    ),
    Cmd(
        "RETRIEVE_SESSION",
        lib.KVMLU_RETRIEVE_SESSION,
        "kvmlu_session_create",
        "dev",
        {"name": b"badinput-parked"},
        ("reserved",),
    ),
    Cmd("LIST_SESSIONS", lib.KVMLU_LIST_SESSIONS, "kvmlu_list_sessions", "dev"),
    Cmd(
        "PRESERVE",
        lib.KVMLU_SESSION_PRESERVE,
        "kvmlu_session_preserve",
        "session",
        {"fd": SRC, "token": 77},
        ("reserved",),
    ),
    Cmd(
        "RETRIEVE",
        lib.KVMLU_SESSION_RETRIEVE,
        "kvmlu_session_token",
        "session",
        {"token": 1},
        ("reserved",),
    ),
    Cmd(
        "UNPRESERVE",
        lib.KVMLU_SESSION_UNPRESERVE,
        "kvmlu_session_token",
        "session",
        {"token": 1},
        ("reserved", "fd"),
    ),
    Cmd("FINISH", lib.KVMLU_SESSION_FINISH, "kvmlu_session_finish", "session"),
    Cmd("VAPIC_QUERY", lib.KVMLU_VAPIC_QUERY, "kvmlu_vapic_query", "vapicdev"),
    Cmd(
        "CREATE_VAPIC",
        lib.KVMLU_CREATE_VAPIC,
        "kvmlu_create_vapic",
        "vapicdev",
        {"table_fd": TABLE},
    ),
    *[
        Cmd(name, getattr(lib, f"KVMLU_{name}"), "kvmlu_vapic_vcpu", "vapic", {"vcpu": 1})
        for name in ("VAPIC_SYNC", "VAPIC_ACK", "VAPIC_EOI", "VAPIC_GET")
    ],
    Cmd(
        "VAPIC_SAVE",
        lib.KVMLU_VAPIC_SAVE,
        "kvmlu_vapic_save",
        "vapic",
        {"buf": SAVE_BUF, "buf_len": SAVE_LEN},
        ("reserved",),
    ),
    Cmd(
        "VAPIC_LOAD",
        lib.KVMLU_VAPIC_LOAD,
        "kvmlu_vapic_load",
        "vapic",
        {"buf": BLOB_BUF, "buf_len": BLOB_LEN},
        ("reserved",),
    ),
]
BY_NAME = {c.name: c for c in CMDS}

#: The smallest size each structure accepts: the whole v1 structure.
MIN_SIZES = {
    "kvmlu_query": 88,
    "kvmlu_table_bind": 24,
    "kvmlu_table_info": 56,
    "kvmlu_binding_info": 64,
    "kvmlu_session_create": 80,
    "kvmlu_list_sessions": 24,
    "kvmlu_session_preserve": 24,
    "kvmlu_session_token": 24,
    "kvmlu_session_finish": 8,
    "kvmlu_vapic_query": 24,
    "kvmlu_create_vapic": 16,
    "kvmlu_vapic_vcpu": 144,
    "kvmlu_vapic_save": 32,
    "kvmlu_vapic_load": 24,
    "kvmlu_create_table": 16,
    "kvmlu_table_set_notify": 24,
    "kvmlu_table_set_sn": 16,
    "kvmlu_table_peek": 80,
    "kvmlu_table_fetch": 48,
    "kvmlu_table_post": 24,
}


class Env:
    """A device; a table whose vCPU 1 has a target, NV 0x40 and vector 0x50 pending; a
    binding on vCPU 2; and an unbound eventfd ``src`` for BIND."""

    def __init__(self, dev: Device, table: Table, efd: int) -> None:
        self.dev, self.table, self.efd = dev, table, efd
        table.set_notify(1, efd, nv=0x40, ndst=1)
        table.post(1, 0x50)
        eventfd_count(efd)
        self.src = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.bound_src = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.binding = table.bind(self.bound_src, 2, 0x52)
        self.session = dev.create_session("badinput")
        self.session.preserve(table.fd, 1)
        dev.create_session("badinput-parked").close()
        self.vapicdev = VapicDevice(2)
        self.vapic = self.vapicdev.create(table)
        table.post(1, 0x5B)
        self.vapic.sync(1)  # IRR: 0x50, 0x5B
        self.vapic.ack(1)
        self.blob = self.vapic.save()
        self.blob_buf = ffi.from_buffer(self.blob)
        self.save_buf = ffi.new("char[]", len(self.blob) + 64)

    def close(self) -> None:
        self.vapic.close()
        self.vapicdev.close()
        self.binding.close()
        os.close(self.src)
        os.close(self.bound_src)
        self.session.finish()
        self.session.close()
        for e in self.dev.list_sessions():
            with self.dev.retrieve_session(e.name) as s:
                s.finish()

    @property
    def fds(self) -> dict[str, int]:
        return {
            "dev": self.dev.fd,
            "table": self.table.fd,
            "binding": self.binding.fd,
            "session": self.session.fd,
            "vapicdev": self.vapicdev.fd,
            "vapic": self.vapic.fd,
        }

    def fd_for(self, cmd: Cmd) -> int:
        return self.fds[cmd.on]

    def arg(self, cmd: Cmd, **over: int) -> bytearray:
        fields = {**cmd.fields, **over}
        stand_ins = {
            SRC: self.src,
            TABLE: self.table.fd,
            SAVE_BUF: int(ffi.cast("uintptr_t", self.save_buf)),
            SAVE_LEN: len(self.save_buf),
            BLOB_BUF: int(ffi.cast("uintptr_t", self.blob_buf)),
            BLOB_LEN: len(self.blob),
        }
        for key, value in fields.items():
            if isinstance(value, int) and value in stand_ins:
                fields[key] = stand_ins[value]
        return raw_arg(cmd.struct, **fields)

    def state(self) -> tuple[Any, ...]:
        return (
            snapshot(self.table),
            self.dev.query(),
            self.table.info(),
            self.binding.info(),
            self.dev.list_sessions(),
            [self.vapic.get(v) for v in range(self.table.nr_vcpus)],
            fd_count(),
        )

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
    e = Env(dev, table, efd)
    yield e
    e.close()


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
    env.refused(env.fd_for(cmd), cmd.request, env.arg(cmd, size=size), errno.EINVAL)


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
@pytest.mark.parametrize("tail", [b"\0" * 7 + b"\1", b"\1" + b"\0" * 63], ids=["last", "first"])
def test_nonzero_tail(env: Env, cmd: Cmd, tail: bytes) -> None:
    """Bytes beyond the kernel's structure that are not zero give E2BIG."""
    arg = env.arg(cmd) + tail
    arg[0:4] = len(arg).to_bytes(4, "little")
    env.refused(env.fd_for(cmd), cmd.request, arg, errno.E2BIG)


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
def test_zero_tail_accepted(env: Env, cmd: Cmd) -> None:
    """A larger structure whose extra bytes are zero is accepted (forward compatibility)."""
    arg = env.arg(cmd) + b"\0" * 24
    arg[0:4] = len(arg).to_bytes(4, "little")
    ioctl(env.fd_for(cmd), cmd.request, arg)
    fd_offset = {
        "CREATE_TABLE": 12,
        "BIND": 20,
        "CREATE_SESSION": 72,
        "RETRIEVE_SESSION": 72,
        "RETRIEVE": 16,
        "CREATE_VAPIC": 12,
    }.get(cmd.name)
    if fd_offset is not None:
        new_fd = int.from_bytes(arg[fd_offset : fd_offset + 4], "little", signed=True)
        assert new_fd >= 0
        if cmd.name.endswith("_SESSION"):
            with Session(new_fd, "") as s:
                s.finish()
        else:
            os.close(new_fd)


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
@pytest.mark.parametrize("which", ["lowest", "highest"])
def test_unknown_flags(env: Env, cmd: Cmd, which: str) -> None:
    """A flag the command does not define is EINVAL."""
    unknown = ~cmd.known_flags & 0xFFFFFFFF
    flags = unknown & -unknown if which == "lowest" else 1 << 31
    env.refused(env.fd_for(cmd), cmd.request, env.arg(cmd, flags=flags), errno.EINVAL)


@pytest.mark.parametrize(
    "cmd,name",
    [(c, r) for c in CMDS for r in c.reserved],
    ids=lambda x: x if isinstance(x, str) else repr(x),
)
def test_reserved_nonzero(env: Env, cmd: Cmd, name: str) -> None:
    """A non-zero reserved field is EINVAL."""
    env.refused(env.fd_for(cmd), cmd.request, env.arg(cmd, **{name: 1}), errno.EINVAL)


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
def test_command_on_wrong_file(env: Env, cmd: Cmd) -> None:
    """A command on any other kind of kvmlu fd than its own is ENOTTY."""
    for on, fd in env.fds.items():
        if on != cmd.on:
            env.refused(fd, cmd.request, env.arg(cmd), errno.ENOTTY)


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
def test_bad_pointer(env: Env, cmd: Cmd) -> None:
    """An unreadable argument pointer is EFAULT."""
    env.refused(env.fd_for(cmd), cmd.request, ffi.cast("void *", 8), errno.EFAULT)


@pytest.mark.parametrize("on", ["dev", "table", "binding", "session", "vapicdev", "vapic"])
@pytest.mark.parametrize("nr", [0x05, 0x1F, 0x27, 0x3F, 0x41, 0x64, 0x82, 0xA6, 0xFF])
def test_unknown_command(env: Env, on: str, nr: int) -> None:
    """An unknown command number is ENOTTY."""
    fd = env.fds[on]
    request = (lib.KVMLU_IOCTL_TYPE << 8) | nr
    env.refused(fd, request, raw_arg("kvmlu_table_peek", vcpu=1), errno.ENOTTY)


@pytest.mark.parametrize("cmd", CMDS, ids=repr)
def test_request_with_size_or_direction_bits(env: Env, cmd: Cmd) -> None:
    """The size travels in the structure: a request with _IOC size/direction bits is ENOTTY."""
    size = ffi.sizeof(f"struct {cmd.struct}")
    request = cmd.request | (3 << 30) | (size << 16)
    env.refused(env.fd_for(cmd), request, env.arg(cmd), errno.ENOTTY)


def test_wrong_ioctl_type(env: Env) -> None:
    """A request of another ioctl type with a kvmlu command number is ENOTTY."""
    request = ((lib.KVMLU_IOCTL_TYPE + 1) << 8) | lib.KVMLU_CMD_QUERY
    env.refused(env.dev.fd, request, raw_arg("kvmlu_query"), errno.ENOTTY)


# Range and fd checks, command by command.


@pytest.mark.parametrize("nr", [0, 1025, 0xFFFFFFFF])
def test_create_table_vcpu_count_out_of_range(env: Env, nr: int) -> None:
    """A table of 0 or more than 1024 vCPUs is ERANGE and creates nothing."""
    cmd = BY_NAME["CREATE_TABLE"]
    env.refused(env.dev.fd, cmd.request, env.arg(cmd, nr_vcpus=nr), errno.ERANGE)


TABLE_CMDS = [c for c in CMDS if "vcpu" in c.fields]


@pytest.mark.parametrize("cmd", TABLE_CMDS, ids=repr)
@pytest.mark.parametrize("vcpu", [8, 1024, 0xFFFFFFFF])
def test_vcpu_out_of_range(env: Env, cmd: Cmd, vcpu: int) -> None:
    """A vCPU index at or past the table's count is ERANGE."""
    env.refused(env.fd_for(cmd), cmd.request, env.arg(cmd, vcpu=vcpu), errno.ERANGE)


@pytest.mark.parametrize("name", ["POST", "BIND"])
@pytest.mark.parametrize("vector", [0, 1, 31, 256, 0xFFFFFFFF])
def test_vector_out_of_range(env: Env, name: str, vector: int) -> None:
    """Vectors 0..31 (exceptions) and above 255 are ERANGE."""
    cmd = BY_NAME[name]
    env.refused(env.table.fd, cmd.request, env.arg(cmd, vector=vector), errno.ERANGE)


@pytest.mark.parametrize("vector", [32, 255])
def test_post_vector_bounds_accepted(env: Env, vector: int) -> None:
    """32 and 255 are the first and last vectors that post."""
    env.table.post(3, vector)
    assert env.table.pir(3) == {vector}


@pytest.mark.parametrize("nv", [0, 31, 256, 0xFFFFFFFF])
def test_set_notify_nv_out_of_range(env: Env, nv: int) -> None:
    """A notification vector outside 32..255 is ERANGE; the old target stays."""
    cmd = BY_NAME["SET_NOTIFY"]
    env.refused(env.table.fd, cmd.request, env.arg(cmd, nv=nv), errno.ERANGE)
    env.target_intact()


def test_set_sn_value_out_of_set(env: Env) -> None:
    """suppress is 0 or 1; 2 is EINVAL."""
    cmd = BY_NAME["SET_SN"]
    env.refused(env.table.fd, cmd.request, env.arg(cmd, suppress=2), errno.EINVAL)


def _closed_fd() -> int:
    """An fd number that was an eventfd and is closed; high, so nothing reuses it meanwhile."""
    fd = os.eventfd(0)
    high = os.dup2(fd, 900)
    os.close(fd)
    os.close(high)
    return high


FD_CMDS = ["SET_NOTIFY", "BIND"]  # their fd must be an eventfd


@pytest.mark.parametrize("fd", [-1, -2, 0x7FFFFFFF], ids=["-1", "-2", "huge"])
def test_preserve_fd_not_open(env: Env, fd: int) -> None:
    """PRESERVE of an fd that names no open file is EBADF."""
    cmd = BY_NAME["PRESERVE"]
    env.refused(env.session.fd, cmd.request, env.arg(cmd, fd=fd), errno.EBADF)


@pytest.mark.parametrize("kind", ["session", "socket", "epoll"])
def test_preserve_type_refused(env: Env, kind: str) -> None:
    """PRESERVE of a file that can hold other files is EOPNOTSUPP."""
    import select

    cmd = BY_NAME["PRESERVE"]
    if kind == "session":
        env.refused(env.session.fd, cmd.request, env.arg(cmd, fd=env.session.fd), errno.EOPNOTSUPP)
        return
    obj = socket.socket(socket.AF_UNIX) if kind == "socket" else select.epoll()
    with obj:
        arg = env.arg(cmd, fd=obj.fileno())
        env.refused(env.session.fd, cmd.request, arg, errno.EOPNOTSUPP)


def test_preserve_token_taken(env: Env) -> None:
    cmd = BY_NAME["PRESERVE"]
    env.refused(env.session.fd, cmd.request, env.arg(cmd, token=1), errno.EEXIST)


def test_preserve_file_preserved_already(env: Env) -> None:
    """PRESERVE of a file a session holds already (the table, under token 1) is EALREADY."""
    cmd = BY_NAME["PRESERVE"]
    arg = env.arg(cmd, fd=env.table.fd, token=2)
    env.refused(env.session.fd, cmd.request, arg, errno.EALREADY)


def test_preserve_session_full(env: Env) -> None:
    """PRESERVE into a session at max_objects_per_session is ENOSPC."""
    cmd = BY_NAME["PRESERVE"]
    with module_param("max_objects_per_session", 1):
        env.refused(env.session.fd, cmd.request, env.arg(cmd, token=2), errno.ENOSPC)


def test_create_session_over_quota(env: Env) -> None:
    """CREATE_SESSION by an owner at max_sessions_per_owner is EDQUOT."""
    cmd = BY_NAME["CREATE_SESSION"]
    with module_param("max_sessions_per_owner", 0):
        env.refused(env.dev.fd, cmd.request, env.arg(cmd, name=b"badinput-new"), errno.EDQUOT)
    assert "badinput-new" not in {e.name for e in env.dev.list_sessions()}


@pytest.mark.parametrize("name", ["RETRIEVE", "UNPRESERVE"])
def test_token_unknown(env: Env, name: str) -> None:
    cmd = BY_NAME[name]
    env.refused(env.session.fd, cmd.request, env.arg(cmd, token=2), errno.ENOENT)


def test_create_session_name_taken(env: Env) -> None:
    cmd = BY_NAME["CREATE_SESSION"]
    env.refused(env.dev.fd, cmd.request, env.arg(cmd, name=b"badinput"), errno.EEXIST)


def test_retrieve_session_missing_or_held(env: Env) -> None:
    cmd = BY_NAME["RETRIEVE_SESSION"]
    env.refused(env.dev.fd, cmd.request, env.arg(cmd, name=b"nope"), errno.ENOENT)
    env.refused(env.dev.fd, cmd.request, env.arg(cmd, name=b"badinput"), errno.EBUSY)


@pytest.mark.parametrize("name", ["CREATE_SESSION", "RETRIEVE_SESSION"])
@pytest.mark.parametrize("raw", [b"\0", b"y" * 64, b"ab\0c"], ids=["empty", "no-nul", "junk"])
def test_session_name_malformed(env: Env, name: str, raw: bytes) -> None:
    cmd = BY_NAME[name]
    arg = raw_arg(cmd.struct, name=raw)
    env.refused(env.dev.fd, cmd.request, arg, errno.EINVAL)


def test_list_sessions_bad_buffer(env: Env) -> None:
    """LIST_SESSIONS with room for entries at an unwritable address is EFAULT."""
    cmd = BY_NAME["LIST_SESSIONS"]
    env.refused(env.dev.fd, cmd.request, env.arg(cmd, count=4, entries=8), errno.EFAULT)


@pytest.mark.parametrize("name", FD_CMDS)
@pytest.mark.parametrize("fd", [-2, -100, 0x7FFFFFFF], ids=["-2", "-100", "huge"])
def test_fd_not_open(env: Env, name: str, fd: int) -> None:
    """An eventfd field that names no open file is EBADF; the old target stays."""
    cmd = BY_NAME[name]
    env.refused(env.table.fd, cmd.request, env.arg(cmd, eventfd=fd), errno.EBADF)
    env.target_intact()


@pytest.mark.parametrize("name", FD_CMDS)
def test_closed_fd(env: Env, name: str) -> None:
    """A just-closed fd is EBADF."""
    cmd = BY_NAME[name]
    env.refused(env.table.fd, cmd.request, env.arg(cmd, eventfd=_closed_fd()), errno.EBADF)
    env.target_intact()


@pytest.mark.parametrize("name", FD_CMDS)
@pytest.mark.parametrize("kind", ["table", "binding", "device", "pipe", "file", "socket"])
def test_fd_not_an_eventfd(env: Env, name: str, kind: str) -> None:
    """A kvmlu fd, a pipe, a regular file or a socket is not an eventfd: EINVAL."""
    cmd = BY_NAME[name]
    opened: list[int] = []
    if kind == "table":
        fd = env.table.fd
    elif kind == "binding":
        fd = env.binding.fd
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
        env.refused(env.table.fd, cmd.request, env.arg(cmd, eventfd=fd), errno.EINVAL)
    finally:
        for o in opened:
            os.close(o)
    env.target_intact()


def test_bind_same_eventfd_twice(env: Env) -> None:
    """An eventfd bound to the table already is EBUSY, even for another vCPU and vector."""
    cmd = BY_NAME["BIND"]
    env.refused(env.table.fd, cmd.request, env.arg(cmd, eventfd=env.bound_src, vcpu=5), errno.EBUSY)


def test_bind_eventfd_that_is_the_notify_target(env: Env) -> None:
    """A table's own notification eventfd may be bound (the loop is bounded by ON)."""
    with env.table.bind(env.efd, 4, 0x44):
        env.table.fetch(1)
        env.table.post(1, 0x45)  # ON rises: signals efd, whose binding posts 0x44
        assert 0x44 in env.table.pir(4)


def test_vapic_save_buffer_too_small(env: Env) -> None:
    """SAVE into a buffer the blob does not fit is ENOSPC, and reports the size needed."""
    cmd = BY_NAME["VAPIC_SAVE"]
    env.refused(env.vapic.fd, cmd.request, env.arg(cmd, buf_len=len(env.blob) - 1), errno.ENOSPC)
    arg = env.arg(cmd, buf_len=0)
    with pytest.raises(KvmluError):
        ioctl(env.vapic.fd, cmd.request, arg)
    assert int.from_bytes(arg[20:24], "little") == len(env.blob)


@pytest.mark.parametrize("kind", ["eventfd", "device", "binding"])
def test_create_vapic_on_non_table(env: Env, kind: str) -> None:
    cmd = BY_NAME["CREATE_VAPIC"]
    fd = {"eventfd": env.src, "device": env.dev.fd, "binding": env.binding.fd}[kind]
    env.refused(env.vapicdev.fd, cmd.request, env.arg(cmd, table_fd=fd), errno.EINVAL)


@pytest.mark.parametrize("fd", [-1, 0x7FFFFFFF])
def test_create_vapic_fd_not_open(env: Env, fd: int) -> None:
    cmd = BY_NAME["CREATE_VAPIC"]
    env.refused(env.vapicdev.fd, cmd.request, env.arg(cmd, table_fd=fd), errno.EBADF)


def test_vapic_save_future_format(env: Env) -> None:
    cmd = BY_NAME["VAPIC_SAVE"]
    env.refused(env.vapic.fd, cmd.request, env.arg(cmd, format=3), errno.EPROTONOSUPPORT)
