"""Live-upgrade the inner guest's QEMU with cpr-transfer, raising MSIs in every pause.

One upgrade (:func:`upgrade`) hands the running guest from the QEMU that
runs it to a new QEMU process, the way QEMU 10.2's cpr-transfer does it
(``docs/devel/migration/CPR.rst``): the new QEMU starts with the same
command line plus ``-incoming`` for the main and the cpr channel and waits
on the cpr channel; the old one is told ``migrate`` in mode
``cpr-transfer``, sends every preserved file descriptor (guest RAM as a
memfd, VFIO's container, group, device and vector eventfds, and, with the
kvmlu object, its table, notification eventfds and bindings) over the cpr
channel, stops the guest (QMP ``STOP``), sends device state over the main
channel, and the new QEMU loads it and runs the guest (``RESUME``).

The cpr channel's listening socket is made here and handed to the new QEMU
as a file descriptor, so the old QEMU can never connect before the new one
listens.

**The raise inside the pause.** With ``hold``, the new QEMU starts with
``-S``: after the old QEMU stopped the guest and the new one has loaded it
(``MIGRATION`` ``completed`` on the old side), nobody runs a vCPU until this
driver sends ``cont``. In between it raises one MSI through the edu
function's BAR and waits until the nested host has taken it (the function's
vfio-pci MSI count rose): the raise verifiably landed inside the pause. The
pause reported by a held upgrade includes that wait; the figures that time
the hand-over come from upgrades without ``hold``
(:attr:`Upgrade.pause_ms`: new ``RESUME`` minus old ``STOP``, both stamped
by QEMU on the host's wall clock).

**Faults** (``fault``): ``new-fails`` starts a new QEMU that exits once
it has read the cpr channel and creates its devices (a ``-device`` property
it refuses); ``new-dies`` kills the new QEMU once the old one
has stopped the guest; ``old-dies`` kills the old QEMU once it has
completed its save. In the first two the old QEMU must run the guest on;
in the third the new one must.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pyctl.kvmlu import Device
from pyctl.qemu import QemuError
from pyctl.qemu.bar import SysfsBar, msi_irq_count
from pyctl.qemu.qmp import Qmp, QmpError
from pyctl.qemu.raising import REG_IRQ_RAISE
from pyctl.qemu.run import InnerGuest, InnerOptions

Fault = Literal["none", "new-fails", "new-dies", "old-dies"]
FAULTS: tuple[Fault, ...] = ("none", "new-fails", "new-dies", "old-dies")

#: How long a migration may take before the upgrade is called failed.
MIGRATE_TIMEOUT = 120.0
#: How long to wait for a raise to reach the nested host or the guest.
LAND_TIMEOUT = 10.0


@dataclass
class Upgrade:
    """What one upgrade did and saw."""

    index: int
    fault: str = "none"
    #: Who runs the guest afterwards: "new", "old" or "none".
    runner: str = "none"
    ok: bool = False
    error: str | None = None
    #: QEMU's wall-clock stamps (s) of the old QEMU's STOP and the runner's RESUME.
    stop_time: float | None = None
    resume_time: float | None = None
    #: RESUME minus STOP: the guest's pause, in ms.
    pause_ms: float | None = None
    #: The old QEMU's query-migrate downtime (ms) and total time (ms).
    qemu_downtime_ms: float | None = None
    qemu_total_ms: float | None = None
    #: MSIs raised inside the pause that verifiably landed inside it.
    window_raises: int = 0
    #: What the guest's count rose by from before the upgrade to after it
    #: (only the window raises were raised in between).
    counted: int | None = None
    #: kvmlu QUERY before and after: tables and bindings (none may be new).
    kvmlu_before: dict[str, int] | None = None
    kvmlu_after: dict[str, int] | None = None
    #: Wall seconds of the whole upgrade, as the driver saw it.
    seconds: float = 0.0

    def text(self) -> str:
        head = f"upgrade {self.index}"
        if self.fault != "none":
            head += f" ({self.fault})"
        if self.error:
            return f"{head}: FAIL: {self.error}"
        pause = f"pause {self.pause_ms:.1f} ms" if self.pause_ms is not None else "no pause"
        qd = (
            f", QEMU downtime {self.qemu_downtime_ms:.0f} ms"
            if self.qemu_downtime_ms is not None
            else ""
        )
        return (
            f"{head}: {'OK' if self.ok else 'FAIL'}: {self.runner} QEMU runs the guest, "
            f"{pause}{qd}; {self.window_raises} raised in the pause, guest counted "
            f"{self.counted}"
        )


def kvmlu_counts() -> dict[str, int] | None:
    """kvmlu's tables and bindings (QUERY), or None without /dev/kvmlu."""
    try:
        with Device() as dev:
            q = dev.query()
    except OSError:
        return None
    return {"tables": q.nr_tables, "bindings": q.nr_bindings}


