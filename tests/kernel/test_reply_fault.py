"""Replies that cannot be written: every command that writes back fails with
EFAULT before it acts, and a stalled reply stalls the command before it acts.

Each command here gets a valid argument that would change state if it ran
(a vector pending for FETCH and SYNC, a deliverable one for ACK, one in
service for EOI, a pending count on the eventfd BIND would consume), placed
so that its reply cannot be written: in a read-only page, running from a
writable page into a read-only or an unmapped one. The call must fail with
EFAULT and leave the descriptors, the vAPIC, the counters, the sessions, the
eventfds and the process's fds as they were. Then the same argument in a page
that userfaultfd write-protects: the call stalls, and while it stalls nothing
has changed and other processes' calls complete; released, it completes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultmem import LAYOUTS, StalledArg, placed, userfaultfd_available
from kutil import eventfd_count
from test_badinput import BY_NAME, Cmd, Env

from pyctl.errors import KvmluError
from pyctl.kvmlu import Device, Table
from pyctl.uapi import ffi, ioctl

#: Commands that write output fields back.
REPLY_CMDS = [
    BY_NAME[n]
    for n in (
        "QUERY",
        "CREATE_TABLE",
        "PEEK",
        "FETCH",
        "POST",
        "BIND",
        "TABLE_INFO",
        "BINDING_INFO",
        "CREATE_SESSION",
        "RETRIEVE_SESSION",
        "LIST_SESSIONS",
        "RETRIEVE",
        "VAPIC_QUERY",
        "CREATE_VAPIC",
        "VAPIC_SYNC",
        "VAPIC_ACK",
        "VAPIC_EOI",
        "VAPIC_GET",
        "VAPIC_SAVE",
    )
]
#: Commands whose structure is input only: placement does not matter to them.
INPUT_ONLY = {"SET_NOTIFY", "SET_SN", "PRESERVE", "UNPRESERVE", "FINISH", "VAPIC_LOAD"}

#: Generous bound for a stalled call to reach its fault, or a released one to
#: return: both take milliseconds; the bound only keeps a broken kernel from
#: hanging the suite.
STALL_TIMEOUT = 120.0


def _eventfd_counter(fd: int) -> int:
    """An eventfd's counter, read from fdinfo without consuming it."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("eventfd-count:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"fd {fd} is not an eventfd")


class FaultEnv(Env):
    """The bad-input fixture, with work pending for every command that acts."""

    def __init__(self, dev: Device, table: Table, efd: int) -> None:
        super().__init__(dev, table, efd)
        # vCPU 1: IRR {0x50}, ISR {0x5B} (from Env); now IRR also 0x70, which
        # ACK would deliver (class 7 above 5), and PIR 0x71 for FETCH and SYNC.
        table.post(1, 0x70)
        self.vapic.sync(1)
        table.post(1, 0x71)
        eventfd_count(efd)
        os.eventfd_write(self.src, 1)  # BIND would consume and post it

    def state(self) -> tuple[Any, ...]:
        return (*super().state(), _eventfd_counter(self.src), _eventfd_counter(self.efd))

    def objects(self) -> tuple[Any, ...]:
        """:meth:`state` but the process's fd count (a stalled call's test holds a
        userfaultfd)."""
        whole = self.state()
        return whole[:-3] + whole[-2:]


@pytest.fixture
def fenv(dev: Device, table: Table, efd: int) -> Iterator[FaultEnv]:
    e = FaultEnv(dev, table, efd)
    yield e
    e.close()


def _close_new_fds(before: set[int]) -> None:
    for fd in set(map(int, os.listdir("/proc/self/fd"))) - before:
        with contextlib.suppress(OSError):  # the listing's own fd
            os.close(fd)


def test_reply_commands_are_those_with_output() -> None:
    """The two lists cover every command of the bad-input suite, once."""
    names = {c.name for c in REPLY_CMDS}
    assert not names & INPUT_ONLY
    assert names | INPUT_ONLY == set(BY_NAME)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cmd", REPLY_CMDS, ids=repr)
def test_unwritable_reply_refused_before_acting(fenv: FaultEnv, cmd: Cmd, layout: str) -> None:
    """A reply that cannot be written is EFAULT, and the command did nothing."""
    with placed(bytes(fenv.arg(cmd)), layout) as addr:
        fenv.refused(fenv.fd_for(cmd), cmd.request, addr, errno.EFAULT)


@pytest.mark.parametrize("layout", ["read-only", "straddle-read-only"])
@pytest.mark.parametrize("name", sorted(INPUT_ONLY - {"FINISH"}))
def test_input_only_commands_read_from_read_only_memory(
    fenv: FaultEnv, name: str, layout: str
) -> None:
    """A command that writes nothing back takes its argument from read-only memory."""
    cmd = BY_NAME[name]
    with placed(bytes(fenv.arg(cmd)), layout) as addr:
        ioctl(fenv.fd_for(cmd), cmd.request, addr)


def test_fetch_reply_fault_keeps_vectors_for_the_next_fetch(fenv: FaultEnv) -> None:
    """The vectors a refused FETCH saw are returned by the next one, ON as before."""
    before = fenv.table.view(1)
    assert 0x71 in before.pir and before.on
    arg = bytes(fenv.arg(BY_NAME["FETCH"]))
    with placed(arg, "straddle-read-only") as addr, pytest.raises(KvmluError) as ei:
        ioctl(fenv.table.fd, BY_NAME["FETCH"].request, addr)
    assert ei.value.errno == errno.EFAULT
    assert fenv.table.view(1) == before
    assert fenv.table.fetch(1) == before.pir


