"""``kvmlu bench qemu``: the inner guest's own MSI latency on each interrupt path.

Inside the test VM (the nested-KVM host), for each path (``on``: KVM's
irqfd; ``off``: QEMU's eventfd handler and userspace APIC; ``kvmlu``: the
same APIC with the MSI posted by kvmlu's binding), one inner guest boots
with one vCPU and raises MSIs itself (``edu_count``'s ``raise``): each
sample is the time from just before the guest's write of edu's raise
register to its handler's entry, on the guest's clock, one raise at a time.

Host CPU per interrupt: while the raises run, the QEMU process's CPU time
(every thread, user and system, from ``/proc/<pid>/stat``) and the whole
test VM's busy CPU time (``/proc/stat``) are read before and after; then the
same is read over as long a stretch with the guest idle. The figures
reported per interrupt are the difference, divided by the interrupts: what
raising costs beyond an idle guest. The test VM is itself emulated (TCG), so
only ratios between paths of one run mean anything; every figure comes with
its environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyctl.metrics import percentile
from pyctl.qemu import QemuError
from pyctl.qemu import cli as qcli
from pyctl.qemu import guest as qguest
from pyctl.qemu import run as qrun
from pyctl.qemu.check import workdir

#: The paths, in the order they run.
PATHS: tuple[qrun.Mode, ...] = ("on", "off", "kvmlu")
#: edu_count takes at most this many raises per request.
BATCH = 250
DEFAULT_INTERRUPTS = 1000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of process *pid*."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command: state is field 3; utime and stime are fields 14, 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def host_busy_seconds() -> float:
    """Busy CPU seconds of this machine over all CPUs (``/proc/stat``, not idle/iowait)."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in cpu]
    idle = ticks[3] + ticks[4]
    # guest and guest_nice are already counted in user and nice.
    return (sum(ticks[:8]) - idle) / CLK_TCK


@dataclass
class PathResult:
    """One path's samples and CPU figures."""

    path: str
    interrupts: int = 0
    samples_ns: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    qemu_cpu_seconds: float = 0.0
    host_cpu_seconds: float = 0.0
    idle_qemu_cpu_seconds: float = 0.0
    idle_host_cpu_seconds: float = 0.0
    skipped: str | None = None
    error: str | None = None

    def summary(self) -> dict[str, float]:
        """p50, p90 and max in microseconds, and CPU microseconds per interrupt."""
        if not self.samples_ns:
            return {}
        us = sorted(ns / 1000 for ns in self.samples_ns)
        n = len(us)
        return {
            "p50_us": statistics.median(us),
            "p90_us": percentile(us, 0.9),
            "max_us": us[-1],
            "qemu_cpu_us_per_irq": 1e6 * (self.qemu_cpu_seconds - self.idle_qemu_cpu_seconds) / n,
            "host_cpu_us_per_irq": 1e6 * (self.host_cpu_seconds - self.idle_host_cpu_seconds) / n,
        }

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(self.summary())
        return doc


