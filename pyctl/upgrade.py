"""The live upgrade: old VMM to new VMM under a stream of real MSIs.

``kvmlu upgrade`` (in the test VM) opens the edu functions through VFIO,
starts a first VMM (:mod:`pyctl.livevmm`) with V vCPU threads, raises MSIs
from a device thread the whole time, and upgrades N times: each upgrade
starts a new VMM process, moves everything over in the chosen strategy and
with the chosen optimisations, and releases the old one. At the end the
last VMM takes what is pending and the checker compares every raise with
every delivery of every VMM.

Downtime is vCPU downtime: from the moment the old VMM's vCPUs stop taking
interrupts (the pause) to the moment the new VMM's vCPUs run (the last
thread started). It is broken into

``suspend``   pause until the last old vCPU thread stopped;
``save``      until the old VMM saved the vAPIC and the device state;
``load``      until the new VMM loaded both (overlaps the save when the
              loading is concurrent: then only what is left after the save);
``startup``   the rest: starting and preparing the new VMM when it was not
              started beforehand, binding, attaching, starting the threads.

New VMM processes are forked from a warm template process (a "zygote" that
has imported everything): the same start-up for every upgrade, and a lower
bound of the start-up of a freshly executed VMM, which :func:`exec_startup`
measures apart.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyctl.argtypes import int_range
from pyctl.check import Fetch, Raise, Report, check, dump_log
from pyctl.edu import Edu, find_vfio_edu
from pyctl.errors import KvmluError, RunError, SetupError, UsageError
from pyctl.livevmm import (
    STRATEGIES,
    LiveVmm,
    Optimisations,
    add_optimisations_argument,
    handoff_fds,
    max_vcpus,
    serve,
)
from pyctl.metrics import percentile
from pyctl.vmm import SCM_MAX_FD, recv_msg, send_msg

LAND_TIMEOUT = 5.0
REPLY_TIMEOUT = 120.0
VECTORS = (0x41, 0x62, 0x73, 0x84, 0x95, 0xA6)


def targets_for(nr_vcpus: int, nr_devices: int) -> list[tuple[int, int]]:
    """Device i -> (vCPU, vector): spread over the vCPUs, first and last included."""
    out = []
    for i in range(nr_devices):
        vcpu = 0 if nr_devices == 1 else i * (nr_vcpus - 1) // (nr_devices - 1)
        out.append((vcpu, VECTORS[i % len(VECTORS)]))
    return out


class VmmError(RunError):
    """A VMM refused a command or went away; ``handle`` says which."""

    def __init__(self, message: str, handle: VmmHandle | None = None) -> None:
        super().__init__(message)
        self.handle = handle


class VmmHandle:
    """A VMM process as the controller sees it: its pid and control socket."""

    def __init__(
        self, pid: int, ctl: socket.socket, proc: subprocess.Popen[bytes] | None = None
    ) -> None:
        self.pid = pid
        self.ctl = ctl
        self.proc = proc
        self.final: dict[str, Any] | None = None  # its last "stop" reply, if taken early
        self.ctl.settimeout(REPLY_TIMEOUT)

    def send(self, cmd: str, fds: Sequence[int] = (), **kw: Any) -> None:
        try:
            send_msg(self.ctl, {"cmd": cmd, **kw}, fds)
        except OSError as e:
            raise VmmError(f"{cmd}: the VMM (pid {self.pid}) went away: {e}", self) from e

    def recv(self, what: str) -> tuple[dict[str, Any], list[int]]:
        try:
            reply, fds = recv_msg(self.ctl)
        except (EOFError, ConnectionError, OSError) as e:
            raise VmmError(f"{what}: the VMM (pid {self.pid}) went away: {e}", self) from e
        if not reply.get("ok"):
            raise VmmError(f"{what}: {reply.get('error')}", self)
        return reply, fds

    def call(
        self, cmd: str, fds: Sequence[int] = (), **kw: Any
    ) -> tuple[dict[str, Any], list[int]]:
        self.send(cmd, fds, **kw)
        return self.recv(cmd)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.close()

    def close(self) -> None:
        try:
            self.send("exit")
            self.recv("exit")
        except (VmmError, OSError):
            pass
        self.ctl.close()
        if self.proc is not None:
            self.proc.wait(timeout=30)


class Zygote:
    """A warm process that forks new VMMs on request.

    It is started before the first VMM, single-threaded, holding no kvmlu
    object; a child it forks runs :func:`pyctl.livevmm.serve` on the
    control socket sent with the request and exits when it is done.
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "pyctl.upgrade", "--zygote", str(theirs.fileno())]
        self.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), close_fds=True)
        theirs.close()
        self.ctl = ours

    def spawn(self, strategy: str, vapic: int, opts: Optimisations) -> VmmHandle:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        doc = {"strategy": strategy, "vapic": vapic, "opts": opts.label()}
        send_msg(self.ctl, doc, [theirs.fileno()])
        theirs.close()
        reply, _ = recv_msg(self.ctl)
        return VmmHandle(int(reply["pid"]), ours)

    def close(self) -> None:
        self.ctl.close()  # EOF: the zygote exits
        self.proc.wait(timeout=30)


