"""Old VMM to new VMM with real edu MSIs: the four strategies, both ways of passing fds.

The test process plays the devices: it opens the edu functions through VFIO,
hands their device fds to the VMM processes (which program the MSIs), and
raises interrupts one at a time, each stamped once its MSI has landed (the
host's vfio-msi count in /proc/interrupts moved). VMM processes fetch when
told and report what they took; the checker compares.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kutil import module_path, wait_until

from pyctl import handoff
from pyctl.check import Fetch, Raise, Report, check, dump_log
from pyctl.edu import Edu, find_vfio_edu
from pyctl.errors import NotFoundError
from pyctl.kvmlu import Device
from pyctl.swap import unload
from pyctl.vmm import recv_msg, send_msg

#: device i -> (vCPU, vector)
TARGETS = [(0, 0x41), (1, 0x62), (1, 0x73)]
TIMEOUT = 10.0


def msi_count(bdf: str) -> int:
    """How many MSIs of ``bdf`` the host has handled, from /proc/interrupts."""
    for line in Path("/proc/interrupts").read_text().splitlines():
        if bdf in line and "vfio-msi" in line:
            fields = line.split()[1:]
            return sum(int(f) for f in fields if f.isdigit())
    return 0


@pytest.fixture
def edus() -> Iterator[list[Edu]]:
    """Three edu functions, opened by the test (the device side)."""
    bdfs = find_vfio_edu()
    assert len(bdfs) >= 3, f"the kernel suite boots with three edu devices, found {bdfs}"
    devs = [Edu(bdf) for bdf in bdfs[:3]]
    try:
        yield devs
    finally:
        for d in devs:
            try:
                d.disable_msi()
            finally:
                d.close()


class VmmProc:
    """A VMM process (``python -m pyctl.vmm``) and its control socket."""

    def __init__(self, strategy: str, vapic: int | None = None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "pyctl.vmm", "--control-fd", str(theirs.fileno())]
        argv += ["--strategy", strategy] + (["--vapic", str(vapic)] if vapic else [])
        self.proc = handoff.spawn_successor(argv, [theirs.fileno()])
        theirs.close()
        self.ctl = ours

    def call(self, cmd: str, fds: list[int] | None = None, **kw: Any) -> dict[str, Any]:
        send_msg(self.ctl, {"cmd": cmd, **kw}, fds or [])
        reply, _ = recv_msg(self.ctl)
        assert reply["ok"], f"{cmd}: {reply.get('error')}"
        return reply

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.ctl.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.call("exit")
            assert self.proc.wait(timeout=30) == 0
        self.ctl.close()


class Rig:
    """The device side: raises MSIs one at a time and keeps the timeline."""

    def __init__(self, edus: list[Edu]) -> None:
        self.edus = edus
        self.raises: list[Raise] = []
        self.fetches: list[Fetch] = []

    def raise_(self, i: int) -> None:
        bdf = self.edus[i].bdf
        n = msi_count(bdf)
        self.edus[i].raise_irq()
        wait_until(lambda: msi_count(bdf) > n, TIMEOUT, f"the MSI of {bdf} to land")
        self.raises.append(Raise(time.monotonic(), *TARGETS[i]))

    def record(self, reply: dict[str, Any], side: str) -> None:
        for t, v, vecs in reply["deliveries"]:
            self.fetches.append(Fetch(t, v, frozenset(vecs), side))

    def device_fds(self) -> list[int]:
        return [e.vfio.fd for e in self.edus]


def start_old(rig: Rig, strategy: str) -> VmmProc:
    """An old VMM with the three devices bound, after some delivered interrupts."""
    old = VmmProc(strategy)
    old.call("setup", fds=rig.device_fds(), targets=TARGETS, nr_vcpus=2)
    for i in range(3):
        rig.raise_(i)
    rig.record(old.call("deliver"), "old")
    rig.raise_(0)  # still pending in the old VMM's table at the switch
    return old


def finish_new(rig: Rig, new: VmmProc) -> None:
    rig.record(new.call("deliver"), "new")
    for i in range(3):
        rig.raise_(i)
    rig.record(new.call("deliver"), "new")
    new.close()


def run_upgrade(edus: list[Edu], strategy: str, mode: str) -> Report:
    """One upgrade under a fixed interrupt stream; the checker's report."""
    rig = Rig(edus)
    old = start_old(rig, strategy)
    t0 = time.monotonic()
    old.call("export_begin")
    rig.raise_(1)  # after the old VMM paused (cpr: saved), before it let go
    if mode == "scm":
        new = VmmProc(strategy)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b:
            old.call("export_scm", fds=[a.fileno()])
            rig.raise_(0)  # in transit: both VMMs alive, neither listening
            new.call("import_scm", fds=[b.fileno()])
        old.close()
    else:
        name = f"upgrade-{strategy}"
        old.call("export_session", name=name)
        old.close()
        rig.raise_(0)  # no VMM at all
        new = VmmProc(strategy)
        new.call("import_session", name=name)
    t1 = time.monotonic()
    finish_new(rig, new)
    report = check(rig.raises, rig.fetches, (t0, t1))
    results = os.environ.get("KVMLU_RESULTS")
    if results:
        dump_log(f"{results}/handoff-{strategy}-{mode}.json", rig.raises, rig.fetches, (t0, t1))
    print(f"{strategy}/{mode}:\n{report.text()}")
    return report


