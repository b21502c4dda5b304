"""Helpers shared by the kernel tests."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyctl.kvmlu import Descriptor, Table
from pyctl.uapi import ffi

CHECKOUT = Path(__file__).resolve().parents[2]


def module_path(name: str) -> Path:
    """The ``.ko`` of module ``name`` that this run loaded (the VM runner lists
    them in ``KVMLU_MODULES``), else the checkout's build."""
    for path in filter(None, os.environ.get("KVMLU_MODULES", "").split(":")):
        if Path(path).name == f"{name}.ko":
            return Path(path)
    return CHECKOUT / "kmod" / f"{name}.ko"


@contextmanager
def module_param(name: str, value: int, module: str = "kvmlu") -> Iterator[None]:
    """Module parameter ``name`` set to ``value`` for the block, then put back."""
    path = Path("/sys/module") / module / "parameters" / name
    old = path.read_text().strip()
    path.write_text(str(value))
    try:
        yield
    finally:
        path.write_text(old)


def eventfd_count(fd: int) -> int:
    """Read and reset a non-blocking eventfd; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def snapshot(table: Table) -> tuple[Descriptor, ...]:
    """Every descriptor of ``table`` as read through its mapping."""
    return tuple(table.view(v) for v in range(table.nr_vcpus))


def raw_arg(
    struct: str, size: int | None = None, tail: bytes = b"", **fields: int | bytes
) -> bytearray:
    """The bytes of ``struct <struct>`` with ``fields``, ``size`` and ``tail`` appended.

    ``size`` defaults to the structure's size plus the tail's length, so a
    tail makes the structure look larger than the kernel's. A bytes value
    fills an array field from its start.
    """
    arg: Any = ffi.new(f"struct {struct} *")
    for name, value in fields.items():
        if isinstance(value, bytes):
            getattr(arg, name)[0 : len(value)] = list(value)
        else:
            setattr(arg, name, value)
    body = bytes(ffi.buffer(arg))
    arg.size = len(body) + len(tail) if size is None else size
    return bytearray(bytes(ffi.buffer(arg)) + tail)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_readable(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``fd`` to become readable."""
    import select

    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(int(timeout * 1000)))


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``pred`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.001)


class FuzzStats:
    """What the fuzzers of one pytest process ran: programs, steps, calls.

    ``make fuzz`` reports the sums (``tools/fuzz.sh``); each process writes
    its counts as JSON to ``$KVMLU_FUZZ_STATS`` when a fuzz module ends.
    """

    def __init__(self) -> None:
        self.counts = {"programs": 0, "steps": 0, "malformed_calls": 0}
        self.started: float | None = None

    def add(self, key: str, n: int = 1) -> None:
        if self.started is None:
            self.started = time.monotonic()
        self.counts[key] += n

    def write(self) -> None:
        path = os.environ.get("KVMLU_FUZZ_STATS")
        if not path:
            return
        seconds = 0.0 if self.started is None else time.monotonic() - self.started
        doc = {**self.counts, "seconds": round(seconds, 1)}
        Path(path).write_text(json.dumps(doc) + "\n")


fuzz_stats = FuzzStats()
