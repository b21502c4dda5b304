"""Sessions: preserve objects, let the process go, retrieve them in another one."""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kutil import eventfd_count, wait_readable

from pyctl.errors import KvmluError
from pyctl.kvmlu import Device, Session, Table

REFCNT = Path("/sys/module/kvmlu/refcnt")
TIMEOUT = 10.0


@pytest.fixture
def session(dev: Device) -> Iterator[Session]:
    s = dev.create_session("test-session")
    yield s
    s.finish()
    s.close()


def run_successor(code: str) -> dict[str, object]:
    """Run ``code`` in a new Python process (a successor VMM); it prints one JSON line."""
    prologue = "import json, os\nfrom pyctl.kvmlu import Device, Table, Binding\n"
    r = subprocess.run(
        [sys.executable, "-c", prologue + code],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_create_list_close_retrieve_finish(dev: Device) -> None:
    """A session outlives its fd, is retrieved by name, and finish removes it."""
    base = dev.query().nr_sessions
    s = dev.create_session("lifecycle")
    assert [(e.name, e.nr_objects, e.held) for e in dev.list_sessions()] == [("lifecycle", 0, True)]
    with dev.create_table(2) as t:
        s.preserve(t.fd, 1)
    assert dev.list_sessions()[0].nr_objects == 1
    s.close()
    assert [(e.name, e.held) for e in dev.list_sessions()] == [("lifecycle", False)]
    assert dev.query().nr_tables >= 1, "the session keeps the closed table"
    with dev.retrieve_session("lifecycle") as s2:
        with Table.from_fd(s2.retrieve(1)) as t2:
            assert t2.nr_vcpus == 2
        s2.finish()
        assert dev.list_sessions() == []
        assert dev.query().nr_sessions == base
    dev.create_session("lifecycle").finish()  # the name is free again


def test_retrieve_gives_same_object(dev: Device, session: Session) -> None:
    """A retrieved fd is the same table: a post through one is seen through the other."""
    with dev.create_table(4) as t:
        session.preserve(t.fd, 7)
        with Table.from_fd(session.retrieve(7)) as t2:
            t.post(3, 0x77)
            assert t2.pir(3) == {0x77}
            with Table.from_fd(session.retrieve(7)) as t3:
                assert t3.fetch(3) == {0x77}, "retrieving twice is allowed"
            assert not t.pir(3)


def test_preserved_table_keeps_pir_across_processes(dev: Device) -> None:
    """PIR, ON and the notification config survive the old process; the new one reads them."""
    s = dev.create_session("handoff-pir")
    with dev.create_table(4) as t:
        t.set_notify(2, None, nv=0xE0, ndst=2)
        for vec in (0x30, 0x81, 0xFE):
            t.post(2, vec)
        s.preserve(t.fd, 1)
    s.close()
    out = run_successor(
        """
with Device() as dev, dev.retrieve_session("handoff-pir") as s:
    with Table.from_fd(s.retrieve(1)) as t:
        d = t.view(2)
        res = {"pir": sorted(d.pir), "on": d.on, "nv": d.nv, "taken": sorted(t.fetch(2))}
    s.finish()
print(json.dumps(res))
"""
    )
    assert out == {"pir": [0x30, 0x81, 0xFE], "on": True, "nv": 0xE0, "taken": [0x30, 0x81, 0xFE]}


def test_preserved_binding_posts_with_no_process_holding_it(dev: Device) -> None:
    """A preserved binding and eventfd keep posting after every fd is closed."""
    s = dev.create_session("handoff-binding")
    src = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    with dev.create_table(2) as t, t.bind(src, 1, 0x61) as b:
        s.preserve(t.fd, 1)
        s.preserve(b.fd, 2)
        s.preserve(src, 3)
    # Only the session holds the table and binding; signal through our own fd.
    os.eventfd_write(src, 1)
    os.close(src)
    s.close()
    assert dev.query().nr_bindings >= 1
    out = run_successor(
        """
with Device() as dev, dev.retrieve_session("handoff-binding") as s:
    t = Table.from_fd(s.retrieve(1))
    b = Binding(s.retrieve(2))
    src = s.retrieve(3)
    before = sorted(t.pir(1))
    os.eventfd_write(src, 1)
    res = {"before": before, "signals": b.info().stats.signals, "active": b.info().active}
    t.fetch(1)
    b.close(); t.close(); os.close(src)
    s.finish()
print(json.dumps(res))
"""
    )
    assert out == {"before": [0x61], "signals": 2, "active": True}


def test_attach_signals_new_owner_once(dev: Device, efd: int) -> None:
    """Attaching with pending vectors sets ON and signals the new target once; PIR untouched."""
    with dev.create_table(2) as t:
        old = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        t.set_notify(0, old, nv=0xF2, ndst=0)
        t.post(0, 0x44)
        assert eventfd_count(old) == 1, "the old owner got the first signal"
        os.close(old)
        t.set_notify(0, efd, nv=0xF3, ndst=5, attach=True)
        assert wait_readable(efd, TIMEOUT)
        assert eventfd_count(efd) == 1
        d = t.view(0)
        assert (d.pir, d.on, d.nv, d.ndst) == ({0x44}, True, 0xF3, 5)
        t.set_notify(1, efd, nv=0xF3, ndst=5, attach=True)
        assert eventfd_count(efd) == 0, "nothing pending on vCPU 1: no signal"
        assert not t.view(1).on


def test_attach_recomputes_on_after_suppressed_gap(dev: Device, efd: int) -> None:
    """Vectors posted under SN (ON clear) set ON on attach once SN is clear."""
    with dev.create_table(1) as t:
        t.set_sn(0, True)
        t.post(0, 0x55)
        t.set_sn(0, False)  # re-arms: ON rises with nobody to signal
        t.set_notify(0, efd, nv=0xF2, ndst=0, attach=True)
        assert eventfd_count(efd) == 1
        assert t.fetch(0) == {0x55}


def test_attach_with_sn_set_stays_silent(dev: Device, efd: int) -> None:
    """Under SN an attach does not set ON; clearing SN later signals."""
    with dev.create_table(1) as t:
        t.set_sn(0, True)
        t.post(0, 0x55)
        t.set_notify(0, efd, nv=0xF2, ndst=0, attach=True)
        assert eventfd_count(efd) == 0
        assert not t.view(0).on
        t.set_sn(0, False)
        assert eventfd_count(efd) == 1


# Errors: each with its errno, each changing nothing.


def _err(call: object, *args: object) -> int:
    with pytest.raises(KvmluError) as ei:
        call(*args)  # type: ignore[operator]
    return ei.value.errno


def test_unknown_token(session: Session) -> None:
    assert _err(session.retrieve, 99) == errno.ENOENT
    assert _err(session.unpreserve, 99) == errno.ENOENT


def test_token_used_twice(dev: Device, session: Session, efd: int) -> None:
    """A token already in the session is EEXIST; the first object stays."""
    with dev.create_table(1) as t:
        session.preserve(t.fd, 5)
        assert _err(session.preserve, efd, 5) == errno.EEXIST
        with Table.from_fd(session.retrieve(5)) as t2:
            assert t2.nr_vcpus == 1


def test_unpreserve_then_token_is_free(dev: Device, session: Session, efd: int) -> None:
    with dev.create_table(1) as t:
        session.preserve(t.fd, 5)
        session.unpreserve(5)
        assert _err(session.retrieve, 5) == errno.ENOENT
        session.preserve(efd, 5)
        os.close(session.retrieve(5))


@pytest.mark.parametrize("kind", ["session", "socket", "epoll"])
def test_unpreservable_types(dev: Device, session: Session, kind: str) -> None:
    """Files that can hold references to files (sessions, sockets, epoll) are EOPNOTSUPP."""
    if kind == "session":
        with dev.create_session("other") as other:
            assert _err(session.preserve, other.fd, 1) == errno.EOPNOTSUPP
            assert _err(session.preserve, session.fd, 1) == errno.EOPNOTSUPP
            other.finish()
    elif kind == "socket":
        a, b = socket.socketpair()
        with a, b:
            assert _err(session.preserve, a.fileno(), 1) == errno.EOPNOTSUPP
    else:
        ep = select.epoll()
        with ep:
            assert _err(session.preserve, ep.fileno(), 1) == errno.EOPNOTSUPP
    assert dev.list_sessions()[0].nr_objects == 0


@pytest.mark.parametrize("kind", ["eventfd", "memfd", "pipe"])
def test_preservable_types(dev: Device, session: Session, kind: str) -> None:
    """Eventfds, memfds and pipes are preservable (VFIO's files: test_session_files.py)."""
    if kind == "eventfd":
        fd = os.eventfd(0, os.EFD_CLOEXEC)
    elif kind == "memfd":
        fd = os.memfd_create("kvmlu-state", os.MFD_CLOEXEC)
    elif kind == "pipe":
        fd, w = os.pipe()
        os.close(w)
    try:
        session.preserve(fd, 1)
        os.close(session.retrieve(1))
    finally:
        os.close(fd)


def test_bad_fd(session: Session) -> None:
    assert _err(session.preserve, 0x7FFF, 1) == errno.EBADF


def test_retrieve_held_session(dev: Device, session: Session) -> None:
    """A session whose fd is open anywhere is EBUSY to retrieve."""
    assert _err(dev.retrieve_session, "test-session") == errno.EBUSY
    r = run_successor(
        """
from pyctl.errors import BusyError
try:
    Device().retrieve_session("test-session")
    res = "retrieved"
except BusyError:
    res = "busy"
print(json.dumps({"res": res}))
"""
    )
    assert r == {"res": "busy"}


def test_name_taken_and_missing(dev: Device, session: Session) -> None:
    assert _err(dev.create_session, "test-session") == errno.EEXIST
    assert _err(dev.retrieve_session, "no-such-session") == errno.ENOENT


@pytest.mark.parametrize(
    "raw",
    [b"", b"x" * 64, b"ab\0c"],
    ids=["empty", "no-nul", "junk-after-nul"],
)
@pytest.mark.parametrize("op", ["create", "retrieve"])
def test_bad_names(dev: Device, raw: bytes, op: str) -> None:
    """Empty, unterminated, or garbage after the NUL: EINVAL."""
    from kutil import raw_arg

    from pyctl.uapi import ioctl, lib

    req = lib.KVMLU_CREATE_SESSION if op == "create" else lib.KVMLU_RETRIEVE_SESSION
    arg = raw_arg("kvmlu_session_create", name=raw)
    with pytest.raises(KvmluError) as ei:
        ioctl(dev.fd, req, arg)
    assert ei.value.errno == errno.EINVAL
    assert dev.list_sessions() == []


def test_finished_session_is_stale(dev: Device, efd: int) -> None:
    """After finish every command but finish is ESTALE; finish again is a no-op."""
    s = dev.create_session("stale")
    s.preserve(efd, 1)
    s.finish()
    assert _err(s.preserve, efd, 2) == errno.ESTALE
    assert _err(s.retrieve, 1) == errno.ESTALE
    assert _err(s.unpreserve, 1) == errno.ESTALE
    s.finish()
    s.close()
    assert dev.list_sessions() == []


def test_session_pins_module_until_finish(dev: Device) -> None:
    """A preserved session holds kvmlu.ko; rmmod is refused until it is finished."""
    base = int(REFCNT.read_text())
    s = dev.create_session("pin")
    s.close()
    assert int(REFCNT.read_text()) == base + 1, "an unheld session still pins the module"
    r = subprocess.run(["rmmod", "kvmlu"], capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "in use" in r.stderr, r.stderr
    with dev.retrieve_session("pin") as s2:
        s2.finish()
    assert int(REFCNT.read_text()) == base