def listening_socket(path: Path) -> socket.socket:
    """A UNIX stream socket listening at *path*, inheritable by a child."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    sock.set_inheritable(True)
    return sock


def successor_options(opts: InnerOptions, workdir: Path, cpr_fd: int, hold: bool) -> InnerOptions:
    """The new QEMU's options: the same machine, its own sockets, ``-incoming``."""
    main = workdir / "main.sock"
    return dataclasses.replace(
        opts,
        workdir=workdir,
        incoming=[
            f"unix:{main}",
            f"cpr,addr.transport=socket,addr.type=fd,addr.str={cpr_fd}",
        ],
        paused=hold,
    )


def _migrate(qmp: Qmp, main: Path, cpr: Path) -> None:
    qmp.execute(
        "migrate-set-capabilities",
        capabilities=[
            {"capability": "return-path", "state": True},
            {"capability": "events", "state": True},
        ],
    )
    qmp.execute("migrate-set-parameters", mode="cpr-transfer")
    qmp.execute(
        "migrate",
        channels=[
            {
                "channel-type": "main",
                "addr": {"transport": "socket", "type": "unix", "path": str(main)},
            },
            {
                "channel-type": "cpr",
                "addr": {"transport": "socket", "type": "unix", "path": str(cpr)},
            },
        ],
    )


