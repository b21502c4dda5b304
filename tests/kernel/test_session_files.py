"""What a session preserves: an allow-list of file types, each file once, within limits.

The limits are kvmlu.ko parameters; the tests that reach them lower them for
the test and put them back. Other owners are forked children that drop to
another uid (see test_session_owner.py).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kutil import module_param
from test_session_owner import USER, Result, as_child, errno_of

from pyctl.guest import hold_kvm_vm
from pyctl.kvmlu import Device, Session
from pyctl.vfio import VfioPciDevice

DEV_KVM = Path("/dev/kvm")


def _err(fn: Callable[..., object], *args: object) -> int:
    return errno_of(lambda: fn(*args))


@pytest.fixture
def session(dev: Device) -> Iterator[Session]:
    s = dev.create_session("files")
    yield s
    s.finish()
    s.close()


def _edu_bdf() -> str:
    bdfs = [b for b in os.environ.get("KVMLU_EDU", "").split(",") if b]
    assert bdfs, "the VM runner exports KVMLU_EDU"
    return bdfs[0]


@pytest.fixture
def vfio() -> Iterator[VfioPciDevice]:
    dev = VfioPciDevice.open(_edu_bdf())
    with dev:
        yield dev


def _nr_objects(dev: Device, name: str) -> int:
    return next(e.nr_objects for e in dev.list_sessions() if e.name == name)


@pytest.mark.parametrize("which", ["container", "group", "device"])
def test_vfio_files_are_preservable(
    dev: Device, session: Session, vfio: VfioPciDevice, which: str
) -> None:
    """VFIO's container, group and device fds are preserved and come back."""
    fd = {"container": vfio.container_fd, "group": vfio.group_fd, "device": vfio.device_fd}[which]
    assert fd is not None
    session.preserve(fd, 1)
    back = session.retrieve(1)
    try:
        assert os.path.samestat(os.fstat(back), os.fstat(fd))
    finally:
        os.close(back)
    assert _nr_objects(dev, "files") == 1


def _kvm_vm() -> int:
    fd, problem = hold_kvm_vm()
    assert fd is not None, problem
    return fd


UNLISTED = ["devnode", "pidfd", "procfile", "9p-file", "kvm-vm", "socket", "epoll"]


@pytest.mark.parametrize("kind", UNLISTED)
def test_unlisted_types_are_refused(dev: Device, session: Session, kind: str) -> None:
    """Every file type not on the list is EOPNOTSUPP, and the session is unchanged.

    /dev/null (a device node that is not VFIO's), a pidfd (preservable by
    accident of implementation on 6.12 before the list), a procfs file, a
    regular file outside tmpfs and hugetlbfs (the results folder, over 9p),
    a KVM VM (an anonymous-inode file), a socket and an epoll instance.
    """
    if kind == "kvm-vm" and not DEV_KVM.exists():
        pytest.skip("no /dev/kvm in this test VM")
    closers: list[socket.socket | select.epoll] = []
    if kind == "devnode":
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    elif kind == "pidfd":
        fd = os.pidfd_open(os.getpid())
    elif kind == "procfile":
        fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    elif kind == "9p-file":
        results = Path(os.environ["KVMLU_RESULTS"])
        fd = os.open(results / "session-files.tmp", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        os.unlink(results / "session-files.tmp")
    elif kind == "kvm-vm":
        fd = _kvm_vm()
    elif kind == "socket":
        a, b = socket.socketpair()
        closers += [a, b]
        fd = os.dup(a.fileno())
    else:
        ep = select.epoll()
        closers.append(ep)
        fd = os.dup(ep.fileno())
    try:
        assert _err(session.preserve, fd, 1) == errno.EOPNOTSUPP
        assert _err(session.retrieve, 1) == errno.ENOENT
        assert _nr_objects(dev, "files") == 0
    finally:
        os.close(fd)
        for c in closers:
            c.close()


def test_tmpfs_file_is_preservable(dev: Device, session: Session, tmp_path: Path) -> None:
    """A regular file of a tmpfs mount (not only a memfd) is preserved."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "kvmlu-test", str(mnt)], check=True)
    try:
        fd = os.open(mnt / "state", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        try:
            session.preserve(fd, 1)
        finally:
            os.close(fd)
        session.unpreserve(1)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_one_file_is_preserved_once(dev: Device, efd: int) -> None:
    """The same file under a second token, through a dup, or in a second session: EALREADY."""
    a = dev.create_session("once-a")
    b = dev.create_session("once-b")
    dup = os.dup(efd)
    try:
        a.preserve(efd, 1)
        assert _err(a.preserve, efd, 2) == errno.EALREADY
        assert _err(a.preserve, dup, 3) == errno.EALREADY
        assert _err(b.preserve, efd, 1) == errno.EALREADY
        assert (_nr_objects(dev, "once-a"), _nr_objects(dev, "once-b")) == (1, 0)
        assert _err(a.retrieve, 2) == errno.ENOENT
        # A token in use is EEXIST whatever the file.
        assert _err(a.preserve, efd, 1) == errno.EEXIST
        # Let go of it, and it may be preserved again, anywhere.
        a.unpreserve(1)
        b.preserve(dup, 7)
        b.finish()
        a.preserve(efd, 1)
        a.finish()
    finally:
        os.close(dup)
        for s in (a, b):
            s.finish()
            s.close()


def test_objects_per_session_limit(dev: Device, session: Session) -> None:
    """PRESERVE beyond max_objects_per_session is ENOSPC and changes nothing."""
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(4)]
    try:
        with module_param("max_objects_per_session", 3):
            for i, fd in enumerate(fds[:3]):
                session.preserve(fd, i)
            assert _err(session.preserve, fds[3], 3) == errno.ENOSPC
            assert _err(session.retrieve, 3) == errno.ENOENT
            assert _nr_objects(dev, "files") == 3
            # The refused file was not taken: another session may have it.
            with dev.create_session("files-other") as other:
                other.preserve(fds[3], 1)
                other.finish()
            # One out, one in.
            session.unpreserve(0)
            session.preserve(fds[3], 3)
            assert _nr_objects(dev, "files") == 3
    finally:
        for fd in fds:
            os.close(fd)


def test_sessions_per_owner_limit(dev: Device) -> None:
    """CREATE_SESSION beyond max_sessions_per_owner is EDQUOT, for that owner only.

    A session whose fds are all closed still counts against its owner until
    it is finished; another owner has a count of its own.
    """
    made: list[Session] = []
    try:
        with module_param("max_sessions_per_owner", 2):
            made.append(dev.create_session("quota-1"))
            made.append(dev.create_session("quota-2"))
            made[1].close()  # let go, not finished: still counts
            assert _err(dev.create_session, "quota-3") == errno.EDQUOT
            assert "quota-3" not in {e.name for e in dev.list_sessions()}

            def other_owner() -> Result:
                errs = [errno_of(lambda n=n: dev.create_session(n)) for n in ("u-1", "u-2", "u-3")]
                for n in ("u-1", "u-2"):
                    s = dev.retrieve_session(n)
                    s.finish()
                    s.close()
                return {"errs": errs}

            assert as_child(USER, other_owner)["errs"] == [0, 0, errno.EDQUOT]
            # Finishing one frees its place.
            made[1] = dev.retrieve_session("quota-2")
            made[1].finish()
            made.append(dev.create_session("quota-3"))
    finally:
        for s in made:
            s.finish()
            s.close()