def measure(opts: qrun.InnerOptions, interrupts: int, boot_timeout: float) -> PathResult:
    """Boot one guest on *opts*' path and take *interrupts* samples, with CPU figures."""
    res = PathResult(opts.mode)
    guest = qrun.InnerGuest(opts)
    try:
        guest.start(boot_timeout)
        assert guest.proc is not None
        pid = guest.proc.pid
        guest.raise_in_guest(10)  # warm up: the first MSIs set up routes and bindings
        q0, h0, t0 = proc_cpu_seconds(pid), host_busy_seconds(), time.monotonic()
        while len(res.samples_ns) < interrupts:
            n = min(BATCH, interrupts - len(res.samples_ns))
            res.samples_ns += guest.raise_in_guest(n, timeout=300.0)
        t1 = time.monotonic()
        res.qemu_cpu_seconds = proc_cpu_seconds(pid) - q0
        res.host_cpu_seconds = host_busy_seconds() - h0
        res.wall_seconds = t1 - t0
        res.interrupts = len(res.samples_ns)
        # The same stretch with the guest idle: what the raises did not cost.
        q0, h0 = proc_cpu_seconds(pid), host_busy_seconds()
        time.sleep(res.wall_seconds)
        res.idle_qemu_cpu_seconds = proc_cpu_seconds(pid) - q0
        res.idle_host_cpu_seconds = host_busy_seconds() - h0
        guest.poweroff()
    except (QemuError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        guest.close()
    return res


def environment(accel: str = "kvm", inner_cpus: int = 1) -> dict[str, Any]:
    """Where the figures were measured: the inner guest under *accel*, with *inner_cpus*."""
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    how = "KVM (kvm_amd, nested)" if accel == "kvm" else "TCG"
    return {
        "where": f"inner guest under {how} in the kvmlu test VM under TCG",
        "test_vm_cpus": os.cpu_count(),
        "test_vm_cpu_model": cpu,
        "test_vm_kernel": platform.release(),
        "inner_guest_accel": accel,
        "inner_guest_cpus": inner_cpus,
    }


def write_outputs(
    doc: dict[str, Any], md: str, json_path: Path | None, md_path: Path | None
) -> None:
    """Print the table *md*; write *doc* as JSON and the table where asked."""
    print(md)
    for path, text in ((json_path, json.dumps(doc, indent=2) + "\n"), (md_path, md)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def table(doc: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    env = doc["environment"]
    out = [
        "| path | interrupts | p50 (us) | p90 (us) | max (us) | QEMU CPU per irq (us) "
        "| test VM CPU per irq (us) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["paths"]:
        if r.get("skipped") or r.get("error") or not r.get("samples_ns"):
            out.append(
                f"| {r['path']} | - | - | - | - | - | {r.get('skipped') or r.get('error')} |"
            )
            continue
        out.append(
            f"| {r['path']} | {r['interrupts']} | {r['p50_us']:.0f} | {r['p90_us']:.0f} "
            f"| {r['max_us']:.0f} | {r['qemu_cpu_us_per_irq']:.0f} "
            f"| {r['host_cpu_us_per_irq']:.0f} |"
        )
    out.append("")
    out.append(
        f"Measured {doc['date']} in {env['where']} ({env['test_vm_cpus']} vCPUs, "
        f"kernel {env['test_vm_kernel']}), QEMU {doc['qemu_version']}; guest clock, one "
        "raise at a time; CPU per interrupt is beyond an idle guest over as long a stretch."
    )
    return "\n".join(out) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``kvmlu bench qemu``."""
    p.add_argument(
        "--interrupts",
        type=int,
        default=DEFAULT_INTERRUPTS,
        metavar="N",
        help="guest-raised MSIs per path (default: %(default)s)",
    )
    p.add_argument(
        "--paths",
        default=",".join(PATHS),
        metavar="on,off,kvmlu",
        help="paths to measure (default: %(default)s)",
    )
    qcli.add_inner_host_arguments(p, accel=False)
    qcli.add_output_arguments(p, markdown=True)
    p.add_argument(
        "--boot-timeout", type=float, default=qrun.DEFAULT_BOOT_TIMEOUT, metavar="SECONDS"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """``kvmlu bench qemu`` (inside the test VM)."""
    paths = [p for p in args.paths.split(",") if p]
    bad = [p for p in paths if p not in qrun.MODES]
    if bad or args.interrupts < 1:
        print(f"kvmlu bench qemu: bad --paths {bad} or --interrupts", file=sys.stderr)
        return 2
    try:
        qemu, bdf, kernel = qcli.inner_host(args.qemu, args.device)
    except (QemuError, FileNotFoundError, ValueError) as e:
        print(f"kvmlu bench qemu: {e}", file=sys.stderr)
        return 2
    work = workdir()
    results = []
    try:
        initrd = qguest.build_initramfs(work / "initramfs.cpio")
        for path in paths:
            irqchip, kvmlu, userspace_lapic, problem = qrun.mode_settings(path, qemu)
            if problem:
                results.append(PathResult(path, skipped=problem))
                continue
            opts = qrun.InnerOptions(
                bdf=bdf,
                kernel=kernel,
                initrd=initrd,
                workdir=work / path,
                irqchip=irqchip,
                kvmlu=kvmlu,
                userspace_lapic=userspace_lapic,
                qemu=qemu,
            )
            print(f"kvmlu bench qemu: {path}: {args.interrupts} guest raises", flush=True)
            res = measure(opts, args.interrupts, args.boot_timeout)
            results.append(res)
            s = res.summary()
            if s:
                print(
                    f"  {path}: p50 {s['p50_us']:.0f} us, p90 {s['p90_us']:.0f} us, max "
                    f"{s['max_us']:.0f} us over {res.interrupts}; QEMU CPU "
                    f"{s['qemu_cpu_us_per_irq']:.0f} us/irq, test VM CPU "
                    f"{s['host_cpu_us_per_irq']:.0f} us/irq",
                    flush=True,
                )
            else:
                print(f"  {path}: {res.error or res.skipped}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    version = ".".join(map(str, qrun.qemu_version(qemu)))
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "qemu": str(qemu),
        "qemu_version": version,
        "environment": environment(),
        "paths": [r.to_json() for r in results],
    }
    write_outputs(doc, table(doc), args.json, args.markdown)
    return 0 if all(r.error is None for r in results) else 1
