"""The test VMM of a live upgrade: V vCPU threads over a table, a vAPIC and devices.

``kvmlu vmm --control-fd N`` (or :func:`serve` in a process forked by
:mod:`pyctl.upgrade`) owns what a VMM owns for its passthrough devices: a
descriptor table for V vCPUs, a vAPIC object over it, the edu functions'
VFIO device fds with their MSI eventfds and bindings, one notification
eventfd per vCPU, and V vCPU threads. A vCPU thread waits on its
notification eventfd; when it fires, it SYNCs PIR into IRR, ACKs and EOIs
every deliverable vector, and logs the SYNC (its start time and the vectors
it moved) for the checker.

A controller sends one JSON command per SEQPACKET message (fds attached with
SCM_RIGHTS) and gets one JSON reply. The upgrade's commands, in order:

``setup`` (first VMM)
    program the devices' MSIs, create the table, vAPIC and bindings, run.
``export`` (old)
    pass what the new VMM inherits: devices, MSI eventfds, for ``shared``
    the table and bindings, with ``keep_eventfds`` the notification
    eventfds; and a state memfd plus a "ready" eventfd for the save.
``prepare`` (new, before the pause when ``prestart`` is on)
    adopt those fds and build everything that does not disturb the old VMM.
``pause_save`` (old)
    stop the vCPU threads (suspend), then save: the vAPIC blob into the
    memfd (signal ready), the devices' config space (signal ready again).
    Strategies that do not share the table unbind here; ``cpr`` first syncs
    PIR into IRR so that the blob carries it.
``takeover`` (new)
    wait for each ready signal, load what it announces, finish the strategy
    (bind, attach, inject), start the vCPU threads.
``release`` (old, after a takeover) or ``resume`` (old, rollback)
    hand over for good, or take everything back and run again.
``stop``
    stop the vCPU threads and reply with the log; with ``drain``, SYNC
    every vCPU once more first.

Also: ``pause_save`` with ``hold`` keeps the last ready signal back until
``let_go`` (tests raise an interrupt in between); ``settle`` makes every
running vCPU SYNC once more and waits for it (tests, with the devices quiet);
``preserve`` puts what ``export`` would pass into a kvmlu session, and
``prepare_session`` prepares from one (the old VMM dies after its save).

Every reply carries the CLOCK_MONOTONIC stamps of the command's phases.
"""

from __future__ import annotations

import argparse
import dataclasses
import mmap
import os
import resource
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pyctl import handoff
from pyctl.errors import RunError
from pyctl.kvmlu import Binding, Device, Table
from pyctl.metrics import drain_eventfd
from pyctl.uapi import lib
from pyctl.vapic import Vapic, VapicDevice
from pyctl.vfio import VfioPciDevice
from pyctl.vmm import SCM_MAX_FD, recv_msg, send_msg

STRATEGIES = ("naive", "inject", "cpr", "shared")
NOTIFY_VECTOR = 0xF2
REALTIME_PRIORITY = 10
CONFIG_BYTES = 64  # the standard PCI header: what a device's "state" is here
_HDR = struct.Struct("<QQ")  # vAPIC blob length, device state length
_STATE_LEN = struct.Struct("<Q")  # the header's second field alone
SETTLE_TIMEOUT = 60.0  # a hang guard: a running vCPU thread SYNCs within ms


def handoff_fds(nr_vcpus: int, nr_devices: int) -> int:
    """The most fds one handoff carries in its one message (see :meth:`LiveVmm.export`):
    per device its VFIO fd, MSI eventfd and binding; per vCPU its notification
    eventfd; the table, the vAPIC, the state memfd and the ready eventfd."""
    return 3 * nr_devices + nr_vcpus + 4


def max_vcpus(nr_devices: int) -> int:
    """The most vCPUs whose handoff with ``nr_devices`` fits in one SCM_RIGHTS message."""
    return SCM_MAX_FD - handoff_fds(0, nr_devices)


