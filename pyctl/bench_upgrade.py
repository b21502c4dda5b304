"""``kvmlu bench upgrade``: the live upgrade's vCPU downtime, measured across a matrix.

For every vCPU count, workload, strategy and set of optimisations, one run
of :func:`pyctl.upgrade.run` (N upgrades in a row under a stream of edu
MSIs, one more raised in every upgrade's window) gives the downtime's
p50/p99/max, its phases, and the checker's lost, spurious and duplicated
counts. Workloads run in the guest beside the VMMs:

``idle``    nothing;
``cpu``     ``stress-ng --cpu 1`` (one of the guest's two vCPUs busy);
``memory``  ``memtester`` over 128 MiB, in a loop;
``disk``    ``fio --rw=randwrite --bs=4k --iodepth=1 --direct=1`` on the scratch
            disk (``kvmlu vm --scratch-disk``).

Results go to a JSON file after every run, so a partial matrix survives a
timeout. ``kvmlu bench report`` turns the JSON into the table in docs/ and a
PNG plot of the downtime distributions; each figure also gets its ratio to
the unoptimised flow of the same strategy, vCPU count and workload, measured
in the same VM run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyctl.argtypes import int_range
from pyctl.errors import InputError, RunError, SetupError, load_json_object
from pyctl.livevmm import STRATEGIES, Optimisations, max_vcpus
from pyctl.upgrade import (
    LAND_TIMEOUT,
    P99_MIN_SAMPLES,
    Downtime,
    RunResult,
    Zygote,
    close_edus,
    downtime_text,
    exec_startup,
    open_edus,
    run,
)
from pyctl.vm import SCRATCH_SERIAL

WORKLOADS = ("idle", "cpu", "memory", "disk")
EDUS = 3  # edu functions each run streams MSIs from
#: What a bench upgrade result file holds (``--resume`` and ``bench report`` read it).
BENCH_KEYS = ("environment", "upgrades_per_run", "land_timeout_s", "exec_startup_s", "runs")
ABLATIONS = ("no-prestart", "no-concurrent", "no-keep-eventfds", "no-realtime", "no-keep-vapic")


def scratch_disk() -> str:
    """The scratch disk's device node (loads virtio_blk if needed)."""
    for _ in range(2):
        for serial in Path("/sys/block").glob("*/serial"):
            if serial.read_text().strip() == SCRATCH_SERIAL:
                dev = Path("/dev") / serial.parent.name
                if not dev.exists():
                    subprocess.run(["mknod", str(dev), "b", *_devnum(serial.parent)], check=True)
                return str(dev)
        subprocess.run(["modprobe", "virtio_blk"], check=False)
    raise SetupError("no scratch disk: boot the VM with --scratch-disk")


def _devnum(block: Path) -> list[str]:
    return (block / "dev").read_text().strip().split(":")


def workload_argv(name: str) -> list[str] | None:
    """The command of a workload, or None for idle."""
    if name == "idle":
        return None
    if name == "cpu":
        return ["stress-ng", "--cpu", "1", "--timeout", "0", "--quiet", "--temp-path", "/tmp"]
    if name == "memory":
        return ["sh", "-c", "while memtester 128M 1 >/dev/null; do :; done"]
    if name == "disk":
        return [
            "fio",
            "--name=kvmlu-scratch",
            f"--filename={scratch_disk()}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=1",
            "--direct=1",
            "--ioengine=psync",
            "--thread",  # the job in this process, not a child in a session of its own
            "--time_based",
            "--runtime=1000000",
            "--output=/dev/null",
        ]
    raise ValueError(f"unknown workload {name!r}")


def descendants(root: int) -> list[int]:
    """Every process below ``root`` in the process tree, now."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out: list[int] = []
    todo = [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_tree(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Kill a workload and every process it started, and wait until all are gone.

    Killing its process group is not enough: a tool may start workers in
    sessions of their own (fio's job processes do), and such a worker left
    running would load every later row of the matrix.
    """
    doomed = descendants(proc.pid)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while left := [pid for pid in doomed if _alive(pid)]:
        if time.monotonic() > deadline:
            raise RunError(f"workload processes {left} outlived SIGKILL")
        time.sleep(0.05)


