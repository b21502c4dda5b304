"""Helpers shared by the kernel tests."""

from __future__ import annotations

import os
from typing import Any

from pyctl.kvmlu import Descriptor, Table
from pyctl.uapi import ffi


def eventfd_count(fd: int) -> int:
    """Read and reset a non-blocking eventfd; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def snapshot(table: Table) -> tuple[Descriptor, ...]:
    """Every descriptor of ``table`` as read through its mapping."""
    return tuple(table.view(v) for v in range(table.nr_vcpus))


def raw_arg(struct: str, size: int | None = None, tail: bytes = b"", **fields: int) -> bytearray:
    """The bytes of ``struct <struct>`` with ``fields``, ``size`` and ``tail`` appended.

    ``size`` defaults to the structure's size plus the tail's length, so a
    tail makes the structure look larger than the kernel's.
    """
    arg: Any = ffi.new(f"struct {struct} *")
    for name, value in fields.items():
        setattr(arg, name, value)
    body = bytes(ffi.buffer(arg))
    arg.size = len(body) + len(tail) if size is None else size
    return bytearray(bytes(ffi.buffer(arg)) + tail)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))