@dataclasses.dataclass(frozen=True)
class Optimisations:
    """The seed's optimisations of the upgrade flow; each can be turned off.

    ``prestart``: the new VMM runs and prepares before the old one pauses.
    ``concurrent``: the new VMM loads each part of the saved state as soon as
    the old one has written it to the shared memfd, while the old one saves
    the next; without it the state is loaded once the save has finished.
    ``keep_eventfds``: the old VMM does not tear its notification eventfds
    down; the new one inherits them and re-programs no notification target.
    ``realtime``: the VMM's threads run SCHED_FIFO, so that the one that
    must act next in the window (the old VMM saving, the new one loading)
    gets a CPU at once instead of after the scheduler's wakeup granularity.
    ``keep_vapic`` (``shared``, both VMMs on the same vAPIC version): the
    new VMM inherits the vAPIC object itself, so there is no vAPIC state to
    save or load; only the devices' state crosses the memfd.
    """

    prestart: bool = True
    concurrent: bool = True
    keep_eventfds: bool = True
    realtime: bool = True
    keep_vapic: bool = True

    @classmethod
    def parse(cls, text: str) -> Optimisations:
        """``all``, ``none``, or ``all`` minus names: ``no-prestart,no-concurrent``."""
        if text == "all":
            return cls()
        if text == "none":
            return cls(**{f.name: False for f in dataclasses.fields(cls)})
        names = {f.name.replace("_", "-") for f in dataclasses.fields(cls)}
        off: dict[str, bool] = {}
        for item in text.split(","):
            name = item.strip().removeprefix("no-")
            if not item.strip().startswith("no-") or name not in names:
                raise ValueError(
                    f"{item!r} is not all, none or no-NAME, NAME one of {', '.join(sorted(names))}"
                )
            off[name.replace("-", "_")] = False
        return cls(**off)

    def label(self) -> str:
        off = [f.name for f in dataclasses.fields(self) if not getattr(self, f.name)]
        if not off:
            return "all"
        if len(off) == len(dataclasses.fields(self)):
            return "none"
        return ",".join("no-" + n.replace("_", "-") for n in off)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class LiveVmm:
    """One VMM process's objects and vCPU threads."""

    def __init__(self, strategy: str, vapic: int, opts: Optimisations) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        self.strategy = strategy
        self.vapic_version = vapic
        self.opts = opts
        self.dev = Device()
        self.table: Table | None = None
        self.vapic: Vapic | None = None
        self.bindings: list[Binding] = []
        self.msi: list[int] = []
        self.devices: list[VfioPciDevice] = []
        self.targets: list[tuple[int, int]] = []
        self.device_ids: list[bytes] = []  # the new VMM's devices' vendor and device IDs
        # The VMM's copy of its devices' config headers, what a save saves;
        # None when this VMM changed them since it last read them.
        self.config: bytes | None = None
        self.notify: list[int] = []
        self.nr_vcpus = 0
        self.state_fd: int | None = None  # memfd: header, vAPIC blob, device state
        self.state_map: mmap.mmap | None = None  # it, mapped shared by both VMMs
        self.ready_fd: int | None = None  # semaphore eventfd: one count per saved part
        self.threads: list[threading.Thread] = []
        # The vCPU threads' run state; cond protects stopping, parked and
        # busy. kick wakes every waiting thread (none reads it) so that it
        # parks; the gate lets parked threads run.
        self.stopping = True
        self.exiting = False
        self.kick = _eventfd()
        self.gate = threading.Event()
        self.cond = threading.Condition()
        self.parked = 0
        self.busy = 0
        self.log: list[list[Any]] = []  # [start, end, vCPU, [vectors moved], side]
        self.log_lock = threading.Lock()  # protects log and log_mark
        self.log_mark = 0  # log entries before it came before the last start()
        self.last_sync: dict[int, float] = {}  # vCPU -> start of its latest SYNC
        self.acked = 0
        self.side = "vmm"
        self.notify_attached = True  # False while the table's targets are not ours
        self.unbound = False
        # This upgrade's vAPIC state: the old VMM handed the object over (no
        # blob), or saved its blob; the new VMM inherited the object.
        self.vapic_handed = False
        self.blob_saved = False
        self.vapic_inherited = False
        # CPU time, involuntary switches and page faults at the last takeover's steps.
        self.takeover_use: dict[str, tuple[float, int, int]] = {}

    # Objects.

    def _adopt_devices(self, fds: list[int]) -> None:
        self.devices = [VfioPciDevice.from_device_fd("", fd) for fd in fds]

    def _program_msi(self) -> None:
        """Fresh MSI eventfds, programmed into the devices."""
        self.msi = []
        for d in self.devices:
            efd = _eventfd()
            d.set_irq_eventfds(lib.VFIO_PCI_MSI_IRQ_INDEX, [efd])
            self.msi.append(efd)
        self.config = None

    def _bind(self) -> None:
        assert self.table is not None
        self.bindings = [
            self.table.bind(efd, vcpu, vector)
            for efd, (vcpu, vector) in zip(self.msi, self.targets, strict=True)
        ]

    def _set_notify(self, attach: bool) -> None:
        assert self.table is not None
        for v, fd in enumerate(self.notify):
            self.table.set_notify(v, fd, nv=NOTIFY_VECTOR, ndst=v, attach=attach)
        self.notify_attached = True

    def setup(self, device_fds: list[int], targets: list[list[int]], nr_vcpus: int) -> None:
        """The first VMM: devices, table, vAPIC, bindings, running vCPUs."""
        self.side = "old"
        self.targets = [(int(v), int(x)) for v, x in targets]
        self.nr_vcpus = nr_vcpus
        self._adopt_devices(device_fds)
        self.table = self.dev.create_table(nr_vcpus)
        self.notify = [_eventfd() for _ in range(nr_vcpus)]
        self._set_notify(attach=False)
        with VapicDevice(self.vapic_version) as vd:
            self.vapic = vd.create(self.table)
        self._program_msi()
        self._bind()
        self.config = self._read_configs()
        self._warm(load=False)
        self._spawn_threads()
        self.start()

    def _read_configs(self) -> bytes:
        """Every device's config header, read from the device."""
        return b"".join(_read_config(d) for d in self.devices)

    def _warm(self, load: bool) -> None:
        """Run every call of the window once, outside it.

        The first call of each in a process costs several times the later
        ones (cffi parses its types, the vAPIC's blob size is asked, the
        config region is looked up); measured under TCG, a first SAVE took
        10 ms where a later one takes 0.5. ``load`` also loads this vAPIC's
        own blob back: only for a new VMM, whose vAPIC holds nothing yet.
        """
        assert self.vapic is not None
        blob = self.vapic.save()
        if load:
            self.vapic.load(blob)
        for d in self.devices:
            _read_config(d)

    # vCPU threads. They are created once, parked, and let run by a gate:
    # resuming vCPUs is one Event.set(), not V thread start-ups. A pause does
    # not wake a thread that waits for a notification (a halted vCPU): it only
    # waits for the threads that are running to finish their SYNC. A thread
    # that wakes checks, under cond, whether it may run before it touches
    # anything, so a paused VMM never takes an interrupt.

    def _spawn_threads(self) -> None:
        """Create the vCPU threads, parked until :meth:`start`."""
        with self.cond:
            self.stopping = True
        self.gate.clear()
        self.threads = [
            threading.Thread(target=self._vcpu_loop, args=(v,), daemon=True)
            for v in range(self.nr_vcpus)
        ]
        for th in self.threads:
            th.start()
        with self.cond:
            while self.parked < len(self.threads):
                self.cond.wait()

    def _enter(self) -> bool:
        """May this thread run now? If so it counts as busy until :meth:`_leave`."""
        with self.cond:
            if self.stopping:
                return False
            self.busy += 1
            return True

    def _leave(self) -> None:
        with self.cond:
            self.busy -= 1
            if not self.busy:
                self.cond.notify_all()

    def _park(self) -> bool:
        """Park until the gate opens; False if the thread must exit."""
        with self.cond:
            self.parked += 1
            self.cond.notify_all()
        self.gate.wait()
        with self.cond:
            self.parked -= 1
        return not self.exiting

    def _vcpu_loop(self, v: int) -> None:
        while self._park():
            poller = select.poll()  # the vCPU's eventfd may differ after a rollback
            poller.register(self.notify[v], select.POLLIN)
            poller.register(self.kick, select.POLLIN)
            # A vCPU that starts takes what is pending, then waits for notifications.
            while self._enter():
                try:
                    drain_eventfd(self.notify[v])
                    self._sync_ack_eoi(v)
                finally:
                    self._leave()
                poller.poll()

    def _sync_ack_eoi(self, v: int, ack: bool = True) -> None:
        """SYNC PIR into IRR and log it; then, as the guest would, ACK and EOI."""
        assert self.vapic is not None
        t = time.monotonic()
        moved = self.vapic.sync(v).moved
        end = time.monotonic()
        n = 0
        while ack and self.vapic.ack(v):
            self.vapic.eoi(v)
            n += 1
        with self.log_lock:
            self.log.append([t, end, v, sorted(moved), self.side])
            self.acked += n
            self.last_sync[v] = t

    def start(self) -> float:
        """Let the vCPU threads run; returns the moment they may."""
        drain_eventfd(self.kick)
        with self.cond:
            self.stopping = False
        t = time.monotonic()
        self.gate.set()
        return t

    def pause(self, park_all: bool = False) -> float:
        """Stop the vCPUs; returns when none runs. ``park_all`` also wakes the
        threads that wait for a notification and waits until every one parked
        (before their eventfds are closed)."""
        self.gate.clear()
        with self.cond:
            self.stopping = True
            while self.busy:
                self.cond.wait()
        if park_all:
            os.eventfd_write(self.kick, 1)
            with self.cond:
                while self.parked < len(self.threads):
                    self.cond.wait()
        return time.monotonic()

    def settle(self, timeout: float = SETTLE_TIMEOUT) -> dict[str, float]:
        """Make every vCPU take what is pending, and wait until each has.

        Signals each vCPU's notification eventfd and waits until every vCPU
        thread has started a SYNC after that moment: whatever had been
        posted before is then in a SYNC of this VMM. A caller that keeps the
        devices quiet meanwhile (``quiet_upgrades``) knows that every raise
        that had landed is in a SYNC that started after its landing, and,
        after a takeover, that every vCPU of the new VMM has SYNCed before
        the devices raise again. Those SYNCs are real ones (logged, ACKed).
        Fails if the vCPUs do not run, or after ``timeout`` seconds.
        """
        with self.cond:
            if self.stopping:
                raise RunError("settle: the vCPUs do not run")
        t0 = time.monotonic()
        for fd in self.notify:
            os.eventfd_write(fd, 1)
        deadline = t0 + timeout
        while True:
            with self.log_lock:
                behind = [v for v in range(self.nr_vcpus) if self.last_sync.get(v, t0 - 1) < t0]
            if not behind:
                return {"settle": t0, "settled": time.monotonic()}
            if time.monotonic() > deadline:
                raise RunError(f"settle: vCPUs {behind[:8]} did not SYNC in {timeout:g} s")
            time.sleep(0.001)

    def _exit_threads(self) -> None:
        if not self.threads:
            return
        self.pause(park_all=True)
        self.exiting = True
        self.gate.set()
        for th in self.threads:
            th.join()
        self.threads = []
        self.exiting = False

    # The old side.

    def export(self, vapic: int | None = None) -> tuple[dict[str, Any], list[int]]:
        """The manifest and fds the new VMM inherits.

        ``vapic`` is the new VMM's vAPIC version. With ``keep_vapic`` and the
        shared table, a new VMM of this VMM's version gets the vAPIC object
        itself, unless its state was saved already (the new VMM was started
        after the pause): :meth:`pause_save` then saves no vAPIC blob.
        """
        assert self.table is not None and self.vapic is not None
        self._new_state()
        assert self.state_fd is not None and self.ready_fd is not None
        if self.config is None:
            self.config = self._read_configs()
        names: list[str] = []
        fds: list[int] = []

        def add(name: str, fd: int) -> None:
            names.append(name)
            fds.append(fd)

        for i, d in enumerate(self.devices):
            add(f"device{i}", d.fd)
        if self.strategy != "naive":
            for i, fd in enumerate(self.msi):
                add(f"msi{i}", fd)
        if self.strategy == "shared":
            add("table", self.table.fd)
            for i, b in enumerate(self.bindings):
                add(f"binding{i}", b.fd)
        if self.opts.keep_eventfds:
            for v, fd in enumerate(self.notify):
                add(f"notify{v}", fd)
        if (
            self.opts.keep_vapic
            and self.strategy == "shared"
            and vapic == self.vapic_version
            and not self.blob_saved
        ):
            add("vapic", self.vapic.fd)
            self.vapic_handed = True
        add("state", self.state_fd)
        add("ready", self.ready_fd)
        manifest = {
            "names": names,
            "targets": self.targets,
            "nr_vcpus": self.nr_vcpus,
            "strategy": self.strategy,
            "vapic_version": self.vapic_version,
        }
        return manifest, fds

    def _new_state(self) -> None:
        """The state memfd and ready eventfd of this upgrade, made once."""
        if self.state_fd is None:
            assert self.vapic is not None
            size = _HDR.size + self.vapic.blob_size() + CONFIG_BYTES * len(self.devices)
            self.state_fd = os.memfd_create("kvmlu-upgrade-state", os.MFD_CLOEXEC)
            os.ftruncate(self.state_fd, size)
            self.state_map = _prefault(mmap.mmap(self.state_fd, size))
            self.ready_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_SEMAPHORE)

    def pause_save(self, hold: bool = False) -> dict[str, float]:
        """Suspend, then save into the state memfd, signalling each part: the
        vAPIC blob (unless the object was handed over), the device state.

        ``hold`` (tests) keeps the last signal back until :meth:`let_go`, so
        that the controller can act while neither VMM runs.
        """
        assert self.table is not None and self.vapic is not None
        t0 = time.monotonic()
        # The notification eventfds are closed below unless kept: no thread may
        # still wait on them then.
        t1 = self.pause(park_all=not self.opts.keep_eventfds)
        self.side = "old"
        t_paused = time.monotonic()
        self._new_state()
        assert self.state_fd is not None and self.ready_fd is not None
        if self.strategy == "cpr":
            # The blob carries what is pending; what lands after this is lost
            # unless the eventfd counters hold it (the CPR gap).
            for v in range(self.nr_vcpus):
                self._sync_ack_eoi(v, ack=False)
        if self.strategy != "shared":
            for b in self.bindings:
                b.close()
            self.bindings = []
            self.unbound = True
        if not self.opts.keep_eventfds:
            # Tear the notification eventfds down; the table keeps a
            # reference until the new VMM attaches its own.
            for fd in self.notify:
                os.close(fd)
            self.notify = []
            self.notify_attached = False
        assert self.state_map is not None
        m = self.state_map
        t_prep = time.monotonic()
        n = 0
        if not self.vapic_handed:
            # The kernel writes the blob straight into the shared mapping.
            n = self.vapic.save_into(memoryview(m)[_HDR.size : _HDR.size + self.vapic.blob_size()])
            self.blob_saved = True
        t_vsave = time.monotonic()
        if not self.vapic_handed:
            _HDR.pack_into(m, 0, n, 0)
            os.eventfd_write(self.ready_fd, 1)
        t_blob = time.monotonic()
        config = self.config if self.config is not None else self._read_configs()
        m[_HDR.size + n : _HDR.size + n + len(config)] = config
        _set_state_len(m, len(config))
        t2 = time.monotonic()  # before the signal: the new VMM may run at once
        if not hold:
            os.eventfd_write(self.ready_fd, 1)
        return {
            "pause": t0,
            "suspended": t1,
            "paused": t_paused,
            "prepared": t_prep,
            "vapic_save": t_vsave,
            "vapic_saved": t_blob,
            "saved": t2,
        }

    def abandon(self) -> None:
        """The new VMM it exported to is gone, and this one never paused:
        forget that export (its state memfd, and that the vAPIC object was
        handed over, so that a later pause saves the blob again)."""
        self._drop_state()

    def let_go(self) -> None:
        """The last signal that :meth:`pause_save` held back."""
        assert self.ready_fd is not None
        os.eventfd_write(self.ready_fd, 1)

    def resume(self) -> dict[str, float]:
        """Rollback: take back what the pause gave up and run again."""
        assert self.table is not None
        t0 = time.monotonic()
        self._drop_state()  # its ready signals were for the new VMM that failed
        if self.strategy == "naive":
            for d, efd in zip(self.devices, self.msi, strict=True):
                d.set_irq_eventfds(lib.VFIO_PCI_MSI_IRQ_INDEX, [efd])
            self.config = None
        if self.unbound:
            self._bind()
            self.unbound = False
        if not self.notify_attached or self.strategy == "shared":
            if not self.notify:
                self.notify = [_eventfd() for _ in range(self.nr_vcpus)]
            self._set_notify(attach=True)
        return {"resume": t0, "running": self.start()}

    # The new side.

    def prepare(self, manifest: dict[str, Any], fds: list[int]) -> dict[str, float]:
        """Adopt the old VMM's fds and build what does not disturb it."""
        t0 = time.monotonic()
        got = dict(zip(manifest["names"], fds, strict=True))
        if "vapic" in got and int(manifest["vapic_version"]) != self.vapic_version:
            raise ValueError(
                f"a vAPIC v{manifest['vapic_version']} object was handed to a "
                f"v{self.vapic_version} VMM"
            )
        self.side = "new"
        self.targets = [(int(v), int(x)) for v, x in manifest["targets"]]
        self.nr_vcpus = int(manifest["nr_vcpus"])
        n = len(self.targets)
        self._adopt_devices([got[f"device{i}"] for i in range(n)])
        # Vendor and device ID: what the saved state is checked against.
        self.device_ids = [_read_config(d, 4) for d in self.devices]
        self.state_fd, self.ready_fd = got["state"], got["ready"]
        self.state_map = _prefault(mmap.mmap(self.state_fd, os.fstat(self.state_fd).st_size))
        if "notify0" in got:
            self.notify = [got[f"notify{v}"] for v in range(self.nr_vcpus)]
        else:
            self.notify = [_eventfd() for _ in range(self.nr_vcpus)]
        if self.strategy != "naive":
            self.msi = [got[f"msi{i}"] for i in range(n)]
        if self.strategy == "shared":
            self.table = Table.from_fd(got["table"])
            self.bindings = [Binding(got[f"binding{i}"]) for i in range(n)]
            # Targets stay the old VMM's until the takeover, unless inherited.
            self.notify_attached = "notify0" in got
        else:
            self.table = self.dev.create_table(self.nr_vcpus)
            self._set_notify(attach=False)
        if "vapic" in got:
            # The old VMM's object itself: it keeps running on it until the
            # pause, so nothing here may change its state.
            self.vapic = Vapic(got["vapic"], self.vapic_version)
            self.vapic_inherited = True
        else:
            with VapicDevice(self.vapic_version) as vd:
                self.vapic = vd.create(self.table)
            self.vapic_inherited = False
        self._warm(load=not self.vapic_inherited)
        self._spawn_threads()
        return {"prepare": t0, "prepared": time.monotonic()}

    def takeover(self, fail: str | None = None) -> dict[str, float]:
        """Load each saved part as it is announced, finish the strategy, run."""
        assert self.table is not None and self.vapic is not None
        assert self.state_fd is not None and self.ready_fd is not None
        m = self.state_map
        assert m is not None
        t_wait = time.monotonic()
        stamps = {"wait": t_wait}
        blob_len = 0  # with an inherited object, nothing to load
        if not self.vapic_inherited:
            os.eventfd_read(self.ready_fd)  # blocks until the vAPIC blob is written
            stamps["load"] = time.monotonic()
            blob_len, _ = self._header(lambda h: h[0] != 0)
            self.vapic.load(memoryview(m)[_HDR.size : _HDR.size + blob_len])
            stamps["vapic_loaded"] = time.monotonic()
        if fail == "load":
            os._exit(3)  # fault injection: the new VMM dies half-way through the load
        os.eventfd_read(self.ready_fd)  # the device state
        t_dev = time.monotonic()
        use = {"device_ready": _thread_use()}
        _, config_len = self._header(lambda h: h[1] != 0)
        config = m[_HDR.size + blob_len : _HDR.size + blob_len + config_len]
        for i, ids in enumerate(self.device_ids):
            saved = config[i * CONFIG_BYTES : (i + 1) * CONFIG_BYTES]
            # The VMM's copy of config space is the saved one; the device
            # must be the one it was saved from (vendor and device ID, read
            # in prepare: they do not change).
            if saved[:4] != ids:
                raise RunError(f"device {i}: saved state is of another device")
        self.config = bytes(config)
        t_loaded = time.monotonic()
        use["loaded"] = _thread_use()
        if self.strategy == "naive":
            self._program_msi()
        if self.strategy != "shared":
            if self.strategy == "inject":
                for vcpu, vector in self.targets:
                    self.table.post(vcpu, vector)
            self._bind()
        elif not self.notify_attached:
            self._set_notify(attach=True)
        t_ready = time.monotonic()
        use["ready"] = _thread_use()
        running = self.start()
        self._drop_state()  # this upgrade's; the next one gets its own
        self.takeover_use = use
        return {
            **stamps,
            "device_ready": t_dev,
            "loaded": t_loaded,
            "ready": t_ready,
            "running": running,
        }

    def _header(self, ready: Callable[[tuple[int, int]], bool]) -> tuple[int, int]:
        """The state header, which a ready signal promises to be ``ready``."""
        assert self.state_map is not None
        h: tuple[int, int] = _HDR.unpack_from(self.state_map, 0)
        if not ready(h):
            raise RunError(f"ready signal but no saved state: header {h}")
        return h

    def _drop_state(self) -> None:
        if self.state_map is not None:
            self.state_map.close()
            self.state_map = None
        for fd in (self.state_fd, self.ready_fd):
            if fd is not None:
                os.close(fd)
        self.state_fd = self.ready_fd = None
        self.vapic_handed = self.blob_saved = False

    # Through a session, when the old VMM dies after its save.

    def preserve(self, name: str) -> None:
        """Preserve what :meth:`export` would pass in a new session ``name``."""
        manifest, fds = self.export()
        objects = [(n, "fd") for n in manifest["names"]]
        handoff.preserve(self.dev, name, handoff.make_manifest(objects, vmm=manifest), fds)

    def prepare_session(self, name: str) -> dict[str, float]:
        """Retrieve session ``name``, :meth:`prepare` from it, and finish it."""
        h, session = handoff.retrieve(self.dev, name)
        with session:
            times = self.prepare(h.manifest["vmm"], h.fds)
            session.finish()
        return times

    # Either side.

    def stop(self, drain: bool) -> list[list[Any]]:
        """Stop the vCPU threads and return the log; ``drain`` SYNCs every vCPU
        once more first (the last owner takes what is pending at the end)."""
        self.pause(park_all=True)
        if drain:
            assert self.vapic is not None
            for v in range(self.nr_vcpus):
                self._sync_ack_eoi(v)
        return self.log

    def release(self) -> None:
        """Close everything (the old VMM after a takeover; any VMM at exit)."""
        self._exit_threads()
        if self.vapic is not None:
            self.vapic.close()
        for b in self.bindings:
            b.close()
        for d in self.devices:
            d.close()
        for fd in [*self.msi, *self.notify]:
            os.close(fd)
        self._drop_state()
        if self.table is not None:
            self.table.close()
        self.vapic, self.table = None, None
        self.bindings, self.devices, self.msi, self.notify = [], [], [], []