def test_bound_msi_count_survives_a_refused_bind(fenv: FaultEnv) -> None:
    """A BIND refused for its reply leaves the eventfd's count for the next binding."""
    arg = bytes(fenv.arg(BY_NAME["BIND"]))
    with placed(arg, "read-only") as addr, pytest.raises(KvmluError) as ei:
        ioctl(fenv.table.fd, BY_NAME["BIND"].request, addr)
    assert ei.value.errno == errno.EFAULT
    assert _eventfd_counter(fenv.src) == 1
    with fenv.table.bind(fenv.src, 3, 0x67):
        assert 0x67 in fenv.table.view(3).pir


# Stalled replies.

needs_uffd = pytest.mark.skipif(
    not userfaultfd_available(), reason="no userfaultfd write-protect mode on this kernel"
)


class _Call(threading.Thread):
    """An ioctl on its own thread, so that the test can watch it stall."""

    def __init__(self, fd: int, request: int, addr: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.request, self.addr = fd, request, addr
        self.result: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = ioctl(self.fd, self.request, self.addr)
        except BaseException as e:  # reported by the test
            self.error = e


def _within(what: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` on its own thread; fail if it has not returned within
    :data:`STALL_TIMEOUT`: it is blocked behind the stalled call (a lock
    held across the stall), and the caller's release will free it."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as e:  # re-raised below
            errors.append(e)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(STALL_TIMEOUT)
    if t.is_alive():
        raise AssertionError(f"{what} blocked behind the stalled call for {STALL_TIMEOUT} s")
    if errors:
        raise errors[0]


def _stalled(
    fd: int, request: int, arg: bytes, while_stalled: Callable[[], None]
) -> tuple[_Call, bytes]:
    """Issue the call with its argument write-protected; once it stalls, run
    ``while_stalled`` (bounded by :func:`_within`); release the call and return
    it finished, with the argument's bytes as the kernel left them."""
    s = StalledArg(arg)
    call = _Call(fd, request, s.addr)
    try:
        call.start()
        s.wait_fault(STALL_TIMEOUT)
        _within("the check made while the call stalled", while_stalled)
    finally:
        s.release()
        call.join(STALL_TIMEOUT)
        out = s.read()
        if not call.is_alive():
            s.close()
    assert not call.is_alive(), "the released call did not return"
    return call, out


@needs_uffd
@pytest.mark.parametrize("cmd", REPLY_CMDS, ids=repr)
def test_stalled_reply_stalls_before_acting(fenv: FaultEnv, cmd: Cmd) -> None:
    """A call whose reply page stalls has done nothing while it waits; released, it completes."""
    fds = set(map(int, os.listdir("/proc/self/fd")))
    before = fenv.objects()
    arg = bytes(fenv.arg(cmd))

    def check() -> None:
        assert fenv.objects() == before, f"{cmd.name} acted before its reply could land"

    try:
        call, out = _stalled(fenv.fd_for(cmd), cmd.request, arg, check)
        assert call.error is None, f"{cmd.name} failed once released: {call.error}"
        if cmd.name == "FETCH":
            fetched = ffi.new("struct kvmlu_table_fetch *")
            ffi.memmove(fetched, out, len(out))
            assert fetched.pir[1] == 1 << (0x71 - 64), "FETCH's reply lacks the vector it took"
            assert not fenv.table.view(1).pir
    finally:
        _close_new_fds(fds)


_OTHER_PROCESS = """
import os
from pyctl.kvmlu import Device
with Device() as dev:
    with dev.create_table(2) as t:
        t.post(0, 0x40)
    dev.query()
    with dev.create_session("reply-fault-other") as s:
        s.finish()
    dev.list_sessions()
print("ok")
"""


def _other_process() -> None:
    """Run :data:`_OTHER_PROCESS` to its end; it must succeed. Call it through
    :func:`_within`: a process blocked on a kernel lock cannot be killed until
    it gets the lock, so only the test's release of the stall frees it."""
    r = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@needs_uffd
@pytest.mark.parametrize("name", ["LIST_SESSIONS", "BIND", "CREATE_SESSION", "RETRIEVE_SESSION"])
def test_other_process_completes_while_a_reply_stalls(fenv: FaultEnv, name: str) -> None:
    """While one caller's reply stalls, another process creates and closes a table,
    queries, creates and finishes a session and lists sessions."""
    cmd = BY_NAME[name]
    fds = set(map(int, os.listdir("/proc/self/fd")))

    try:
        call, _ = _stalled(fenv.fd_for(cmd), cmd.request, bytes(fenv.arg(cmd)), _other_process)
        assert call.error is None, call.error
    finally:
        _close_new_fds(fds)


@needs_uffd
def test_list_sessions_entries_stalled_outside_the_lock(fenv: FaultEnv) -> None:
    """LIST_SESSIONS copies its entries after dropping the sessions lock: with the
    entries page stalled, another process still creates, finishes and lists sessions."""
    entries = StalledArg(b"\0" * 8 * 72)
    fds = set(map(int, os.listdir("/proc/self/fd")))
    arg = bytearray(fenv.arg(BY_NAME["LIST_SESSIONS"]))
    lst = ffi.from_buffer("struct kvmlu_list_sessions *", arg)
    lst.count = 8
    lst.entries = entries.addr
    call = _Call(fenv.dev.fd, BY_NAME["LIST_SESSIONS"].request, int(ffi.cast("uintptr_t", lst)))
    try:
        call.start()
        entries.wait_fault(STALL_TIMEOUT)
        _within("another process", _other_process)
    finally:
        entries.release()
        call.join(STALL_TIMEOUT)
        entries.close()
        _close_new_fds(fds)
    assert call.error is None, call.error
    assert lst.nr_sessions >= 2  # the fixture's two sessions
