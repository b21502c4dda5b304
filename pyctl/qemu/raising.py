"""Raise MSIs from the nested host, one at a time, and see the guest count each.

:func:`raise_and_count` writes edu's raise register through the function's
sysfs BAR (:class:`~pyctl.qemu.bar.SysfsBar`) and, after each write, waits
until the guest's count has risen before the next: no two MSIs are ever
pending in the guest's APIC together, so coalescing cannot hide a loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pyctl.qemu.bar import SysfsBar, msi_cpus, msi_irq_count, pinned
from pyctl.qemu.run import InnerGuest

REG_IRQ_STATUS = 0x24
REG_IRQ_RAISE = 0x60
DEFAULT_WAIT = 10.0
DEFAULT_SETTLE = 1.0


@dataclass
class RaiseResult:
    """N MSIs raised from the nested host and what the guest counted."""

    raised: int
    counted: int = 0
    #: Raises whose count rise did not come within the wait.
    timeouts: int = 0
    #: Handler runs that found edu's status register zero.
    nostatus: int = 0
    seconds: float = 0.0
    #: How far the count had risen when the guest was first seen to have
    #: taken each raise (1 is right; more means more MSIs than raises).
    rises: dict[int, int] = field(default_factory=dict)
    #: Raises before which edu's status register (read through the BAR) was
    #: not zero: the guest had not acknowledged the previous interrupt.
    unacked: int = 0
    #: What the count rose by while waiting after the last raise.
    late: int = 0
    #: The CPUs the raiser ran on: those that take the function's MSI.
    cpus: list[int] = field(default_factory=list)
    #: MSIs of the function the test VM's vfio-pci took meanwhile: more than
    #: raised means the device or the first level doubled one, as many means
    #: any extra in the guest came from the delivery into it.
    host_msis: int = 0

    @property
    def lost(self) -> int:
        return max(0, self.raised - self.counted)

    @property
    def extra(self) -> int:
        return max(0, self.counted - self.raised)

    @property
    def ok(self) -> bool:
        return self.counted == self.raised and not self.timeouts


def raise_and_count(
    guest: InnerGuest,
    bar: SysfsBar,
    n: int,
    *,
    wait: float = DEFAULT_WAIT,
    settle: float = DEFAULT_SETTLE,
) -> RaiseResult:
    """Raise *n* MSIs through *bar*, each after the guest counted the previous one.

    The raiser runs on the CPUs that take the function's MSI (see
    :mod:`pyctl.qemu.bar` for why).
    """
    cpus = msi_cpus(bar.bdf)
    res = RaiseResult(raised=n, cpus=sorted(cpus))
    with pinned(cpus):
        _raise_loop(guest, bar, res, wait, settle)
    return res


def _raise_loop(
    guest: InnerGuest, bar: SysfsBar, res: RaiseResult, wait: float, settle: float
) -> None:
    n = res.raised
    host_before = msi_irq_count(bar.bdf)
    before = guest.irqs()
    base = sum(v.count for v in before)
    seen = base
    started = time.monotonic()
    for _ in range(n):
        if bar.read32(REG_IRQ_STATUS):
            res.unacked += 1
        bar.write32(REG_IRQ_RAISE, 1)
        deadline = time.monotonic() + wait
        while (now := guest.total()) <= seen:
            if time.monotonic() > deadline:
                res.timeouts += 1
                break
        res.rises[now - seen] = res.rises.get(now - seen, 0) + 1
        seen = max(seen, now)
    res.seconds = time.monotonic() - started
    time.sleep(settle)  # anything late or doubled shows up now
    after = guest.irqs()
    res.late = sum(v.count for v in after) - seen
    res.counted = sum(v.count for v in after) - base
    res.nostatus = sum(v.nostatus for v in after) - sum(v.nostatus for v in before)
    res.host_msis = msi_irq_count(bar.bdf) - host_before