# Linux 5.14's madvise(2) advice; Python's mmap module does not name it.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _set_state_len(m: mmap.mmap, n: int) -> None:
    """Write the header's device state length, and nothing else.

    The new VMM may be reading the blob length beside it at this moment:
    packing the whole header again would not do, because ``pack_into``
    zero-fills its destination before it writes the fields, and a reader
    between the two sees a blob length of 0.
    """
    _STATE_LEN.pack_into(m, _HDR.size - _STATE_LEN.size, n)


def _prefault(m: mmap.mmap) -> mmap.mmap:
    """Populate every page of a shared mapping, writable, so that the save and
    the load in the window take no page fault (each one allocates a page of
    the memfd).

    Both VMMs map the same memfd, and the other one may be writing to it: the
    pages are populated without storing anything. Rewriting a byte of each
    page would race with the other VMM's header write and could undo it.
    """
    try:
        m.madvise(MADV_POPULATE_WRITE)
    except OSError:  # an older kernel: read faults allocate the pages too
        for off in range(0, len(m), mmap.PAGESIZE):
            m[off]  # the read is the point
    return m


def _thread_use() -> tuple[float, int, int]:
    """The calling thread's CPU time (s), involuntary context switches and
    minor page faults so far: set against its wall time, they say whether a
    step of the window ran, waited for a CPU or took faults."""
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return time.thread_time(), ru.ru_nivcsw, ru.ru_minflt