@contextlib.contextmanager
def workload(name: str) -> Iterator[None]:
    """Run a workload (in its own session) for the duration of the block."""
    argv = workload_argv(name)
    if argv is None:
        yield
        return
    if shutil.which(argv[0]) is None:
        raise SetupError(f"{argv[0]} is not installed (make bench installs it)")
    # The guest's root is read-only: workloads run in /tmp.
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, cwd="/tmp")
    try:
        time.sleep(2)  # let it start: a workload that exits at once is an error
        if proc.poll() is not None:
            raise RunError(f"workload {name} exited with {proc.returncode}")
        yield
        # And one that died during the run made the run a lie.
        if proc.poll() is not None:
            raise RunError(f"workload {name} exited with {proc.returncode} during the run")
    finally:
        stop_tree(proc)


def configs(
    vcpus: list[int],
    workloads: list[str],
    strategies: list[str],
    ablate: bool,
    ablation_workloads: tuple[str, ...] = ("idle",),
) -> list[tuple[int, str, str, str]]:
    """(vCPUs, workload, strategy, optimisations) in run order.

    Every configuration runs with all optimisations and with none; the
    ablations (one optimisation off at a time) run for ``shared`` at the
    largest vCPU count, under ``ablation_workloads`` only.
    """
    out = []
    for v in vcpus:
        for w in workloads:
            for s in strategies:
                out += [(v, w, s, "all"), (v, w, s, "none")]
                if ablate and s == "shared" and v == max(vcpus) and w in ablation_workloads:
                    out += [(v, w, s, a) for a in ABLATIONS]
    return out


def stamps_p50(downtimes: list[Downtime]) -> dict[str, float]:
    """Median of every stamp of both VMMs, in ms from the pause: where the time goes."""
    rows = [d.detail for d in downtimes if d.detail and not d.rolled_back]
    keys = sorted(
        {k for r in rows for k in r},
        key=lambda k: statistics.median(r[k] - r["old_pause"] for r in rows if k in r),
    )
    return {
        k: statistics.median((r[k] - r["old_pause"]) * 1e3 for r in rows if k in r) for k in keys
    }


# The new VMM's steps after the old one's last signal: (name, from, to).
NEW_STEPS = (
    ("wake", "old_saved", "new_device_ready"),
    ("check", "new_device_ready", "new_loaded"),
    ("finish", "new_loaded", "new_running"),
)


def new_steps(downtimes: list[Downtime]) -> dict[str, Any]:
    """The new VMM's steps from the old VMM's last signal to the open gate,
    each the median over the upgrades of its own length (not a difference of
    medians); for its own steps also the median CPU time its thread spent in
    them and the page faults it took (for the finish: up to the call that
    opens the gate), and in how many upgrades that thread was preempted in
    between."""
    rows = [d for d in downtimes if not d.rolled_back and d.detail]
    out: dict[str, Any] = {}
    wall = {
        name: [(d.detail[b] - d.detail[a]) * 1e3 for d in rows if a in d.detail and b in d.detail]
        for name, a, b in NEW_STEPS
    }
    out["wall_p50_ms"] = {k: statistics.median(v) for k, v in wall.items() if v}
    used = [d.use for d in rows if {"device_ready", "loaded", "ready"} <= d.use.keys()]
    if used:

        def median(field: int, scale: float = 1.0) -> dict[str, float]:
            """Median growth of ``use`` field ``field`` over the check and the finish."""
            spans = {"check": ("device_ready", "loaded"), "finish": ("loaded", "ready")}
            return {
                k: statistics.median((u[b][field] - u[a][field]) * scale for u in used)
                for k, (a, b) in spans.items()
            }

        out["cpu_p50_ms"] = median(0, 1e3)
        out["faults_p50"] = median(2)
        out["preempted"] = sum(u["ready"][1] > u["device_ready"][1] for u in used)
        out["measured"] = len(used)
    return out