def _migration_end(qmp: Qmp, since: int, timeout: float) -> str:
    """Wait for the old QEMU's migration to end; its final status."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise QmpError(f"migration did not end within {timeout:g} s")
        ev = qmp.wait_event("MIGRATION", left, since=since)
        since = qmp.events.index(ev) + 1
        status = ev.data.get("status")
        if status in ("completed", "failed", "cancelled"):
            return str(status)


def _raise_in_pause(bar: SysfsBar) -> bool:
    """Raise one MSI; whether the nested host took it within LAND_TIMEOUT."""
    before = msi_irq_count(bar.bdf)
    bar.write32(REG_IRQ_RAISE, 1)
    deadline = time.monotonic() + LAND_TIMEOUT
    while msi_irq_count(bar.bdf) <= before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _wait_count(guest: InnerGuest, target: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (n := guest.total()) < target and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


@dataclass
class Upgrader:
    """Upgrades one running inner guest, again and again."""

    guest: InnerGuest
    qmp: Qmp
    bar: SysfsBar
    #: Where each new QEMU gets its sockets and logs: base / "gen-<i>".
    base: Path
    hold: bool = True
    #: Wait this long after the count rose, for a late duplicate to show.
    settle: float = 0.5
    results: list[Upgrade] = field(default_factory=list)
    _gen: int = 0

    def upgrade(self, fault: Fault = "none") -> Upgrade:
        """One upgrade (see the module docstring); the guest's runner after it is kept."""
        self._gen += 1
        res = Upgrade(index=self._gen, fault=fault)
        self.results.append(res)
        started = time.monotonic()
        try:
            self._upgrade(res)
        except (QemuError, OSError) as e:
            res.error = f"{type(e).__name__}: {e}"
        res.seconds = time.monotonic() - started
        return res

    def _upgrade(self, res: Upgrade) -> None:
        old, qold = self.guest, self.qmp
        work = self.base / f"gen-{self._gen}"
        work.mkdir(parents=True, exist_ok=True)
        cpr_path = work / "cpr.sock"
        res.kvmlu_before = kvmlu_counts()
        base_count = old.total()
        lsock = listening_socket(cpr_path)
        nopts = successor_options(old.opts, work, lsock.fileno(), self.hold)
        if res.fault == "new-fails":
            # A property vfio-pci does not have: the new QEMU exits at start.
            nopts.vfio_props = [*nopts.vfio_props, "x-kvmlu-no-such-property=on"]
        new = InnerGuest(nopts)
        try:
            new.start_incoming(pass_fds=[lsock.fileno()])
        finally:
            lsock.close()
        mark = len(qold.events)
        try:
            if res.fault == "new-fails":
                self._new_fails(res, qold, new, work, mark)
            else:
                _migrate(qold, work / "main.sock", cpr_path)
                # The new QEMU's monitor exists once it has the cpr state; an
                # unheld one may RESUME soon after, so listen from now on.
                qnew = Qmp.connect(new.opts.qmp_path, MIGRATE_TIMEOUT)
                try:
                    self._hand_over(res, old, qold, new, qnew, mark)
                except BaseException:
                    qnew.close()
                    raise
        except BaseException:
            new.close()
            raise
        finally:
            cpr_path.unlink(missing_ok=True)
        self._check(res, base_count)

    def _new_fails(self, res: Upgrade, qold: Qmp, new: InnerGuest, work: Path, mark: int) -> None:
        """The new QEMU exits at start-up, once it has read the cpr channel and
        creates its devices: the old QEMU's migration fails and it runs on."""
        try:
            _migrate(qold, work / "main.sock", work / "cpr.sock")
        except QmpError:
            status = "failed"  # refused at once: nobody listens on the cpr channel
        else:
            status = _migration_end(qold, mark, MIGRATE_TIMEOUT)
        assert new.proc is not None
        new.proc.wait(MIGRATE_TIMEOUT)
        new.close()
        res.window_raises += int(_raise_in_pause(self.bar))
        self._keep_old(res, status)

    def _hand_over(  # noqa: PLR0917
        self, res: Upgrade, old: InnerGuest, qold: Qmp, new: InnerGuest, qnew: Qmp, mark: int
    ) -> None:
        fault = res.fault
        stop = qold.wait_event("STOP", MIGRATE_TIMEOUT, since=mark)
        res.stop_time = stop.time
        if fault == "new-dies":
            # The old QEMU stopped the guest: raise into the pause, then the
            # new QEMU dies while it loads; the old must resume with the MSI.
            res.window_raises += int(_raise_in_pause(self.bar))
            assert new.proc is not None
            new.proc.send_signal(signal.SIGKILL)
            new.close()
            qnew.close()
            status = _migration_end(qold, mark, MIGRATE_TIMEOUT)
            self._keep_old(res, status)
            return
        status = _migration_end(qold, mark, MIGRATE_TIMEOUT)
        if status != "completed":
            new.close()
            raise QemuError(f"cpr-transfer ended {status}: {self._why(qold)}")
        with contextlib.suppress(QmpError):
            info = qold.execute("query-migrate")
            res.qemu_downtime_ms = info.get("downtime")
            res.qemu_total_ms = info.get("total-time")
        if fault == "old-dies":
            assert old.proc is not None
            old.proc.send_signal(signal.SIGKILL)
        if self.hold:
            res.window_raises += int(_raise_in_pause(self.bar))
            qnew.execute("cont")
        resume = qnew.wait_event("RESUME", MIGRATE_TIMEOUT)
        res.resume_time = resume.time
        res.pause_ms = 1000 * (resume.time - stop.time)
        if fault != "old-dies":
            with contextlib.suppress(QmpError, OSError):
                qold.execute("quit")
        qold.close()
        old.detach()
        old.close()
        new.adopt()
        self.guest, self.qmp = new, qnew
        res.runner = "new"

    def _keep_old(self, res: Upgrade, status: str) -> None:
        """After a failed hand-over the old QEMU must run the guest on."""
        if status != "failed":
            raise QemuError(f"the migration ended {status}, not failed, though the new QEMU died")
        # QEMU resumes a guest whose migration failed on its own, but after it
        # reports the failure: wait for it to be running again.
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while (state := self.qmp.execute("query-status").get("status")) != "running":
            if time.monotonic() > deadline:
                raise QemuError(f"the old QEMU is {state} {MIGRATE_TIMEOUT:g} s after the failure")
            time.sleep(0.02)
        res.runner = "old"

    @staticmethod
    def _why(qmp: Qmp) -> str:
        with contextlib.suppress(QmpError):
            info = qmp.execute("query-migrate")
            return str(info.get("error-desc", info.get("status")))
        return "?"

    def _check(self, res: Upgrade, base_count: int) -> None:
        want = base_count + res.window_raises
        _wait_count(self.guest, want, LAND_TIMEOUT)
        time.sleep(self.settle)
        res.counted = self.guest.total() - base_count
        res.kvmlu_after = kvmlu_counts()
        res.ok = res.counted == res.window_raises and res.runner in ("new", "old")
        if res.fault == "none" and res.runner != "new":
            res.ok = False


def spaced_raises(guest: InnerGuest, bar: SysfsBar, n: int) -> tuple[int, int]:
    """Raise *n* MSIs one at a time, each after the previous was counted; (raised, counted)."""
    base = guest.total()
    for i in range(n):
        bar.write32(REG_IRQ_RAISE, 1)
        _wait_count(guest, base + i + 1, LAND_TIMEOUT)
    time.sleep(0.2)
    return n, guest.total() - base


def summary(results: list[Upgrade]) -> dict[str, Any]:
    """p50/p90/max of the pauses, and the totals of the checks."""
    pauses = sorted(r.pause_ms for r in results if r.pause_ms is not None)

    def q(f: float) -> float | None:
        if not pauses:
            return None
        return pauses[min(len(pauses) - 1, max(0, round(f * len(pauses)) - 1))]

    return {
        "upgrades": len(results),
        "ok": sum(r.ok for r in results),
        "window_raises": sum(r.window_raises for r in results),
        "counted": sum(r.counted or 0 for r in results),
        "pause_ms": {
            "n": len(pauses),
            "p50": q(0.5),
            "p90": q(0.9),
            "max": pauses[-1] if pauses else None,
        },
    }