def _read_config(d: VfioPciDevice, size: int = CONFIG_BYTES) -> bytes:
    """The device's standard config header (or its first ``size`` bytes), in one read."""
    return d.read_config_bytes(0, size)


def _handle(vmm: LiveVmm, msg: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
    """Run one command; its reply fields and the fds to send with it."""
    cmd = msg["cmd"]
    if cmd == "export":
        version = msg.get("vapic")
        manifest, out = vmm.export(None if version is None else int(version))
        return {"manifest": manifest}, out
    actions: dict[str, Any] = {
        "setup": lambda: vmm.setup(fds, msg["targets"], int(msg["nr_vcpus"])),
        "prepare": lambda: {"t": vmm.prepare(msg["manifest"], fds)},
        "pause_save": lambda: {"t": vmm.pause_save(bool(msg.get("hold")))},
        "let_go": vmm.let_go,
        "settle": lambda: {"t": vmm.settle()},
        "abandon": vmm.abandon,
        "takeover": lambda: {
            "t": vmm.takeover(msg.get("fail")),
            "vapic_inherited": vmm.vapic_inherited,
            "use": vmm.takeover_use,
        },
        "resume": lambda: {"t": vmm.resume()},
        "preserve": lambda: vmm.preserve(msg["name"]),
        "prepare_session": lambda: {"t": vmm.prepare_session(msg["name"])},
        "stop": lambda: {"log": vmm.stop(bool(msg.get("drain"))), "acked": vmm.acked},
        "release": vmm.release,
    }
    if cmd not in actions:
        raise ValueError(f"unknown command {cmd!r}")
    return actions[cmd]() or {}, []


def serve(ctl: socket.socket, vmm: LiveVmm) -> None:
    """Answer commands on ``ctl`` until ``exit`` or EOF."""
    # A vCPU thread woken by a notification waits for the GIL; the default
    # 5 ms switch interval would be part of every delivery and of the pause.
    sys.setswitchinterval(0.0005)
    if vmm.opts.realtime:
        # Threads created from here on (the vCPU threads) inherit it.
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
    try:
        while True:
            try:
                msg, fds = recv_msg(ctl)
            except (EOFError, ConnectionError):
                return
            if msg["cmd"] == "exit":
                send_msg(ctl, {"ok": True})
                return
            out: list[int] = []
            try:
                reply, out = _handle(vmm, msg, fds)
                reply["ok"] = True
            except Exception as e:  # reported to the controller, which decides
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            send_msg(ctl, reply, out)
    finally:
        vmm.release()


def add_optimisations_argument(p: argparse.ArgumentParser) -> None:
    """``--optimisations SPEC``, parsed by :meth:`Optimisations.parse`."""
    names = ",".join("no-" + f.name.replace("_", "-") for f in dataclasses.fields(Optimisations))
    p.add_argument(
        "--optimisations",
        type=optimisations_spec,
        default="all",
        metavar="SPEC",
        help=f"all, none, or all but some of: {names} (default: all)",
    )


def optimisations_spec(text: str) -> str:
    """argparse type of ``--optimisations``: the spec as :meth:`Optimisations.label` spells it."""
    try:
        return Optimisations.parse(text).label()
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control-fd", type=int, required=True, help="SEQPACKET control socket")
    p.add_argument("--strategy", choices=STRATEGIES, default="shared", help="handover strategy")
    p.add_argument("--vapic", type=int, choices=(1, 2), default=2, help="vAPIC module version")
    add_optimisations_argument(p)


def main(args: argparse.Namespace) -> int:
    vmm = LiveVmm(args.strategy, args.vapic, Optimisations.parse(args.optimisations))
    with socket.socket(fileno=args.control_fd) as ctl:
        serve(ctl, vmm)
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="python -m pyctl.livevmm", description=__doc__.split("\n")[0])
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))


__all__: Sequence[str] = (
    "STRATEGIES",
    "LiveVmm",
    "Optimisations",
    "add_optimisations_argument",
    "serve",
)
