"""Raise MSIs from the nested host and check that the inner guest counted each one.

:func:`run_mode` boots the inner guest with one ``kernel-irqchip`` mode, then

1. raises N MSIs through the edu function's sysfs BAR (:class:`SysfsBar`),
   one at a time: after each write of the raise register it waits until the
   guest's count has risen before the next, so no two are ever pending in the
   guest's APIC together and coalescing cannot hide a loss;
2. waits a little and reads the count once more: it must be exactly N more
   than before (none lost, none extra);
3. if asked, has the guest move, mask and turn off its MSI, raising from
   the nested host after each change (:mod:`pyctl.qemu.reprogram`);
4. raises M MSIs from inside the guest (``raise M``) and keeps their
   raise->handler times, measured on the guest's clock;
5. reads the guest's kernel log and scans it with :func:`pyctl.klog.scan`;
6. powers the guest off.
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
from pyctl.qemu import QemuError, procfd
from pyctl.qemu.bar import SysfsBar
from pyctl.qemu.raising import RaiseResult, raise_and_count
from pyctl.qemu.reprogram import Phase, reprogram_and_count
from pyctl.qemu.run import InnerGuest, InnerOptions, irqchip_problem, qemu_version


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
    #: How the inner guest ran: ``kvm`` or ``tcg``, and its vCPUs.
    accel: str = "kvm"
    cpus: int = 1
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
    #: The guest's moves, masks and MSI off/on, each with its raises.
    phases: list[Phase] = field(default_factory=list)
    #: kvmlu's descriptors QEMU held after the host raises (device, tables,
    #: bindings; :func:`pyctl.qemu.procfd.kvmlu_fds`).
    qemu_kvmlu_fds: dict[str, int] | None = None
    #: QEMU's warning lines (its log).
    qemu_warnings: list[str] = field(default_factory=list)
    #: kvmlu path: QEMU's table(s) read through a mapping after the host
    #: raises, one entry per descriptor (vcpu, pir, on, sn, nv, ndst).
    descriptors: list[list[dict[str, Any]]] | None = None
    #: kvmlu path: the device node the kvmlu object was given, when it does
    #: not exist; QEMU then delivers the MSIs itself and kvmlu posts nothing.
    absent_device: str | None = None

    @property
    def kvmlu_ok(self) -> bool:
        """Not the kvmlu path, or kvmlu posted every MSI the guest counted.

        With :attr:`absent_device`, kvmlu must have posted nothing instead.
        """
        if self.mode != "kvmlu":
            return True
        r, k = self.host_raises, self.kvmlu
        if self.absent_device is not None:
            return k is not None and k["bindings"] == 0 and k["signals"] == 0
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
            and all(ph.ok for ph in self.phases)
            and not self.klog_findings
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ok"] = self.ok
        doc["guest_raise_us"] = latency_summary(self.guest_raise_ns)
        doc["phases"] = [ph.to_json() for ph in self.phases]
        if self.host_raises is not None:
            doc["host_raises"].update(
                lost=self.host_raises.lost, extra=self.host_raises.extra, ok=self.host_raises.ok
            )
        return doc

    def _head(self) -> str:
        """The path, the vCPUs and the QEMU, unclosed: the first line starts so."""
        head = (
            "kvmlu (kernel-irqchip=off)" if self.mode == "kvmlu" else f"kernel-irqchip={self.mode}"
        )
        if self.accel == "tcg":
            head = "kvmlu (TCG)" if self.mode == "kvmlu" else "TCG"
        if self.absent_device is not None:
            head += f" without {self.absent_device}"
        head += f", {self.cpus} vCPU{'s' if self.cpus > 1 else ''}"
        if self.vfio_props:
            head += f" vfio-pci,{','.join(self.vfio_props)}"
        head += f" (QEMU {self.qemu_version} {self.qemu}"
        return head

    def text(self) -> str:
        """A few lines for a person."""
        head = self._head()
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
        if self.qemu_kvmlu_fds is not None:
            fds = self.qemu_kvmlu_fds
            out.append(
                f"  QEMU holds {fds['device']} /dev/kvmlu, {fds['table']} table and "
                f"{fds['binding']} binding descriptor(s)"
            )
        out += [f"  QEMU: {w}" for w in self.qemu_warnings]
        if self.phases:
            out.append("  the guest reprograms its MSI:")
            out += [ph.text() for ph in self.phases]
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
    reprogram_raises: int = 0,
) -> ModeReport:
    """Boot the guest in ``opts.irqchip`` mode and do the steps of the module docstring.

    *reprogram_raises* > 0 runs step 3 with that many raises per phase (the
    guest needs two CPUs: ``opts.cpus``).
    """
    version = qemu_version(opts.qemu)
    rep = ModeReport(
        mode=opts.mode,
        qemu=str(opts.qemu),
        bdf=opts.bdf,
        qemu_version=".".join(map(str, version)),
        vfio_props=list(opts.vfio_props),
        skipped=irqchip_problem(opts.irqchip, version, opts.userspace_lapic),
        accel=opts.accel,
        cpus=opts.cpus,
    )
    if opts.kvmlu and opts.kvmlu_path is not None and not Path(opts.kvmlu_path).exists():
        rep.absent_device = opts.kvmlu_path
    if rep.skipped is not None:
        return rep
    started = time.monotonic()
    guest = InnerGuest(opts)
    try:
        guest.start(boot_timeout)
        _exercise(
            guest,
            rep,
            raises=raises,
            guest_raises=guest_raises,
            reprogram_raises=reprogram_raises,
            keep_logs=keep_logs,
        )
        rep.qemu_status = guest.poweroff()
    except (QemuError, OSError) as e:
        rep.error = f"{type(e).__name__}: {e}"
    finally:
        guest.close()
        rep.total_seconds = time.monotonic() - started
    _read_logs(opts, rep, keep_logs)
    return rep


def _exercise(
    guest: InnerGuest,
    rep: ModeReport,
    *,
    raises: int,
    guest_raises: int,
    reprogram_raises: int,
    keep_logs: Path | None,
) -> None:
    """Steps 1-5 on a booted guest, into *rep*."""
    opts = guest.opts
    rep.boot_seconds, rep.guest_uptime = guest.boot_seconds, guest.guest_uptime
    rep.guest_bdf = guest.guest_bdf
    if not guest.guest_bdf:
        raise QemuError("edu_count bound no device in the guest")
    before = _kvmlu_query() if opts.kvmlu else None
    with SysfsBar(opts.bdf) as bar:
        rep.host_raises = raise_and_count(guest, bar, raises)
    assert guest.proc is not None
    rep.qemu_kvmlu_fds = procfd.kvmlu_fds(guest.proc.pid)
    if before is not None:
        rep.kvmlu = _kvmlu_delta(before, _kvmlu_query())
        rep.descriptors = [
            [
                {
                    "vcpu": i,
                    "pir": sorted(d.pir),
                    "on": d.on,
                    "sn": d.sn,
                    "nv": d.nv,
                    "ndst": d.ndst,
                }
                for i, d in enumerate(table)
            ]
            for table in procfd.descriptors(guest.proc.pid)
        ]
    if reprogram_raises:
        with SysfsBar(opts.bdf) as bar:
            rep.phases = reprogram_and_count(guest, bar, kvmlu=opts.kvmlu, raises=reprogram_raises)
    if guest_raises:
        rep.guest_raise_ns = guest.raise_in_guest(guest_raises)
    lines = guest.dmesg()
    rep.klog_lines = len(lines)
    rep.klog_findings = klog.scan(lines)
    if keep_logs is not None:
        (keep_logs / f"inner-{opts.workdir.name}-dmesg.log").write_text(
            "".join(f"{line}\n" for line in lines), encoding="utf-8"
        )


def _read_logs(opts: InnerOptions, rep: ModeReport, keep_logs: Path | None) -> None:
    """QEMU's warnings and the console's findings into *rep*; copies into *keep_logs*."""
    for log in (opts.console_log, opts.qemu_log):
        if keep_logs is not None and log.is_file():
            (keep_logs / f"inner-{opts.workdir.name}-{log.name}").write_bytes(log.read_bytes())
    if opts.qemu_log.is_file():
        text = opts.qemu_log.read_text(encoding="utf-8", errors="replace")
        rep.qemu_warnings = [line for line in text.splitlines() if "warning:" in line]
    # The console has what a crash or panic printed, even when dmesg was not read.
    if opts.console_log.is_file():
        console = opts.console_log.read_text(encoding="utf-8", errors="replace").splitlines()
        rep.klog_findings += [f for f in klog.scan(console) if f not in rep.klog_findings]


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