def environment() -> dict[str, Any]:
    """Where the figures were measured."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "guest_cpus": os.cpu_count(),
        "guest_cpu_model": cpu,
        "accel": os.environ.get("KVMLU_ACCEL", "unknown"),
        "python": platform.python_version(),
    }


def run_entry(workload: str, r: RunResult, wall_s: float) -> dict[str, Any]:
    """One run's record in the benchmark's JSON."""
    return {
        "workload": workload,
        **r.summary(),
        "downtimes_ms": [d.total_ms for d in r.downtimes],
        "stamps_p50_ms": stamps_p50(r.downtimes),
        "new_steps": new_steps(r.downtimes),
        "wall_s": round(wall_s, 1),
    }


def start_doc(path: Path, upgrades: int, land_timeout: float, resume: bool) -> dict[str, Any]:
    """The benchmark's document: a fresh one, or with ``resume`` the one at
    ``path`` (if any) to add the missing rows to, which must have been
    measured the same way in the same environment."""
    fresh: dict[str, Any] = {
        "environment": environment(),
        "upgrades_per_run": upgrades,
        "land_timeout_s": land_timeout,
        "boots": 1,
        "exec_startup_s": [],
        "runs": [],
    }
    if not resume or not path.exists():
        return fresh
    doc = load_json_object(path, BENCH_KEYS, "bench upgrade result")
    for key in ("upgrades_per_run", "land_timeout_s"):
        if doc.get(key) != fresh[key]:
            raise ValueError(f"--resume: {path} has {key} {doc.get(key)}, this run {fresh[key]}")
    for key in ("kernel", "guest_cpus", "guest_cpu_model", "accel"):
        if doc["environment"].get(key) != fresh["environment"][key]:
            raise ValueError(
                f"--resume: {path} was measured with {key} {doc['environment'].get(key)!r}, "
                f"this run has {fresh['environment'][key]!r}"
            )
    doc["boots"] = doc.get("boots", 1) + 1
    return doc


def row_key(r: dict[str, Any]) -> tuple[int, str, str, str]:
    """A run's configuration: (vCPUs, workload, strategy, optimisations)."""
    return (r["vcpus"], r["workload"], r["strategy"], r["optimisations"])


def bench(args: argparse.Namespace) -> int:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        doc = start_doc(out, args.upgrades, args.land_timeout, args.resume)
    except ValueError as e:
        print(f"kvmlu bench upgrade: {e}", file=sys.stderr)
        return 2
    todo = configs(
        args.vcpus,
        args.workloads,
        args.strategies,
        not args.no_ablations,
        tuple(args.ablation_workloads),
    )
    done = {row_key(r) for r in doc["runs"]}
    if done:
        print(f"resuming {out}: {len(done)} rows measured, {len(todo)} in this matrix", flush=True)
    todo = [c for c in todo if (c[0], c[1], c[2], Optimisations.parse(c[3]).label()) not in done]
    edus = open_edus(EDUS)
    started = time.monotonic()
    zygote: Zygote | None = None
    try:
        doc["exec_startup_s"] += exec_startup(3)
        # One zygote for the whole matrix: each run would otherwise pay a
        # fresh interpreter's start-up (seconds under TCG) outside its
        # upgrades. It holds no kvmlu object and forks every VMM afresh.
        zygote = Zygote()
        for i, (v, w, s, o) in enumerate(todo):
            t_run = time.monotonic()
            with workload(w):
                r = run(
                    edus,
                    v,
                    s,
                    Optimisations.parse(o),
                    args.upgrades,
                    land_timeout=args.land_timeout,
                    zygote=zygote,
                )
            entry = {**run_entry(w, r, time.monotonic() - t_run), "boot": doc["boots"]}
            doc["runs"].append(entry)
            d = entry["downtime_ms"]
            print(
                f"[{i + 1}/{len(todo)} {time.monotonic() - started:.0f}s] {v} vCPUs {w} {s} {o}: "
                f"{downtime_text(d, len(entry['downtimes_ms']))}, lost {entry['lost']} "
                f"spurious {entry['spurious']} dup {entry['duplicated']}",
                flush=True,
            )
            # Whole or not at all: the VM may be stopped at any moment.
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, out)
    finally:
        if zygote is not None:
            zygote.close()
        close_edus(edus)
    return 0


# The report, on the host.


def _key(r: dict[str, Any]) -> tuple[int, str, str]:
    return (r["vcpus"], r["workload"], r["strategy"])