def zygote_main(fd: int) -> int:
    """The zygote's loop: fork one VMM per request; children are reaped by the kernel."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    with socket.socket(fileno=fd) as ctl:
        while True:
            try:
                doc, fds = recv_msg(ctl)
            except (EOFError, ConnectionError):
                return 0
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    ctl.close()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    vmm = LiveVmm(
                        doc["strategy"], int(doc["vapic"]), Optimisations.parse(doc["opts"])
                    )
                    with socket.socket(fileno=fds[0]) as child:
                        serve(child, vmm)
                    code = 0
                finally:
                    os._exit(code)
            for f in fds:
                os.close(f)
            send_msg(ctl, {"pid": pid})


def exec_startup(n: int = 3) -> list[float]:
    """Seconds from exec of a fresh VMM process to its first reply, ``n`` times."""
    out = []
    for _ in range(n):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        t0 = time.monotonic()
        argv = [sys.executable, "-m", "pyctl.livevmm", "--control-fd", str(theirs.fileno())]
        proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), close_fds=True)
        theirs.close()
        send_msg(ours, {"cmd": "exit"})
        recv_msg(ours)
        out.append(time.monotonic() - t0)
        ours.close()
        proc.wait(timeout=30)
    return out


@dataclass
class Raiser:
    """The device side: raises MSIs round robin, one in flight, until stopped.

    Each raise is stamped when issued and when its MSI had landed (the
    host's count of the device's MSI moved). An MSI the host never handles
    (sent while VFIO re-requested the IRQ, as ``naive`` does) is stamped as
    landed when the wait gives up (``land_timeout`` seconds): no VMM can
    have received it, so the checker counts it lost. ``unlanded`` counts them;
    ``given_up`` holds them (also in ``raises``).
    """

    edus: list[Edu]
    targets: list[tuple[int, int]]
    interval: float = 0.0
    land_timeout: float = LAND_TIMEOUT
    raises: list[Raise] = field(default_factory=list)
    error: str | None = None
    unlanded: int = 0
    given_up: list[Raise] = field(default_factory=list)
    land_max: float = 0.0  # the slowest landing, in seconds: the timeout's margin

    def __post_init__(self) -> None:
        # One raise in flight: landing is told by a count. Reentrant, so that
        # a controller that holds it to keep the device quiet may still raise.
        self.lock = threading.RLock()
        self._counters: dict[int, MsiCounter] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for c in self._counters.values():
            c.close()
        if self.error:
            raise RunError(self.error)

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                k = i % len(self.edus)
                self.raise_one(k)
                i += 1
                if self.interval:
                    self._stop.wait(self.interval)
        except Exception as e:  # reported by stop()
            self.error = f"raiser: {type(e).__name__}: {e}"

    def raise_one(self, k: int) -> None:
        """Raise device ``k``'s MSI and wait until it has landed (any thread)."""
        with self.lock:
            self._raise_one(k)

    def _raise_one(self, k: int) -> None:
        edu = self.edus[k]
        counter = self._counters.setdefault(k, MsiCounter(edu.bdf))
        before = counter.count()
        issued = time.monotonic()
        edu.raise_irq()
        deadline = issued + self.land_timeout
        landed = True
        while counter.count() == before:
            # The count again after the clock: a raiser that lost its CPU
            # between the two reads must not take a landed MSI for a lost one.
            if time.monotonic() > deadline and counter.count() == before:
                landed = False
                counter.close()  # the IRQ may have changed
                break
            # Poll gently: a spinning device thread would take a guest CPU
            # from the VMMs. The stamp is late by this much at most.
            time.sleep(0.0002)
        else:
            self.land_max = max(self.land_max, time.monotonic() - issued)
        r = Raise(time.monotonic(), *self.targets[k], issued=issued)
        self.raises.append(r)
        if not landed:
            self.unlanded += 1
            self.given_up.append(r)


