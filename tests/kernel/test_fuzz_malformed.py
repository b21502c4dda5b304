"""Malformed-input fuzzing: random sizes, tails, flags, reserved bytes, fds and values,
in memory that may fault.

Every call must fail (or succeed) exactly as the uAPI's rules say, checked in
the kernel's order, and a failing call must change nothing. The argument is
sometimes placed where it faults (:data:`faultmem.LAYOUTS`): read-only, or
running into a read-only or an unmapped page.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from faultmem import LAYOUTS, placed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kutil import fuzz_stats, raw_arg, snapshot

from pyctl.errors import KvmluError
from pyctl.kvmlu import Binding, Device, Table
from pyctl.uapi import ffi, ioctl, lib

# Calls: KVMLU_FUZZ_MALFORMED, or five per stateful program (KVMLU_FUZZ_EXAMPLES).
EXAMPLES = int(os.environ.get("KVMLU_FUZZ_MALFORMED", "0")) or 5 * int(
    os.environ.get("KVMLU_FUZZ_EXAMPLES", "40")
)
# Fuzzer processes that use the module at once (make fuzz). With others
# about, the device-wide counts (KVMLU_QUERY) move under a refused call, so
# only this process's table, binding and descriptors are checked unchanged.
ALONE = int(os.environ.get("KVMLU_FUZZ_JOBS", "1")) == 1


def _state(dev: Device, table: Table, binding: Binding) -> tuple[object, ...]:
    """What a refused call must leave as it was."""
    own = (snapshot(table), table.info(), binding.info())
    return (*own, dev.query()) if ALONE else own


#: Commands whose structure is input only; the others write a reply.
INPUT_ONLY = {"SET_NOTIFY", "SET_SN"}

#: command -> (struct, known flags, reserved fields, value fields)
OPS: dict[str, tuple[str, int, tuple[str, ...], tuple[str, ...]]] = {
    "SET_NOTIFY": (
        "kvmlu_table_set_notify",
        lib.KVMLU_SET_NOTIFY_FLAGS,
        (),
        ("vcpu", "nv", "eventfd"),
    ),
    "SET_SN": ("kvmlu_table_set_sn", 0, (), ("vcpu", "suppress")),
    "PEEK": ("kvmlu_table_peek", 0, ("reserved",), ("vcpu",)),
    "FETCH": ("kvmlu_table_fetch", 0, ("reserved",), ("vcpu",)),
    "POST": ("kvmlu_table_post", 0, ("reserved",), ("vcpu", "vector")),
    "BIND": ("kvmlu_table_bind", 0, (), ("vcpu", "vector", "eventfd")),
}
NR_VCPUS = 4
u32 = st.integers(0, 2**32 - 1)
edgy_u32 = (
    st.sampled_from([0, 1, 3, 4, 31, 32, 33, 254, 255, 256, 1023, 1024, 2**31, 2**32 - 1]) | u32
)
FD_KINDS = ["eventfd", "bound-eventfd", "closed", "negative", "table", "device", "socket", "file"]


def expected(
    name: str, size: int, tail: bytes, f: dict[str, int], fd_kind: str, layout: str = "plain"
) -> int:
    """The errno the kernel must return, in the order it checks."""
    struct, known, reserved, _ = OPS[name]
    ksize = ffi.sizeof(f"struct {struct}")
    if size < ksize:
        return errno.EINVAL
    if layout == "straddle-unmapped":
        return errno.EFAULT  # the structure cannot be read
    if size > ksize and any(tail[: size - ksize]):
        return errno.E2BIG
    if layout != "plain" and name not in INPUT_ONLY:
        return errno.EFAULT  # the reply cannot be written: refused before the handler
    if f["flags"] & ~known or any(f[r] for r in reserved):
        return errno.EINVAL
    if f["vcpu"] >= NR_VCPUS:
        return errno.ERANGE
    if name == "SET_SN" and f["suppress"] > 1:
        return errno.EINVAL
    for key in ("nv", "vector"):
        if key in f and not 32 <= f[key] <= 255:
            return errno.ERANGE
    if name in ("SET_NOTIFY", "BIND"):
        if fd_kind in ("closed", "negative") and not (name == "SET_NOTIFY" and f["eventfd"] == -1):
            return errno.EBADF
        if fd_kind in ("table", "device", "socket", "file"):
            return errno.EINVAL
        if name == "BIND" and fd_kind == "bound-eventfd":
            return errno.EBUSY
    return 0


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    name=st.sampled_from(sorted(OPS)),
    grow=st.integers(-12, 24),
    tail=st.binary(min_size=24, max_size=24) | st.just(b"\0" * 24),
    flags=st.sampled_from([0, 0, 0, 1, 2, 2**31]) | u32,
    reserved=st.sampled_from([0, 0, 0, 1]) | u32,
    vcpu=edgy_u32,
    value=edgy_u32,
    suppress=st.sampled_from([0, 1, 2]) | u32,
    fd_kind=st.sampled_from(FD_KINDS),
    layout=st.sampled_from(["plain"] * 3 + list(LAYOUTS)),
)
def test_malformed_calls(
    name: str,
    grow: int,
    tail: bytes,
    flags: int,
    reserved: int,
    vcpu: int,
    value: int,
    suppress: int,
    fd_kind: str,
    layout: str,
) -> None:
    """Each call returns the errno the rules predict; a refused call changes nothing."""
    fuzz_stats.add("malformed_calls")
    struct, _, reserved_fields, values = OPS[name]
    with Device() as dev, dev.create_table(NR_VCPUS) as table:
        bound_src = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        binding = table.bind(bound_src, 0, 0x40)
        table.post(1, 0x41)
        opened: list[Any] = []
        try:
            fd = _fd(fd_kind, dev, table, bound_src, opened)
            f: dict[str, int] = {"flags": flags, "vcpu": vcpu}
            f.update({r: reserved for r in reserved_fields})
            if "suppress" in values:
                f["suppress"] = suppress
            for key in ("nv", "vector"):
                if key in values:
                    f[key] = value
            if "eventfd" in values:
                f["eventfd"] = fd
            ksize = ffi.sizeof(f"struct {struct}")
            size = max(0, ksize + grow)
            arg = raw_arg(struct, size=size, **f)
            arg = arg[:ksize] + (tail[: size - ksize] if size > ksize else b"")
            arg[0:4] = size.to_bytes(4, "little")
            buf = bytearray(arg) + bytearray(max(0, ksize - len(arg)))
            want = expected(name, size, tail, f, fd_kind, layout)
            before = _state(dev, table, binding)
            request = getattr(lib, f"KVMLU_TABLE_{name}")
            try:
                if layout == "plain":
                    ioctl(table.fd, request, buf)
                else:
                    with placed(bytes(buf), layout) as addr:
                        ioctl(table.fd, request, addr)
                got = 0
            except KvmluError as e:
                got = e.errno
            assert got == want, (
                f"{name} size={size} {f} fd={fd_kind} {layout}: got {got}, want {want}"
            )
            if got:
                assert _state(dev, table, binding) == before
            elif name == "BIND":
                os.close(int.from_bytes(buf[20:24], "little", signed=True))
        finally:
            for o in opened:
                o.close() if hasattr(o, "close") else os.close(o)
            binding.close()
            os.close(bound_src)


def _fd(kind: str, dev: Device, table: Table, bound: int, opened: list[Any]) -> int:
    if kind == "eventfd":
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        opened.append(fd)
        return fd
    if kind == "bound-eventfd":
        return bound
    if kind == "closed":
        e = os.eventfd(0)
        fd = os.dup2(e, 901)
        os.close(e)
        os.close(fd)
        return fd
    if kind == "negative":
        return -1
    if kind == "table":
        return table.fd
    if kind == "device":
        return dev.fd
    if kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        opened.append(s)
        return s.fileno()
    fd = os.open("/proc/version", os.O_RDONLY | os.O_CLOEXEC)
    opened.append(fd)
    return fd


def teardown_module() -> None:
    fuzz_stats.write()
