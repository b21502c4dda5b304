"""``kvmlu bench qemu-upgrade``: the pause of a cpr-transfer, kvmlu against stock.

Inside the test VM, each row boots the inner guest ready for cpr-transfer
(:mod:`pyctl.qemu.upgrade_cli`) and upgrades its QEMU N times without
holding the pause (``--no-hold``: the new QEMU runs the guest as soon as it
has loaded it), with MSIs raised from the nested host between the upgrades
and counted by the guest. Per upgrade it records the pause (the new QEMU's
``RESUME`` minus the old one's ``STOP``, QEMU's own stamps on the host's
wall clock) and QEMU's own downtime figure (the old QEMU's
``query-migrate``). A row is a path and its kvmlu switches
(``docs/qemu-upgrade.md``) and a workload: the guest idle, or running a
busy loop on its vCPU.

The test VM runs under TCG and the inner guest under KVM nested in it, so
only ratios between rows of one run mean anything; every figure comes with
its environment. The inner guest has one vCPU: with two, guests under KVM
nested in TCG were reset or did not boot here (``docs/qemu-notes.md``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyctl.metrics import percentile
from pyctl.qemu import QemuError
from pyctl.qemu import check as qcheck
from pyctl.qemu import cli as qcli
from pyctl.qemu import guest as qguest
from pyctl.qemu import run as qrun
from pyctl.qemu.bench import environment, write_outputs
from pyctl.qemu.upgrade_cli import Plan, run_path


@dataclass(frozen=True)
class Row:
    """One configuration: a path and the kvmlu object's switches."""

    name: str
    path: str
    kvmlu_props: tuple[str, ...] = ()


ALL = ("x-eager=on", "x-cpr-keep-notify=on", "x-cpr-pass-notify=on")
ROWS: tuple[Row, ...] = (
    Row("stock cpr-transfer", "stock"),
    Row("kvmlu, every optimisation", "kvmlu", ALL),
    Row("kvmlu, x-eager off", "kvmlu", ("x-eager=off", *ALL[1:])),
    Row(
        "kvmlu, x-cpr-keep-notify off",
        "kvmlu",
        ("x-eager=on", "x-cpr-keep-notify=off", "x-cpr-pass-notify=off"),
    ),
    Row("kvmlu, x-cpr-pass-notify off", "kvmlu", (*ALL[:2], "x-cpr-pass-notify=off")),
)
WORKLOADS: dict[str, int] = {"idle": 0, "cpu": 1}


def _stats(xs: list[float]) -> dict[str, float | int | None]:
    s = sorted(xs)
    if not s:
        return {"n": 0, "p50": None, "p90": None, "max": None}
    return {"n": len(s), "p50": statistics.median(s), "p90": percentile(s, 0.9), "max": s[-1]}


def measure_row(
    row: Row, workload: str, upgrades: int, base: qrun.InnerOptions, work: Path
) -> dict[str, Any]:
    """Boot, upgrade *upgrades* times unheld, and summarise."""
    opts = qrun.InnerOptions(**{**base.__dict__, "kvmlu_props": list(row.kvmlu_props)})
    plan = Plan(upgrades, between=1, hold=False, spin=WORKLOADS[workload], verbose=False)
    rep = run_path(row.path, plan, opts, work / f"{row.path}-{len(row.kvmlu_props)}-{workload}")
    ups = rep.upgrades
    return {
        "row": row.name,
        "path": row.path,
        "kvmlu_props": list(row.kvmlu_props),
        "workload": workload,
        "ok": rep.ok,
        "error": rep.error,
        "skipped": rep.skipped,
        "upgrades_ok": sum(u.ok for u in ups),
        "between_raised": rep.between_raised,
        "between_counted": rep.between_counted,
        "pause_ms": _stats([u.pause_ms for u in ups if u.pause_ms is not None]),
        "qemu_downtime_ms": _stats(
            [float(u.qemu_downtime_ms) for u in ups if u.qemu_downtime_ms is not None]
        ),
        "upgrades": [asdict(u) for u in ups],
    }