def msi_irq(bdf: str) -> int | None:
    """The Linux IRQ of ``bdf``'s VFIO MSI, from /proc/interrupts (None: not enabled)."""
    with open("/proc/interrupts") as f:
        for line in f:
            if bdf in line and "vfio-msi" in line:
                return int(line.split(":", 1)[0])
    return None


class MsiCounter:
    """How many MSIs of a device the host has handled.

    It reads /sys/kernel/irq/N/per_cpu_count: a few bytes, where
    /proc/interrupts formats every IRQ of every CPU, which under TCG costs a
    guest CPU when polled. The IRQ stays the same while MSI stays enabled
    (re-programming the eventfd keeps it); it is looked up again otherwise.
    """

    def __init__(self, bdf: str) -> None:
        self.bdf = bdf
        self._fd: int | None = None

    def _open(self) -> int:
        irq = msi_irq(self.bdf)
        if irq is None:
            raise RunError(f"{self.bdf}: no VFIO MSI enabled")
        self._fd = os.open(f"/sys/kernel/irq/{irq}/per_cpu_count", os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def count(self) -> int:
        fd = self._fd if self._fd is not None else self._open()
        try:
            data = os.pread(fd, 4096, 0)
        except OSError:
            self.close()
            data = os.pread(self._open(), 4096, 0)
        return sum(int(x) for x in data.split(b","))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class Downtime:
    """One upgrade's stamps, and its downtime and phases in milliseconds."""

    pause: float
    suspended: float
    saved: float
    loaded: float
    running: float
    rolled_back: bool = False
    started_in_window: float = 0.0  # seconds spent starting the new VMM after the save
    detail: dict[str, float] = field(default_factory=dict)  # every stamp, both sides
    vapic_handed: bool = False  # the new VMM inherited the vAPIC object (no blob)
    # The new VMM's thread at some of its stamps: (CPU seconds, involuntary
    # context switches, minor page faults) so far.
    use: dict[str, tuple[float, int, int]] = field(default_factory=dict)

    @property
    def total_ms(self) -> float:
        return (self.running - self.pause) * 1e3

    def phases_ms(self) -> dict[str, float]:
        loaded = max(self.loaded, self.saved)
        return {
            "suspend": (self.suspended - self.pause) * 1e3,
            "save": (self.saved - self.suspended) * 1e3,
            "load": (loaded - self.saved - self.started_in_window) * 1e3,
            "startup": (self.running - loaded + self.started_in_window) * 1e3,
        }


@dataclass(frozen=True)
class Window:
    """One upgrade's window as the device saw it, and the raises stamped inside.

    The window runs from the old VMM's pause to the moment the VMM that
    runs afterwards let its vCPUs run: the new one, or the old one after a
    rollback (an upgrade rolled back before the pause has an empty window).
    ``landed`` are the raises whose MSI the raiser saw the host handle, with
    the landing stamp inside the window; ``unlanded`` the raises it gave up
    on after its landing timeout, stamped inside the window (when it gave
    up): whether the host ever handled those is not known.
    """

    pause: float
    resume: float
    rolled_back: bool = False
    landed: tuple[Raise, ...] = ()
    unlanded: tuple[Raise, ...] = ()


def windows_of(
    downtimes: Sequence[Downtime], raises: Sequence[Raise], given_up: Sequence[Raise]
) -> list[Window]:
    """Each upgrade's :class:`Window` with the raises whose stamps lie inside it."""
    unsure = set(given_up)
    out = []
    for d in downtimes:
        inside = [r for r in raises if d.pause <= r.t <= d.running]
        landed = tuple(r for r in inside if r not in unsure)
        unlanded = tuple(r for r in inside if r in unsure)
        out.append(Window(d.pause, d.running, d.rolled_back, landed, unlanded))
    return out


@dataclass
class RunResult:
    """What :func:`run` measured: each upgrade's downtime and window, and the checker's verdict."""

    strategy: str
    optimisations: str
    nr_vcpus: int
    downtimes: list[Downtime]
    report: Report
    raises: int
    deliveries: int
    acked: int
    unlanded: int = 0
    timeline: tuple[list[Raise], list[Fetch]] = ([], [])
    land_ms_max: float = 0.0  # the slowest landing of a raise that landed
    windows: list[Window] = field(default_factory=list)  # one per upgrade, in order

    def summary(self) -> dict[str, Any]:
        ms = sorted(d.total_ms for d in self.downtimes if not d.rolled_back)
        phases = (
            {
                k: statistics.median(d.phases_ms()[k] for d in self.downtimes if not d.rolled_back)
                for k in ("suspend", "save", "load", "startup")
            }
            if ms
            else {}
        )
        return {
            "strategy": self.strategy,
            "optimisations": self.optimisations,
            "vcpus": self.nr_vcpus,
            "upgrades": len(self.downtimes),
            "rolled_back": sum(d.rolled_back for d in self.downtimes),
            "vapic_handed": sum(d.vapic_handed for d in self.downtimes),
            "downtime_ms": _percentiles(ms),
            "phases_p50_ms": phases,
            "raised": self.raises,
            "never_landed": self.unlanded,
            "land_ms_max": round(self.land_ms_max, 3),
            "deliveries": self.deliveries,
            "acked": self.acked,
            "lost": self.report.lost,
            "spurious": self.report.spurious,
            "duplicated": self.report.duplicated,
        }


def _print_upgrade(n: int, i: int, dt: Downtime) -> None:
    """One line per upgrade of ``kvmlu upgrade``, as it ends."""
    how = " (rolled back)" if dt.rolled_back else ""
    print(f"  upgrade {i + 1}/{n}: vCPU downtime {dt.total_ms:.2f} ms{how}", flush=True)


#: Below this many samples a p99 is one of the largest few: say max and n.
P99_MIN_SAMPLES = 100


def downtime_text(d: dict[str, float], n: int) -> str:
    """p50 and max over n samples, and p99 only where n makes it one."""
    p99 = f", p99 {d['p99']:.2f} ms" if n >= P99_MIN_SAMPLES else ""
    return f"p50 {d['p50']:.2f} ms{p99}, max {d['max']:.2f} ms (n={n})"


def _percentiles(xs: list[float]) -> dict[str, float]:
    """p50, p99, max and min of sorted *xs* (empty: none)."""
    if not xs:
        return {}
    return {"p50": percentile(xs, 0.5), "p99": percentile(xs, 0.99), "max": xs[-1], "min": xs[0]}


def upgrade(  # noqa: PLR0917 - the run's parameters, passed through
    old: VmmHandle,
    zygote: Zygote,
    strategy: str,
    vapic: int,
    opts: Optimisations,
    fail: str | None = None,
    in_window: Callable[[], None] | None = None,
) -> tuple[VmmHandle, Downtime]:
    """Move from ``old`` to a new VMM; if the new one fails, roll back to ``old``.

    ``in_window`` is called once the old VMM has saved and before the new
    one may run (a test raises an interrupt there): the old VMM holds its
    last "saved" signal back until it returns, which costs a round trip.

    Returns the VMM that runs afterwards and the upgrade's stamps. ``fail``
    injects a fault: ``start`` (the new VMM dies before it prepares),
    ``load`` (it dies half-way through loading the state) or ``old`` (the
    old VMM preserves everything in a session and is killed after the save;
    the new one, started after it, completes from the session).
    """
    if fail == "old":
        return _upgrade_old_dies(old, zygote, strategy, vapic, opts)
    new: VmmHandle | None = None
    stamps: dict[str, float] | None = None
    started_in_window = 0.0

    def start_new() -> VmmHandle:
        h = zygote.spawn(strategy, vapic, opts)
        try:
            if fail == "start":
                os.kill(h.pid, signal.SIGKILL)  # dies before it could prepare
            reply, got = old.call("export", vapic=vapic)
            try:
                h.call("prepare", got, manifest=reply["manifest"])
            finally:
                for fd in got:
                    os.close(fd)
        except BaseException:
            h.kill()  # whoever failed, this one is not going to run
            raise
        return h

    try:
        if opts.prestart:
            new = start_new()
        if new is not None and opts.concurrent:
            # First: it only waits for the old VMM's signals, and the old
            # VMM, once paused, must not wait for the controller to get a CPU.
            new.send("takeover", fail=fail)
        old.send("pause_save", hold=in_window is not None)
        stamps = old.recv("pause_save")[0]["t"]
        if in_window is not None:
            in_window()
            old.call("let_go")
        if new is None:
            t_start = time.monotonic()
            new = start_new()
            started_in_window = time.monotonic() - t_start
            new.send("takeover", fail=fail)
        elif not opts.concurrent:
            new.send("takeover", fail=fail)
        took = new.recv("takeover")[0]
    except VmmError as e:
        if e.handle is old:
            raise
        print(f"kvmlu upgrade: rolling back: {e}", file=sys.stderr)
        if new is not None:
            new.kill()
        if stamps is None:  # the old VMM never paused: no downtime at all
            old.call("abandon")
            now = time.monotonic()
            return old, Downtime(now, now, now, now, now, rolled_back=True)
        r = old.call("resume")[0]["t"]
        return old, Downtime(
            stamps["pause"],
            stamps["suspended"],
            stamps["saved"],
            r["resume"],
            r["running"],
            rolled_back=True,
        )
    return new, _downtime(stamps, took, started_in_window)


def _downtime(saved: dict[str, float], reply: dict[str, Any], started: float) -> Downtime:
    """An upgrade's downtime from the old VMM's ``pause_save`` stamps and the new
    one's ``takeover`` reply (its stamps in ``t``); ``started``: seconds spent
    starting the new VMM after the save."""
    took: dict[str, float] = reply["t"]
    return Downtime(
        saved["pause"],
        saved["suspended"],
        saved["saved"],
        took["loaded"],
        took["running"],
        started_in_window=started,
        vapic_handed=bool(reply.get("vapic_inherited", False)),
        use={k: (float(c), int(n), int(f)) for k, (c, n, f) in reply.get("use", {}).items()},
        detail={
            **{f"old_{k}": v for k, v in saved.items()},
            **{f"new_{k}": v for k, v in took.items()},
        },
    )


def _upgrade_old_dies(
    old: VmmHandle, zygote: Zygote, strategy: str, vapic: int, opts: Optimisations
) -> tuple[VmmHandle, Downtime]:
    """The old VMM saves, preserves everything in a session and is killed; the
    new one is started afterwards and completes from the session."""
    name = f"kvmlu-upgrade-{old.pid}"
    stamps = old.call("pause_save")[0]["t"]
    old.call("preserve", name=name)
    old.final = old.call("stop", drain=False)[0]  # what it delivered, before it dies
    old.kill()
    t_start = time.monotonic()
    new = zygote.spawn(strategy, vapic, opts)
    new.call("prepare_session", name=name)
    started = time.monotonic() - t_start
    took = new.call("takeover")[0]
    return new, _downtime(stamps, took, started)


def _wait_raises(raiser: Raiser, n: int) -> None:
    """Until the device has raised ``n`` more interrupts."""
    target = len(raiser.raises) + n
    deadline = time.monotonic() + raiser.land_timeout * n + 1.0
    while len(raiser.raises) < target:
        if raiser.error:
            raise RunError(raiser.error)
        if time.monotonic() > deadline:
            raise TimeoutError("the device raised nothing")
        time.sleep(0.001)


def _held(
    raiser: Raiser,
    quiet: bool,
    vmm: VmmHandle,
    go: Callable[[], tuple[VmmHandle, Downtime]],
) -> tuple[VmmHandle, Downtime]:
    """``go()``, one upgrade of ``vmm``; ``quiet``: with the device stream held
    throughout and both VMMs settled, ``vmm`` before and the one that runs
    afterwards after (see :func:`run`)."""
    if not quiet:
        return go()
    with raiser.lock:
        vmm.call("settle")
        new, dt = go()
        new.call("settle")
    return new, dt


def run(  # noqa: PLR0915 - the run's one loop, its set-up and its tear-down
    edus: list[Edu],
    nr_vcpus: int,
    strategy: str,
    opts: Optimisations,
    upgrades: int,
    *,
    vapic: int = 2,
    faults: dict[int, str] | None = None,
    between: int = 3,
    raise_in_window: bool = False,
    quiet_upgrades: bool = False,
    interval: float = 0.0,
    land_timeout: float = LAND_TIMEOUT,
    zygote: Zygote | None = None,
    on_upgrade: Callable[[int, Downtime], None] | None = None,
) -> RunResult:
    """``upgrades`` upgrades in a row under a stream of MSIs, then the checker.

    ``faults`` maps an upgrade's index to the fault injected into it;
    ``between`` is how many interrupts the device raises between upgrades;
    ``raise_in_window`` raises one more in every upgrade while no VMM runs;
    ``quiet_upgrades`` keeps the device stream from raising during upgrades,
    and settles the VMMs on both sides of each upgrade with the stream held
    (:meth:`pyctl.livevmm.LiveVmm.settle`): before the pause every vCPU
    SYNCs after the last raise had landed, so nothing the device raised
    before is still pending; after the takeover every vCPU of the VMM that
    runs SYNCs before the stream raises again, so a raise of the window is
    not covered by a later raise of its vector. The raises inside a window
    are then the window's own, and what a strategy does with them shows;
    ``interval`` is the device's pause between two raises (0: back to back);
    ``land_timeout``: seconds after which a raise that has not landed counts
    as never landed; ``zygote`` forks the VMMs (the run starts and stops its
    own if None: a fresh interpreter costs seconds under TCG, so a caller
    that runs many short runs passes one); ``on_upgrade(i, downtime)`` is
    called as each upgrade ends.
    """
    faults = faults or {}
    targets = targets_for(nr_vcpus, len(edus))
    own_zygote = zygote is None
    zygote = zygote or Zygote()
    raiser = Raiser(edus, targets, interval, land_timeout)
    log: list[list[Any]] = []
    downtimes: list[Downtime] = []
    acked = 0
    try:
        vmm = zygote.spawn(strategy, vapic, opts)
    except BaseException:
        if own_zygote:
            zygote.close()
        raise
    try:
        vmm.call("setup", [e.vfio.fd for e in edus], targets=targets, nr_vcpus=nr_vcpus)
        raiser.start()
        for i in range(upgrades):
            _wait_raises(raiser, between)
            hook = (lambda k=i: raiser.raise_one(k % len(edus))) if raise_in_window else None
            go = functools.partial(upgrade, vmm, zygote, strategy, vapic, opts, faults.get(i), hook)
            new, dt = _held(raiser, quiet_upgrades, vmm, go)
            downtimes.append(dt)
            if on_upgrade is not None:
                on_upgrade(i, dt)
            if new is not vmm:
                reply = vmm.final or vmm.call("stop", drain=False)[0]
                log += reply["log"]
                acked += reply["acked"]
                if vmm.final is None:
                    vmm.call("release")
                    vmm.close()
                vmm = new
        _wait_raises(raiser, between)
    finally:
        # Every step runs even if one before it failed: a VMM left running
        # would keep the devices busy for whatever runs next.
        try:
            raiser.stop()
        finally:
            try:
                reply = vmm.call("stop", drain=True)[0]
                log += reply["log"]
                acked += reply["acked"]
                vmm.call("release")
            finally:
                vmm.close()
                if own_zygote:
                    zygote.close()
    fetches = [Fetch(t, v, frozenset(vecs), side, end) for t, end, v, vecs, side in log]
    report = check(raiser.raises, fetches)
    return RunResult(
        strategy,
        opts.label(),
        nr_vcpus,
        downtimes,
        report,
        len(raiser.raises),
        len(log),
        acked,
        raiser.unlanded,
        (raiser.raises, fetches),
        raiser.land_max * 1e3,
        windows_of(downtimes, raiser.raises, raiser.given_up),
    )


def open_edus(n: int) -> list[Edu]:
    bdfs = find_vfio_edu()
    if len(bdfs) < n:
        raise SetupError(f"{n} edu functions bound to vfio-pci needed, found {bdfs}")
    return [Edu(b) for b in bdfs[:n]]


def close_edus(edus: list[Edu]) -> None:
    for e in edus:
        try:
            with contextlib.suppress(KvmluError):  # EINVAL if no VMM enabled MSI
                e.disable_msi()
        finally:
            e.close()


FAULTS = ("start", "load", "old")


def fault_spec(text: str) -> tuple[int, str]:
    """argparse type of ``--fault I:KIND``: upgrade I (from 0) and the fault injected into it."""
    i, _, kind = text.partition(":")
    if not i.isdigit() or kind not in FAULTS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not I:KIND, I an upgrade from 0 and KIND one of {', '.join(FAULTS)}"
        )
    return int(i), kind


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", choices=STRATEGIES, default="shared", help="handover strategy")
    p.add_argument(
        "--vcpus",
        type=int_range(1, max_vcpus(1)),
        default=8,
        metavar="V",
        help=f"vCPU threads; V + 3 x edu + 4 fds travel in one message, at most {SCM_MAX_FD}",
    )
    p.add_argument("--upgrades", type=int_range(1), default=10, metavar="N", help="upgrades")
    p.add_argument("--edu", type=int_range(1), default=3, metavar="N", help="edu functions to use")
    p.add_argument("--vapic", type=int, choices=(1, 2), default=2, help="vAPIC module version")
    add_optimisations_argument(p)
    p.add_argument(
        "--fault",
        type=fault_spec,
        action="append",
        default=[],
        metavar="I:KIND",
        help=f"inject KIND ({', '.join(FAULTS)}) into upgrade I, from 0 (repeatable)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="pause between two raises of the device stream (default: none)",
    )
    p.add_argument(
        "--raise-in-window",
        action="store_true",
        help="raise one more MSI in every upgrade while no VMM runs (costs a round trip)",
    )
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--log", type=Path, help="write the timeline here (for kvmlu check)")


