"""Session owners: only the creator, or an administrator over it, retrieves or lists a session.

The suite runs as root. Other identities are forked children of the test
process that keep its /dev/kvmlu fd (opened as root) and then drop to another
uid, or enter a user namespace of their own: kvmlu judges the calling task's
credentials at each ioctl, not the opener's. A child reports back one JSON
object through a pipe.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyctl.forked import ChildError, drop_to_uid, in_child
from pyctl.kvmlu import Device, Session

CLONE_NEWUSER = 0x10000000
CAP_SYS_ADMIN = 21


@dataclass(frozen=True)
class Who:
    """An identity a child takes on: a uid in the initial namespace, or root of a new userns."""

    uid: int = 0
    userns: bool = False

    def __str__(self) -> str:
        return "userns-root" if self.userns else f"uid {self.uid}"


ROOT = Who()
USER = Who(1000)
OTHER = Who(1001)
NSROOT = Who(userns=True)

Result = dict[str, Any]


def _cap_eff() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff in /proc/self/status")


def _become(who: Who) -> None:
    """Take on ``who`` in this (child) process, and check it took."""
    if who.uid:
        drop_to_uid(who.uid)
        assert _cap_eff() == 0, "a uid change from root drops every capability"
    if who.userns:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWUSER) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "unshare(CLONE_NEWUSER)")
        # Root of the new namespace, mapped to the same kernel uid 0 as the
        # initial root: only the namespace tells them apart.
        Path("/proc/self/uid_map").write_text("0 0 1\n")
        assert os.geteuid() == 0
        assert _cap_eff() & (1 << CAP_SYS_ADMIN), "full capabilities in its own namespace"


def as_child(who: Who, fn: Callable[[], Result]) -> Result:
    """Run ``fn`` in a forked child that has become ``who``; return what it returned."""
    try:
        out: Result = in_child(lambda: _become(who), fn)
    except ChildError as e:
        pytest.fail(f"{who}: {e}")
    return out


def errno_of(fn: Callable[[], object]) -> int:
    """0 if ``fn`` succeeds (closing what it returned), else the errno it failed with."""
    try:
        got = fn()
    except OSError as e:
        return e.errno or -1
    if isinstance(got, Session):
        got.close()
    return 0


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def names(dev: Device) -> list[str]:
    return sorted(e.name for e in dev.list_sessions())


def park(dev: Device, name: str, content: bytes) -> None:
    """Create session ``name`` holding a memfd with ``content`` under token 1, and let go."""
    with dev.create_session(name) as s:
        memfd = os.memfd_create("owner-test", os.MFD_CLOEXEC)
        try:
            os.write(memfd, content)
            s.preserve(memfd, 1)
        finally:
            os.close(memfd)


def parker(dev: Device, name: str, content: bytes) -> Callable[[], Result]:
    """:func:`park`, for :func:`as_child`."""

    def run() -> Result:
        park(dev, name, content)
        return {}

    return run


def content_of(s: Session) -> bytes:
    fd = s.retrieve(1)
    try:
        return os.pread(fd, 4096, 0)
    finally:
        os.close(fd)


def take(dev: Device, name: str, finish: bool = False) -> bytes:
    """Retrieve ``name`` as the caller, read its memfd, finish it if asked, let go."""
    with dev.retrieve_session(name) as s:
        data = content_of(s)
        if finish:
            s.finish()
        return data


def refusals(dev: Device, name: str) -> Result:
    """What a non-owner sees of ``name``: the listing, RETRIEVE's errno, fds before and after."""
    before = open_fds()
    return {
        "listed": names(dev),
        "retrieve": errno_of(lambda: dev.retrieve_session(name)),
        "fds_unchanged": open_fds() == before,
    }


def finish_as(dev: Device, who: Who, name: str) -> None:
    """Best-effort cleanup: ``who``'s session ``name`` is finished, if it still exists."""

    def run() -> Result:
        try:
            take(dev, name, finish=True)
        except OSError as e:
            return {"errno": e.errno}
        return {}

    if who == ROOT:
        run()
    else:
        as_child(who, run)


@pytest.fixture
def parked(dev: Device) -> Iterator[list[tuple[Who, str]]]:
    """Sessions a test leaves behind, as (owner, name): finished by their owners at teardown."""
    made: list[tuple[Who, str]] = []
    yield made
    for who, name in made:
        # Root finishes what a namespace made: the namespace is gone by now.
        finish_as(dev, ROOT if who.userns else who, name)
    assert dev.list_sessions() == [], "every session of the test is finished"