def ratios(doc: dict[str, Any]) -> dict[tuple[int, str, str, str], float]:
    """p50 downtime of the unoptimised flow over this run's, per configuration."""
    base = {_key(r): r["downtime_ms"]["p50"] for r in doc["runs"] if r["optimisations"] == "none"}
    out = {}
    for r in doc["runs"]:
        b = base.get(_key(r))
        if b is not None and r["downtime_ms"].get("p50"):
            out[(*_key(r), r["optimisations"])] = b / r["downtime_ms"]["p50"]
    return out


def table(doc: dict[str, Any]) -> str:
    """A Markdown table of every run."""
    rat = ratios(doc)
    lines = [
        "| vCPUs | workload | strategy | optimisations | n | p50 ms | p99 ms | max ms "
        "| suspend | save | load | startup | vs none | lost | spurious | dup |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["runs"]:
        d, ph = r["downtime_ms"], r["phases_p50_ms"]
        ratio = rat.get((*_key(r), r["optimisations"]))
        n = len(r["downtimes_ms"])
        p99 = f"{d['p99']:.2f}" if n >= P99_MIN_SAMPLES else "-"
        lines.append(
            f"| {r['vcpus']} | {r['workload']} | {r['strategy']} | {r['optimisations']} "
            f"| {n} | {d['p50']:.2f} | {p99} | {d['max']:.2f} "
            f"| {ph['suspend']:.2f} | {ph['save']:.2f} | {ph['load']:.2f} | {ph['startup']:.2f} "
            f"| {'' if ratio is None else f'{ratio:.1f}x'} "
            f"| {r['lost']} | {r['spurious']} | {r['duplicated']} |"
        )
    return "\n".join(lines)


# The stamps worth a column in "where the time goes", in flow order.
STAMP_COLUMNS = (
    ("old_suspended", "old: vCPUs stopped"),
    ("old_vapic_saved", "old: vAPIC saved"),
    ("new_load", "new: woke for vAPIC"),
    ("new_vapic_loaded", "new: vAPIC loaded"),
    ("old_saved", "old: devices saved"),
    ("new_device_ready", "new: woke for devices"),
    ("new_loaded", "new: devices loaded"),
    ("new_running", "new: gate open"),
)


def stamps_table(doc: dict[str, Any], optimisations: str = "all") -> str:
    """Median stamps of both VMMs (ms after the pause) for the runs with ``optimisations``."""
    head = " | ".join(label for _, label in STAMP_COLUMNS)
    lines = [
        f"| vCPUs | workload | strategy | {head} |",
        "|---:|---|---|" + "---:|" * len(STAMP_COLUMNS),
    ]
    for r in doc["runs"]:
        st = r.get("stamps_p50_ms") or {}
        if r["optimisations"] != optimisations or not st:
            continue
        cells = " | ".join(f"{st[k]:.2f}" if k in st else "" for k, _ in STAMP_COLUMNS)
        lines.append(f"| {r['vcpus']} | {r['workload']} | {r['strategy']} | {cells} |")
    return "\n".join(lines)


def steps_table(doc: dict[str, Any], optimisations: str = "all") -> str:
    """The new VMM's steps after the last signal (see :func:`new_steps`) for
    the runs with ``optimisations`` that recorded them; empty if none did."""
    lines = []
    for r in doc["runs"]:
        st = r.get("new_steps") or {}
        if r["optimisations"] != optimisations or "cpu_p50_ms" not in st:
            continue
        w, c, f = st["wall_p50_ms"], st["cpu_p50_ms"], st["faults_p50"]
        lines.append(
            f"| {r['vcpus']} | {r['workload']} | {r['strategy']} | {w['wake']:.2f} "
            f"| {w['check']:.2f} | {c['check']:.2f} | {f['check']:g} "
            f"| {w['finish']:.2f} | {c['finish']:.2f} | {f['finish']:g} "
            f"| {st['preempted']} of {st['measured']} |"
        )
    if not lines:
        return ""
    return "\n".join(
        [
            "| vCPUs | workload | strategy | wake | check | its CPU | faults | finish "
            "| its CPU | faults | preempted |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *lines,
        ]
    )


def plot(doc: dict[str, Any], path: Path) -> None:
    """Box plots of the downtime distributions: one panel per vCPU count."""
    import matplotlib  # noqa: PLC0415 - only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    vcpus = sorted({r["vcpus"] for r in doc["runs"]})
    fig, axes = plt.subplots(len(vcpus), 1, figsize=(14, 5.2 * len(vcpus)), squeeze=False)
    for ax, v in zip(axes[:, 0], vcpus, strict=True):
        runs = [r for r in doc["runs"] if r["vcpus"] == v]
        data = [r["downtimes_ms"] for r in runs]
        # One line each, turned upright: the ablation rows' names are long.
        labels = [f"{r['workload']} {r['strategy']} {r['optimisations']}" for r in runs]
        box = ax.boxplot(data, patch_artist=True, showfliers=True)
        for patch, r in zip(box["boxes"], runs, strict=True):
            patch.set_facecolor("#4c9f70" if r["optimisations"] == "all" else "#d9a441")
        ax.set_xticks(range(1, len(runs) + 1), labels, fontsize=6, rotation=90)
        ax.set_yscale("log")
        ax.set_ylabel("vCPU downtime (ms)")
        ax.set_title(f"{v} vCPUs: green all optimisations, amber without some or all")
        ax.grid(axis="y", alpha=0.3)
    env = doc["environment"]
    fig.suptitle(
        f"kvmlu live upgrade, {doc['upgrades_per_run']} upgrades per box; guest kernel "
        f"{env['kernel']}, {env['guest_cpus']} vCPUs, accel {env['accel']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths: list[str]) -> dict[str, Any]:
    """Several bench JSON files of one VM run as one document (runs in order)."""
    docs = [load_json_object(p, ("runs", "exec_startup_s"), "bench upgrade result") for p in paths]
    empty = [p for p, d in zip(paths, docs, strict=True) if not d["runs"]]
    if empty:
        raise InputError(f"{', '.join(empty)}: no runs: nothing to report")
    doc = dict(docs[0])
    doc["runs"] = [r for d in docs for r in d["runs"]]
    doc["exec_startup_s"] = [x for d in docs for x in d["exec_startup_s"]]
    return doc


def report(args: argparse.Namespace) -> int:
    doc = merge(args.json)
    if args.merged:
        Path(args.merged).write_text(json.dumps(doc, indent=1))
    text = table(doc) + "\n\nWhere the time goes (median stamps, ms after the pause):\n\n"
    text += stamps_table(doc)
    steps = steps_table(doc)
    if steps:
        text += (
            "\n\nThe new VMM after the old one's last signal (medians over the upgrades, ms: "
            "wake-up, check of the saved state, finish to the open gate, the CPU time "
            "its thread used and the page faults it took in each; upgrades in which that "
            "thread was preempted):\n\n"
        ) + steps
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    else:
        print(text)
    if args.png:
        plot(doc, Path(args.png))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vcpus",
        type=int_range(1, max_vcpus(EDUS)),
        nargs="+",
        default=[8, 64, 88],
        help=f"vCPU counts (the handoff of {EDUS} edu functions leaves room for "
        f"{max_vcpus(EDUS)} vCPUs in one message)",
    )
    p.add_argument(
        "--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), help="workloads"
    )
    p.add_argument(
        "--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES), help="strategies"
    )
    p.add_argument("--upgrades", type=int_range(1), default=50, help="upgrades per run")
    p.add_argument("--no-ablations", action="store_true", help="skip the one-off-at-a-time runs")
    p.add_argument(
        "--ablation-workloads",
        nargs="+",
        choices=WORKLOADS,
        default=["idle"],
        help="workloads the one-off-at-a-time runs use (default: idle)",
    )
    p.add_argument(
        "--land-timeout",
        type=float,
        default=1.0,
        help="seconds after which a raise that has not landed counts as lost "
        f"(default: %(default)s; the tests use {LAND_TIMEOUT:g}); each run "
        "records its slowest landing as land_ms_max",
    )
    p.add_argument("--json", default="results/bench/upgrade.json", help="where to write")
    p.add_argument(
        "--resume",
        action="store_true",
        help="add only the rows the JSON file lacks (a matrix too long for one boot); "
        "it must have been measured with the same upgrades, landing timeout and guest",
    )


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("json", nargs="+", help="what kvmlu bench upgrade wrote (one or more)")
    p.add_argument("--merged", metavar="PATH", help="write the runs of all of them here")
    p.add_argument("--markdown", metavar="PATH", help="write the table here")
    p.add_argument("--png", metavar="PATH", help="write the plot here")