def main(args: argparse.Namespace) -> int:
    """``kvmlu upgrade``: run the upgrades, print downtime and the checker's verdict."""
    if handoff_fds(args.vcpus, args.edu) > SCM_MAX_FD:
        raise UsageError(
            f"--vcpus {args.vcpus} with --edu {args.edu}: the handoff would carry "
            f"{handoff_fds(args.vcpus, args.edu)} fds, one message carries {SCM_MAX_FD}"
        )
    faults: dict[int, str] = dict(args.fault)
    late = sorted(i for i in faults if i >= args.upgrades)
    if late:
        raise UsageError(f"--fault {late[0]}: there are upgrades 0..{args.upgrades - 1}")
    opts = Optimisations.parse(args.optimisations)
    edus = open_edus(args.edu)
    try:
        result = run(
            edus,
            args.vcpus,
            args.strategy,
            opts,
            args.upgrades,
            vapic=args.vapic,
            faults=faults,
            raise_in_window=args.raise_in_window,
            interval=args.interval,
            on_upgrade=functools.partial(_print_upgrade, args.upgrades),
        )
    finally:
        close_edus(edus)
    s = result.summary()
    d = s["downtime_ms"]
    print(
        f"{args.strategy}, optimisations {s['optimisations']}, {args.vcpus} vCPUs: "
        f"{s['upgrades']} upgrades ({s['rolled_back']} rolled back)"
    )
    if d:
        print(f"vCPU downtime: {downtime_text(d, s['upgrades'] - s['rolled_back'])}")
        print(
            "  phases (p50): " + ", ".join(f"{k} {v:.2f} ms" for k, v in s["phases_p50_ms"].items())
        )
    print(f"device raised {s['raised']}, vCPUs synced {s['deliveries']} times, acked {s['acked']}")
    text = result.report.text()
    print(text if not result.report.ok else text.splitlines()[-1])
    if args.log:
        dump_log(str(args.log), *result.timeline, None)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "summary": s,
                    "downtimes": [asdict(x) for x in result.downtimes],
                    "report": result.report.to_json(),
                },
                indent=1,
            )
        )
    return 0 if result.report.ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--zygote":
        sys.exit(zygote_main(int(sys.argv[2])))
    _p = argparse.ArgumentParser(prog="python -m pyctl.upgrade", description=__doc__.split("\n")[0])
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
