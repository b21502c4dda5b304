"""Raise MSIs from the nested host and check that the inner guest counted each one.

:func:`run_mode` boots the inner guest with one ``kernel-irqchip`` mode, then

1. raises N MSIs through the edu function's sysfs BAR (:class:`SysfsBar`),
   one at a time: after each write of the raise register it waits until the
   guest's count has risen before the next, so no two are ever pending in the
   guest's APIC together and coalescing cannot hide a loss;
2. waits a little and reads the count once more: it must be exactly N more
   than before (none lost, none extra);
3. raises M MSIs from inside the guest (``raise M``) and keeps their
   raise->handler times, measured on the guest's clock;
4. reads the guest's kernel log and scans it with :func:`pyctl.klog.scan`;
5. powers the guest off.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyctl import klog
from pyctl.kvmlu import ApiInfo, Device
from pyctl.qemu import QemuError
from pyctl.qemu.bar import SysfsBar, msi_cpus, msi_irq_count, pinned
from pyctl.qemu.run import InnerGuest, InnerOptions, irqchip_problem, qemu_version

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


def latency_summary(ns: list[int]) -> dict[str, float]:
    """Median, 90th percentile, min and max of raise->handler times, in microseconds."""
    if not ns:
        return {}
    us = sorted(x / 1000 for x in ns)
    p90 = us[min(len(us) - 1, round(0.9 * (len(us) - 1)))]
    return {"p50": statistics.median(us), "p90": p90, "min": us[0], "max": us[-1]}


@dataclass
class ModeReport:
    """One boot of the inner guest on one interrupt path."""

    #: The path (:data:`pyctl.qemu.run.MODES`): a kernel-irqchip mode, or kvmlu.
    mode: str
    qemu: str
    bdf: str
    qemu_version: str = ""
    #: Extra vfio-pci properties of the run (x-no-kvm-msi=on...).
    vfio_props: list[str] = field(default_factory=list)
    #: Why this mode was not run (this QEMU cannot do it), or None.
    skipped: str | None = None
    guest_bdf: str | None = None
    boot_seconds: float | None = None
    guest_uptime: float | None = None
    host_raises: RaiseResult | None = None
    guest_raise_ns: list[int] = field(default_factory=list)
    klog_findings: list[str] = field(default_factory=list)
    klog_lines: int = 0
    total_seconds: float = 0.0
    qemu_status: int | None = None
    error: str | None = None
    #: kvmlu path: what the kvmlu module counted (QUERY, whole test VM) over
    #: the host raises: bindings alive, eventfd signals posted, PIR rises.
    kvmlu: dict[str, int] | None = None

    @property
    def kvmlu_ok(self) -> bool:
        """Not the kvmlu path, or kvmlu posted every MSI the guest counted."""
        if self.mode != "kvmlu":
            return True
        r, k = self.host_raises, self.kvmlu
        return (
            r is not None
            and k is not None
            and k["bindings"] >= 1
            and k["signals"] == r.counted
            and k["posted"] + k["coalesced"] == k["signals"]
        )

    @property
    def ok(self) -> bool:
        """Counted exactly what was raised, clean log; a skipped mode is not ok."""
        return (
            self.skipped is None
            and self.error is None
            and self.host_raises is not None
            and self.host_raises.ok
            and self.kvmlu_ok
            and not self.klog_findings
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ok"] = self.ok
        doc["guest_raise_us"] = latency_summary(self.guest_raise_ns)
        if self.host_raises is not None:
            doc["host_raises"].update(
                lost=self.host_raises.lost, extra=self.host_raises.extra, ok=self.host_raises.ok
            )
        return doc

    def text(self) -> str:
        """A few lines for a person."""
        head = (
            "kvmlu (kernel-irqchip=off)" if self.mode == "kvmlu" else f"kernel-irqchip={self.mode}"
        )
        if self.vfio_props:
            head += f" vfio-pci,{','.join(self.vfio_props)}"
        head += f" (QEMU {self.qemu_version} {self.qemu}"
        if self.skipped is not None:
            return f"{head}): SKIPPED: {self.skipped}"
        out = [f"{head}, edu {self.bdf} -> guest {self.guest_bdf or '?'}): "
               f"{'OK' if self.ok else 'FAIL'} in {self.total_seconds:.1f} s"]  # fmt: skip
        if self.boot_seconds is not None:
            out.append(
                f"  boot: READY after {self.boot_seconds:.1f} s "
                f"(guest uptime {self.guest_uptime or 0:.1f} s)"
            )
        r = self.host_raises
        if r is not None:
            out.append(
                f"  host raises: {r.raised} raised through the BAR, guest counted {r.counted} "
                f"({r.lost} lost, {r.extra} extra, {r.timeouts} waits timed out, "
                f"{r.nostatus} with status 0) in {r.seconds:.1f} s"
            )
            if not r.ok or r.unacked:
                out.append(
                    f"    count rise per raise {dict(sorted(r.rises.items()))}, "
                    f"{r.late} after the last, {r.unacked} raises found status unacked, "
                    f"raiser on CPUs {r.cpus}, test VM took {r.host_msis} MSIs"
                )
        if self.kvmlu is not None:
            k = self.kvmlu
            out.append(
                f"  kvmlu: {k['bindings']} binding(s); over the host raises it posted "
                f"{k['signals']} eventfd signals ({k['posted']} PIR rises, "
                f"{k['coalesced']} coalesced), {k['notified']} notifications"
            )
        if self.guest_raise_ns:
            s = latency_summary(self.guest_raise_ns)
            out.append(
                f"  guest raises: {len(self.guest_raise_ns)}, raise->handler p50 "
                f"{s['p50']:.0f} us, p90 {s['p90']:.0f} us, min {s['min']:.0f} us, "
                f"max {s['max']:.0f} us"
            )
        if self.klog_lines:
            verdict = "; ".join(self.klog_findings) if self.klog_findings else "clean"
            out.append(f"  guest kernel log: {self.klog_lines} lines, {verdict}")
        if self.error:
            out.append(f"  error: {self.error}")
        return "\n".join(out)


def run_mode(
    opts: InnerOptions,
    raises: int,
    guest_raises: int,
    *,
    boot_timeout: float,
    keep_logs: Path | None = None,
) -> ModeReport:
    """Boot the guest in ``opts.irqchip`` mode and do the steps of the module docstring."""
    version = qemu_version(opts.qemu)
    rep = ModeReport(
        mode=opts.mode,
        qemu=str(opts.qemu),
        bdf=opts.bdf,
        qemu_version=".".join(map(str, version)),
        vfio_props=list(opts.vfio_props),
        skipped=irqchip_problem(opts.irqchip, version, opts.userspace_lapic),
    )
    if rep.skipped is not None:
        return rep
    started = time.monotonic()
    guest = InnerGuest(opts)
    try:
        guest.start(boot_timeout)
        rep.boot_seconds, rep.guest_uptime = guest.boot_seconds, guest.guest_uptime
        rep.guest_bdf = guest.guest_bdf
        if not guest.guest_bdf:
            raise QemuError("edu_count bound no device in the guest")
        before = _kvmlu_query() if opts.kvmlu else None
        with SysfsBar(opts.bdf) as bar:
            rep.host_raises = raise_and_count(guest, bar, raises)
        if before is not None:
            rep.kvmlu = _kvmlu_delta(before, _kvmlu_query())
        if guest_raises:
            rep.guest_raise_ns = guest.raise_in_guest(guest_raises)
        lines = guest.dmesg()
        rep.klog_lines = len(lines)
        rep.klog_findings = klog.scan(lines)
        if keep_logs is not None:
            (keep_logs / f"inner-{opts.mode}-dmesg.log").write_text(
                "".join(f"{line}\n" for line in lines), encoding="utf-8"
            )
        rep.qemu_status = guest.poweroff()
    except (QemuError, OSError) as e:
        rep.error = f"{type(e).__name__}: {e}"
    finally:
        guest.close()
        rep.total_seconds = time.monotonic() - started
        if keep_logs is not None:
            for log in (opts.console_log, opts.qemu_log):
                if log.is_file():
                    dest = keep_logs / f"inner-{opts.mode}-{log.name}"
                    dest.write_bytes(log.read_bytes())
    # The console has what a crash or panic printed, even when dmesg was not read.
    if opts.console_log.is_file():
        console = opts.console_log.read_text(encoding="utf-8", errors="replace").splitlines()
        rep.klog_findings += [f for f in klog.scan(console) if f not in rep.klog_findings]
    return rep


def _kvmlu_query() -> ApiInfo:
    with Device() as dev:
        return dev.query()


def _kvmlu_delta(before: ApiInfo, after: ApiInfo) -> dict[str, int]:
    """What kvmlu did between two QUERYs (the test VM runs one kvmlu client)."""
    b, a = before.stats, after.stats
    return {
        "bindings": after.nr_bindings,
        "signals": a.signals - b.signals,
        "posted": a.posted - b.posted,
        "coalesced": a.coalesced - b.coalesced,
        "notified": a.notified - b.notified,
    }


def workdir(base: Path | None = None) -> Path:
    """A fresh folder for the inner QEMU's socket and logs (in /tmp: writable in the VM)."""
    return Path(tempfile.mkdtemp(prefix="kvmlu-qemu-", dir=base))