@pytest.mark.parametrize("mode", ["scm", "session"])
def test_shared_loses_nothing_invents_nothing(edus: list[Edu], mode: str) -> None:
    """kvmlu's way: 0 lost, 0 spurious, 0 duplicated, including the gap's MSIs."""
    r = run_upgrade(edus, "shared", mode)
    assert r.ok, r.text()
    assert r.total("raised_in_switch") >= 2


@pytest.mark.parametrize("mode", ["scm", "session"])
def test_naive_loses(edus: list[Edu], mode: str) -> None:
    """Fresh eventfds and table: what was pending and what came in the switch is lost."""
    r = run_upgrade(edus, "naive", mode)
    assert r.lost >= 2, r.text()
    assert r.keys[(0, 0x41)].lost >= 1


@pytest.mark.parametrize("mode", ["scm", "session"])
def test_inject_invents(edus: list[Edu], mode: str) -> None:
    """Re-injecting every vector loses nothing but delivers one that was not pending."""
    r = run_upgrade(edus, "inject", mode)
    assert r.lost == 0, r.text()
    assert r.keys[(1, 0x73)].duplicated + r.keys[(1, 0x73)].spurious >= 1, r.text()


@pytest.mark.parametrize("mode", ["scm", "session"])
def test_cpr_loses_after_save(edus: list[Edu], mode: str) -> None:
    """Saving PIR then unbinding loses what was posted between the two."""
    r = run_upgrade(edus, "cpr", mode)
    assert r.keys[(1, 0x62)].lost >= 1, r.text()
    assert r.spurious == 0 and r.duplicated == 0, r.text()


def _no_leak(dev: Device, tables: int, bindings: int) -> None:
    wait_until(
        lambda: (dev.query().nr_tables, dev.query().nr_bindings) == (tables, bindings),
        TIMEOUT,
        "the dead VMM's objects to be freed",
    )


@pytest.mark.parametrize("when", ["before-preserve", "after-preserve", "mid-preserve"])
def test_old_vmm_killed(edus: list[Edu], dev: Device, when: str) -> None:
    """SIGKILL of the old VMM at each step: nothing leaks, and a new VMM completes or
    starts over cleanly; the devices keep posting either way."""
    base = dev.query()
    rig = Rig(edus)
    old = start_old(rig, "shared")
    old.call("export_begin")
    name = f"killed-{when}"
    if when == "after-preserve":
        old.call("export_session", name=name)
    elif when == "mid-preserve":
        old.call("export_session", name=name, stop_after=2)
    old.kill()
    rig.raise_(0)
    new = VmmProc("shared")
    if when == "after-preserve":
        new.call("import_session", name=name)
        t1 = time.monotonic()
        finish_new(rig, new)
        assert check(rig.raises, rig.fetches, (t1, t1)).ok
    else:
        # Nothing usable was preserved: a broken session is finished, and the
        # new VMM starts from the devices, as a first VMM would.
        if when == "mid-preserve":
            with pytest.raises(NotFoundError):
                handoff.retrieve(dev, name)
            with dev.retrieve_session(name) as s:
                s.finish()
        else:
            assert name not in [e.name for e in dev.list_sessions()]
        new.call("setup", fds=rig.device_fds(), targets=TARGETS, nr_vcpus=2)
        rig.raise_(2)
        reply = new.call("deliver")
        assert [1, [0x73]] in [[v, xs] for _, v, xs in reply["deliveries"]]
        new.close()
    assert dev.list_sessions() == []
    _no_leak(dev, base.nr_tables, base.nr_bindings)