def check_intact(dev: Device, name: str, content: bytes) -> None:
    """``name`` is as its owner (root) left it: listed unheld with one object, same file."""
    entries = [(e.name, e.nr_objects, e.held) for e in dev.list_sessions() if e.name == name]
    assert entries == [(name, 1, False)]
    assert take(dev, name) == content


def test_other_uid_cannot_retrieve_or_list(dev: Device, parked: list[tuple[Who, str]]) -> None:
    """Another uid neither sees nor retrieves root's unheld session; nothing changes."""
    park(dev, "owner-root", b"root's manifest")
    parked.append((ROOT, "owner-root"))
    out = as_child(USER, lambda: refusals(dev, "owner-root"))
    assert out == {"listed": [], "retrieve": errno.ENOENT, "fds_unchanged": True}
    check_intact(dev, "owner-root", b"root's manifest")


def test_creator_and_admin_retrieve(dev: Device, parked: list[tuple[Who, str]]) -> None:
    """A user's session: its creator's successor and root retrieve it, another uid cannot."""
    as_child(USER, parker(dev, "owner-user", b"user's manifest"))
    parked.append((USER, "owner-user"))
    # A successor process of the same uid takes it over.
    out = as_child(USER, lambda: {"listed": names(dev), "data": take(dev, "owner-user").decode()})
    assert out == {"listed": ["owner-user"], "data": "user's manifest"}
    out = as_child(OTHER, lambda: refusals(dev, "owner-user"))
    assert out == {"listed": [], "retrieve": errno.ENOENT, "fds_unchanged": True}
    # Root, with CAP_SYS_ADMIN in the initial namespace, sees and retrieves it.
    assert names(dev) == ["owner-user"]
    assert take(dev, "owner-user") == b"user's manifest"
    # The refusal and root's retrieval left it to its owner as it was.
    out = as_child(USER, lambda: {"data": take(dev, "owner-user").decode()})
    assert out == {"data": "user's manifest"}


def test_names_are_per_owner(dev: Device, parked: list[tuple[Who, str]]) -> None:
    """A user cannot squat root's name: each owner has its own, and root gets its own first."""
    as_child(USER, parker(dev, "owner-name", b"planted by a user"))
    parked.append((USER, "owner-name"))
    park(dev, "owner-name", b"root's own")
    parked.append((ROOT, "owner-name"))
    assert take(dev, "owner-name") == b"root's own"
    assert names(dev) == ["owner-name", "owner-name"], "root sees both"
    out = as_child(USER, lambda: {"listed": names(dev), "data": take(dev, "owner-name").decode()})
    assert out == {"listed": ["owner-name"], "data": "planted by a user"}
    # The same owner still cannot create a name twice.
    assert errno_of(lambda: dev.create_session("owner-name")) == errno.EEXIST


def test_admin_refuses_ambiguous_name(dev: Device, parked: list[tuple[Who, str]]) -> None:
    """Root, having no session of a name two users have, retrieves neither (ENOTUNIQ)."""
    for who, data in ((USER, b"first"), (OTHER, b"second")):
        as_child(who, parker(dev, "owner-dup", data))
        parked.append((who, "owner-dup"))
    before = open_fds()
    assert errno_of(lambda: dev.retrieve_session("owner-dup")) == errno.ENOTUNIQ
    assert open_fds() == before
    assert [(e.name, e.nr_objects, e.held) for e in dev.list_sessions()] == [
        ("owner-dup", 1, False),
        ("owner-dup", 1, False),
    ]


def test_user_namespace_root(dev: Device, parked: list[tuple[Who, str]]) -> None:
    """Root of a new user namespace (kernel uid 0 too) is not root's owner or admin.

    It neither lists nor retrieves root's session, yet creates and retrieves
    its own; once the namespace has no task left, the initial root still
    retrieves and finishes the session made inside it.
    """
    park(dev, "owner-root", b"root's manifest")
    parked.append((ROOT, "owner-root"))

    def inside() -> Result:
        out = refusals(dev, "owner-root")
        # Its own session, retrieved again after letting go, as a successor would.
        park(dev, "owner-ns", b"made in a namespace")
        out["own"] = take(dev, "owner-ns").decode()
        out["listed_after"] = names(dev)
        return out

    parked.append((NSROOT, "owner-ns"))
    out = as_child(NSROOT, inside)
    assert out == {
        "listed": [],
        "retrieve": errno.ENOENT,
        "fds_unchanged": True,
        "own": "made in a namespace",
        "listed_after": ["owner-ns"],
    }
    check_intact(dev, "owner-root", b"root's manifest")
    # The namespace's only task exited; its session remains, for root.
    assert names(dev) == ["owner-ns", "owner-root"]
    assert take(dev, "owner-ns", finish=True) == b"made in a namespace"
