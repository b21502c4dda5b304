"""The guest moves, masks and turns off its MSI while the nested host raises.

:func:`reprogram_and_count` drives the inner guest through the phases of
:data:`PHASES`. In each, the guest changes how its edu function's MSI is
programmed (``edu_count``'s ``msi``, ``msi_on`` and ``irq_mask``, and the IRQ's
``smp_affinity_list``), then the nested host raises MSIs one at a time
(:func:`pyctl.qemu.raising.raise_and_count`) and the phase records what the
guest counted, on which of its CPUs the handler ran, and, on the kvmlu
path, the bindings QEMU holds (read from the kernel with
:mod:`pyctl.qemu.procfd`) and the eventfd signals kvmlu consumed.

A phase is right when the guest counted every raise exactly once, on the
CPU the message names; on the kvmlu path QEMU also holds exactly one active
binding, posting the programmed vector to that CPU's descriptor, and kvmlu
consumed one signal per raise. With MSI off QEMU holds no active binding;
while the IRQ is disabled (``mask``) an MSI the nested host raised does not
run the handler, and it runs once when the IRQ is enabled again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pyctl.kvmlu import Device
from pyctl.qemu import QemuError, procfd
from pyctl.qemu.bar import SysfsBar, msi_irq_count
from pyctl.qemu.raising import DEFAULT_WAIT, REG_IRQ_RAISE, raise_and_count
from pyctl.qemu.run import InnerGuest, MsiMessage

#: (name, what the guest does first). ``move N`` points the IRQ at CPU N;
#: ``mask`` raises once while the IRQ is disabled; ``off`` turns MSI off
#: and on again.
PHASES: tuple[tuple[str, str], ...] = (
    ("on CPU 0", "move 0"),
    ("moved to CPU 1", "move 1"),
    ("raised while masked", "mask"),
    ("MSI off, then on", "off"),
    ("moved back to CPU 0", "move 0"),
)


@dataclass
class Binding:
    """One kvmlu binding QEMU held after a phase."""

    vcpu: int
    vector: int
    active: bool


@dataclass
class Phase:
    """What one phase did and saw."""

    name: str
    #: The message the function held right after the guest's change. Linux
    #: moves a maskless MSI at its next interrupt, so after a move this may
    #: still be the old one.
    msi_before: MsiMessage | None = None
    #: The message at the end of the phase: what the bindings must match.
    msi: MsiMessage | None = None
    raised: int = 0
    counted: int = 0
    #: The guest CPU of the phase's last handler run.
    handler_cpu: int = -1
    #: The CPU the phase points the IRQ at, or None (MSI re-enabled: any).
    want_cpu: int | None = None
    #: kvmlu path: the bindings QEMU held after the phase.
    bindings: list[Binding] | None = None
    #: kvmlu path: eventfd signals kvmlu consumed during the phase's raises.
    signals: int | None = None
    #: Masked phase: the count did not move while the IRQ was disabled.
    held: bool | None = None
    #: MSI-off phase: the bindings QEMU held while MSI was off.
    off_bindings: list[Binding] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ok"] = self.ok
        return doc

    def text(self) -> str:
        before, msi = self.msi_before, self.msi
        where = f"vector {msi.vector} dest {msi.dest:#x}" if msi else "?"
        if before and msi and before != msi:
            where = f"vector {before.vector} dest {before.dest:#x} -> {where}"
        line = (
            f"  {self.name}: {where}, {self.counted}/{self.raised} counted, "
            f"handler on CPU {self.handler_cpu}"
        )
        if self.bindings is not None:
            line += ", kvmlu binding(s) " + (
                ", ".join(f"vCPU {b.vcpu} vector {b.vector}" for b in self.bindings) or "none"
            )
            line += f", {self.signals} signals"
        if self.problems:
            line += ": " + "; ".join(self.problems)
        return line


def _bindings(pid: int) -> list[Binding]:
    return [Binding(b.vcpu, b.vector, b.active) for b in procfd.bindings(pid)]


def _signals() -> int:
    with Device() as dev:
        return dev.query().stats.signals


def _wait_until(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@dataclass
class _Walk:
    """One walk through the phases: the guest, the BAR and what to check."""

    guest: InnerGuest
    bar: SysfsBar
    pid: int
    kvmlu: bool
    raises: int
    wait: float

    def check_delivery(self, ph: Phase, signals_before: int | None) -> None:
        """The checks every raising phase shares (see the module docstring)."""
        if ph.counted != ph.raised:
            ph.problems.append(f"guest counted {ph.counted} of {ph.raised}")
        if ph.want_cpu is not None and ph.handler_cpu != ph.want_cpu:
            ph.problems.append(f"handler ran on CPU {ph.handler_cpu}, not {ph.want_cpu}")
        if not self.kvmlu:
            return
        assert signals_before is not None and ph.msi is not None
        ph.signals = _signals() - signals_before
        ph.bindings = _bindings(self.pid)
        active = [b for b in ph.bindings if b.active]
        if len(active) != 1:
            ph.problems.append(f"QEMU holds {len(active)} active bindings, not 1")
        elif (active[0].vcpu, active[0].vector) != (ph.handler_cpu, ph.msi.vector):
            ph.problems.append(
                f"binding posts vector {active[0].vector} to vCPU {active[0].vcpu}, the guest "
                f"programmed vector {ph.msi.vector} and took it on CPU {ph.handler_cpu}"
            )
        if ph.signals != ph.raised:
            ph.problems.append(f"kvmlu consumed {ph.signals} signals for {ph.raised} raises")

    def raise_phase(self, ph: Phase) -> None:
        """Raise :attr:`raises` MSIs one at a time and check their delivery."""
        ph.msi_before = self.guest.msi()
        signals_before = _signals() if self.kvmlu else None
        res = raise_and_count(self.guest, self.bar, self.raises)
        ph.raised, ph.counted = res.raised, res.counted
        ph.handler_cpu = self.guest.irqs()[0].cpu
        ph.msi = self.guest.msi()
        self.check_delivery(ph, signals_before)

    def masked_phase(self, ph: Phase) -> None:
        """One raise while the IRQ is disabled: held while masked, counted once after."""
        guest, bar, wait = self.guest, self.bar, self.wait
        ph.msi_before = ph.msi = guest.msi()
        ph.want_cpu = guest.irqs()[0].cpu
        signals_before = _signals() if self.kvmlu else None
        base = guest.total()
        host_before = msi_irq_count(bar.bdf)
        guest.set_masked(True)
        try:
            bar.write32(REG_IRQ_RAISE, 1)
            ph.raised = 1
            # The nested host took the MSI: it is on its way into the guest
            # (on the kvmlu path: in PIR, once kvmlu consumed the signal).
            if not _wait_until(lambda: msi_irq_count(bar.bdf) > host_before, wait):
                ph.problems.append(f"the nested host took no MSI within {wait:g} s")
            if self.kvmlu and not _wait_until(lambda: _signals() > (signals_before or 0), wait):
                ph.problems.append(f"kvmlu consumed no signal within {wait:g} s")
            ph.held = guest.total() == base
            if not ph.held:
                ph.problems.append("the handler ran while the IRQ was disabled")
        finally:
            guest.set_masked(False)
        _wait_until(lambda: guest.total() > base, wait)
        time.sleep(1.0)  # a second run of the handler would show up now
        ph.counted = guest.total() - base
        ph.handler_cpu = guest.irqs()[0].cpu
        self.check_delivery(ph, signals_before)

    def off_phase(self, ph: Phase) -> None:
        """MSI off (no active binding may remain), on again, then raise."""
        self.guest.set_enabled(False)
        if self.guest.msi().enabled:
            ph.problems.append("MSI still enabled after enable 0")
        if self.kvmlu:
            ph.off_bindings = _bindings(self.pid)
            if any(b.active for b in ph.off_bindings):
                ph.problems.append("QEMU holds an active binding while MSI is off")
        self.guest.set_enabled(True)
        self.raise_phase(ph)


def phases_for(cpus: int) -> list[tuple[str, str]]:
    """The phases a guest with *cpus* vCPUs can do (a move needs the target CPU)."""
    out = []
    for name, action in PHASES:
        verb, _, arg = action.partition(" ")
        if verb == "move" and int(arg) >= cpus:
            continue
        out.append((name, action))
    return out


def reprogram_and_count(
    guest: InnerGuest,
    bar: SysfsBar,
    *,
    kvmlu: bool,
    raises: int,
    wait: float = DEFAULT_WAIT,
) -> list[Phase]:
    """Walk :data:`PHASES` (those :func:`phases_for` the guest's vCPUs); each
    phase's problems are in its ``problems``."""
    if guest.proc is None:
        raise QemuError("the inner guest's QEMU is not running")
    walk = _Walk(guest, bar, guest.proc.pid, kvmlu, raises, wait)
    phases = []
    for name, action in phases_for(guest.opts.cpus):
        ph = Phase(name)
        phases.append(ph)
        verb, _, arg = action.partition(" ")
        if verb == "move":
            ph.want_cpu = int(arg)
            guest.move(ph.want_cpu)
            walk.raise_phase(ph)
        elif verb == "mask":
            walk.masked_phase(ph)
        elif verb == "off":
            walk.off_phase(ph)
        else:
            raise ValueError(f"unknown phase action {action!r}")
    return phases