def test_thousand_switches_under_storm(edus: list[Edu], dev: Device) -> None:
    """Two VMMs hand one VM back and forth 1,000 times by SCM_RIGHTS while all three
    devices keep raising: every PIR rise is fetched exactly once, nothing else is,
    and neither the fd counts nor the kernel's objects grow.

    How many storm rounds and MSIs fall into those switches depends on how
    the machine schedules the storm thread; the switching goes on past
    1,000 (at most as many again) until the storm has raised more rounds,
    and the bindings have taken more MSIs, than there were switches."""
    switches = int(os.environ.get("KVMLU_SWITCHES", "1000"))
    base = dev.query()
    rig = Rig(edus)
    vmms = [VmmProc("shared"), VmmProc("shared")]
    vmms[0].call("setup", fds=rig.device_fds(), targets=TARGETS, nr_vcpus=2)
    taken: dict[tuple[int, int], int] = {}
    fds_seen: list[list[int]] = [[], []]
    stop = threading.Event()
    raised = [0]

    def storm() -> None:
        while not stop.is_set():
            for e in edus:
                e.raise_irq(syscall=True)
            raised[0] += 1

    def take(reply: dict[str, Any]) -> None:
        for _, v, vecs in reply["deliveries"]:
            for x in vecs:
                taken[(v, x)] = taken.get((v, x), 0) + 1

    def switch(i: int) -> None:
        old, new = vmms[i % 2], vmms[(i + 1) % 2]
        take(old.call("deliver"))
        old.call("export_begin")
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b:
            old.call("export_scm", fds=[a.fileno()])
            new.call("import_scm", fds=[b.fileno()])
        fds_seen[i % 2].append(old.call("release")["nr_fds"])

    def signals_so_far(i: int) -> int:
        return sum(s["signals"] for s in vmms[i % 2].call("stats")["bindings"])

    th = threading.Thread(target=storm)
    th.start()
    done = 0
    try:
        while done < switches or raised[0] <= switches or signals_so_far(done) <= switches:
            assert done < 2 * switches, (
                f"the storm made no progress: {raised[0]} rounds, "
                f"{signals_so_far(done)} MSIs in {done} switches"
            )
            switch(done)
            done += 1
    finally:
        stop.set()
        th.join()
    owner = vmms[done % 2]
    for i in range(3):
        rig.raise_(i)  # landed after the storm: must be in the last fetch
    last = owner.call("deliver")
    assert {(v, x) for _, v, xs in last["deliveries"] for x in xs} == set(TARGETS)
    take(last)
    rises = sum(s["posted"] for s in owner.call("stats")["bindings"])
    signals = sum(s["signals"] for s in owner.call("stats")["bindings"])
    for v in vmms:
        v.close()

    assert set(taken) == set(TARGETS), f"spurious vectors: {set(taken) - set(TARGETS)}"
    assert sum(taken.values()) == rises, f"{rises} PIR rises, {sum(taken.values())} taken"
    assert raised[0] > switches, f"storm too thin: {raised[0]} rounds"
    assert signals > switches, f"{signals} MSIs"
    for counts in fds_seen:
        assert counts[0] == counts[-1], f"fd count moved: {counts[0]} -> {counts[-1]}"
    _no_leak(dev, base.nr_tables, base.nr_bindings)
    print(f"{done} switches, {raised[0]} storm rounds, {signals} MSIs, {rises} PIR rises")


def _modprobe_back(name: str) -> None:
    if not Path(f"/sys/module/{name}").exists():
        subprocess.run(["insmod", str(module_path(name))], check=True)
        wait_until(lambda: Path(f"/dev/{name}").exists(), TIMEOUT, f"/dev/{name}")


@pytest.mark.parametrize("old_v,new_v", [(1, 2), (2, 1)], ids=["v1-to-v2", "v2-to-v1"])
def test_vapic_swap_across_vmms(edus: list[Edu], old_v: int, new_v: int) -> None:
    """Stage 1: an old VMM on vAPIC v<old> takes some interrupts (ISR, IRR and PIR all
    non-empty) and saves its state into a memfd; it exits while the devices keep
    raising, and its module unloads. Stage 2: a new VMM on v<new> imports the tables,
    loads the state, finds IRR and ISR as saved and everything raised meanwhile
    pending: the checker reports nothing lost, nothing spurious."""
    rig = Rig(edus)
    old = VmmProc("shared", vapic=old_v)
    old.call("setup", fds=rig.device_fds(), targets=TARGETS, nr_vcpus=2)
    for i in (0, 1, 2):
        rig.raise_(i)
    rig.record(old.call("deliver"), "old")  # SYNC, then one ACK per vCPU
    rig.raise_(0)
    rig.record(old.call("deliver"), "old")
    rig.raise_(1)  # left in PIR
    regs = old.call("vapic_regs")["regs"]
    assert regs[1]["isr"] and regs[1]["irr"], f"stage 1 wants ISR and IRR busy: {regs}"
    t0 = time.monotonic()
    old.call("export_begin", vapic_format=min(old_v, new_v))
    rig.raise_(2)
    name = f"vapic-{old_v}-{new_v}"
    old.call("export_session", name=name)
    old.close()
    unload(old_v)  # the old VMM's vAPIC objects are gone with it
    try:
        rig.raise_(0)
        new = VmmProc("shared", vapic=new_v)
        new.call("import_session", name=name)
        t1 = time.monotonic()
        assert new.call("vapic_regs")["regs"] == regs, "IRR and ISR arrived as saved"
        finish_new(rig, new)
    finally:
        _modprobe_back(f"kvmlu_vapic_v{old_v}")
    r = check(rig.raises, rig.fetches, (t0, t1))
    assert r.ok, r.text()
