"""What the guest runner (``pyctl.guest``) promises the suite it runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEV_KVM = Path("/dev/kvm")


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: fields follow the last ')'.
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _runner_pid() -> int:
    """The pid of the ``python -m pyctl.guest`` process this test runs under."""
    pid = os.getpid()
    while pid > 1:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"pyctl.guest" in cmdline:
            return pid
        pid = _parent(pid)
    pytest.fail("not run under the guest runner (python -m pyctl.guest)")


def test_runner_holds_one_kvm_vm() -> None:
    """The runner holds a KVM VM for the whole run.

    Creating the first VM and destroying the last one switch a static key
    in the scheduler; under TCG such a switch once killed the test VM's
    kernel (see ``pyctl.guest.hold_kvm_vm``). The VM the runner holds keeps
    the suite's own VMs from ever being the first or the last.
    """
    if not DEV_KVM.exists():
        pytest.skip("no /dev/kvm in this test VM")
    fd_dir = Path(f"/proc/{_runner_pid()}/fd")
    targets = [os.readlink(fd) for fd in fd_dir.iterdir()]
    assert targets.count("anon_inode:kvm-vm") == 1, targets