def table(doc: dict[str, Any]) -> str:
    """The rows as a Markdown table, with each row's p50 against stock's."""
    stock = {
        r["workload"]: r["pause_ms"]["p50"]
        for r in doc["rows"]
        if r["path"] == "stock" and r["pause_ms"]["p50"]
    }
    out = [
        "| row | workload | n | pause p50 (ms) | p90 | max | QEMU downtime p50 (ms) "
        "| p50 vs stock | upgrades right | MSIs between, counted |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        p, d = r["pause_ms"], r["qemu_downtime_ms"]
        if not p["n"]:
            why = r["skipped"] or r["error"] or "no upgrade"
            out.append(f"| {r['row']} | {r['workload']} | 0 | - | - | - | - | - | - | {why} |")
            continue
        ref = stock.get(r["workload"])
        ratio = f"{p['p50'] / ref:.2f}x" if ref else "-"
        dt = f"{d['p50']:.0f}" if d["n"] else "-"
        out.append(
            f"| {r['row']} | {r['workload']} | {p['n']} | {p['p50']:.1f} | {p['p90']:.1f} "
            f"| {p['max']:.1f} | {dt} | {ratio} | {r['upgrades_ok']} of {p['n']} "
            f"| {r['between_counted']} of {r['between_raised']} |"
        )
    env = doc["environment"]
    out.append("")
    out.append(
        f"Measured {doc['date']}: {env['where']} ({env['test_vm_cpus']} vCPUs, kernel "
        f"{env['test_vm_kernel']}), QEMU {doc['qemu_version']}, inner guest "
        f"{env['inner_guest_cpus']} vCPU(s) under {env['inner_guest_accel']}, 256 MiB. "
        "Pause: the new QEMU's RESUME minus the old QEMU's STOP, not held open; n "
        "upgrades per row in one guest boot; with n <= 50 the p90 is near the top and "
        "the max is the largest of n."
    )
    return "\n".join(out) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``kvmlu bench qemu-upgrade``."""
    p.add_argument("--upgrades", type=int, default=50, metavar="N", help="upgrades per row")
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        metavar="idle,cpu",
        help="guest workloads (default: %(default)s)",
    )
    p.add_argument(
        "--rows",
        default="all",
        metavar="I,J",
        help=f"row numbers 0..{len(ROWS) - 1} (default: all: "
        + "; ".join(f"{i} {r.name}" for i, r in enumerate(ROWS))
        + ")",
    )
    qcli.add_inner_host_arguments(p, cpus=1)
    qcli.add_output_arguments(p, markdown=True)
    p.set_defaults(func=main)


def _rows(text: str) -> list[Row]:
    if text == "all":
        return list(ROWS)
    return [ROWS[int(i)] for i in text.split(",") if i]


def main(args: argparse.Namespace) -> int:
    """``kvmlu bench qemu-upgrade`` (inside the test VM)."""
    workloads = [w for w in args.workloads.split(",") if w]
    try:
        rows = _rows(args.rows)
    except (ValueError, IndexError):
        rows = []
    bad_counts = args.upgrades < 1 or args.cpus < 1
    if not rows or bad_counts or any(w not in WORKLOADS for w in workloads):
        print(
            f"kvmlu bench qemu-upgrade: --rows takes numbers 0..{len(ROWS) - 1}, --workloads "
            f"{','.join(WORKLOADS)}, --upgrades and --cpus >= 1",
            file=sys.stderr,
        )
        return 2
    try:
        qemu, bdf, kernel = qcli.inner_host(args.qemu, args.device)
    except (QemuError, FileNotFoundError, ValueError) as e:
        print(f"kvmlu bench qemu-upgrade: {e}", file=sys.stderr)
        return 3
    work = qcheck.workdir()
    out_rows = []
    try:
        initrd = qguest.build_initramfs(work / "initramfs.cpio")
        base = qcli.inner_options(args, qemu=qemu, bdf=bdf, kernel=kernel, initrd=initrd, work=work)
        for workload in workloads:
            for row in rows:
                r = measure_row(row, workload, args.upgrades, base, work)
                out_rows.append(r)
                p = r["pause_ms"]
                got = f"pause p50 {p['p50']:.1f} ms, max {p['max']:.1f} ms" if p["n"] else ""
                print(
                    f"  {row.name}, {workload}: {r['upgrades_ok']} of {args.upgrades} right; "
                    f"{got} {r['error'] or r['skipped'] or ''}",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "qemu": str(qemu),
        "qemu_version": ".".join(map(str, qrun.qemu_version(qemu))),
        "environment": environment(args.accel, args.cpus),
        "rows": out_rows,
    }
    write_outputs(doc, table(doc), args.json, args.markdown)
    return 0 if all(r["ok"] for r in out_rows) else 1
