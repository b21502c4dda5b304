"""Benchmark: one edu interrupt stream through two paths to a waiting vCPU thread.

``kernel``
    VFIO's MSI eventfd is bound to a kvmlu descriptor; the kernel posts in the
    eventfd's wakeup callback and signals the vCPU thread's notification
    eventfd. No userspace runs between the MSI and the vCPU thread.
``userspace``
    What a VMM without kernel posting does: an interrupt thread waits on
    VFIO's MSI eventfd, reads it, and delivers the vector to the vCPU thread
    (here with the POST ioctl, which signals the same notification eventfd).

The vCPU thread is the same in both: it waits on its notification eventfd and
fetches the descriptor. Latency is raise-to-fetch with one interrupt in flight
(ping-pong); throughput is measured with the device raising as fast as it can,
through pwrite() so that the raising thread does not hold Python's GIL while
its store traps, and then with the same paced stream through both paths
(``rate`` raises a second), where what differs is how much of it reaches the
vCPU thread and the CPU the consuming threads spend per MSI. The raiser runs
on the CPU that takes the device's MSI, so that every raise reaches the
kernel as an interrupt of its own (elsewhere, raises pile up in that CPU's
APIC while it waits for its turn under TCG).
Modes alternate round by round, so drift in the machine hits both alike, and
every throughput figure comes with its spread over the rounds.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pyctl.edu import Edu
from pyctl.kvmlu import Device, Table
from pyctl.metrics import drain_eventfd, percentile
from pyctl.qemu.bar import msi_cpus, pinned

VECTOR = 0x51
MODES = ("kernel", "userspace")


def _wait(fd: int, stop: threading.Event) -> bool:
    """Block until ``fd`` is readable; False once ``stop`` is set."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    while not stop.is_set():
        if p.poll(100):
            return True
    return False


@dataclass
class Stream:
    """One path from the device's MSI eventfd to the vCPU thread, running."""

    mode: str
    table: Table
    edu: Edu
    notify: int
    stop: threading.Event = field(default_factory=threading.Event)
    delivered: int = 0  # fetches that returned the vector
    consumed: int = 0  # MSI eventfd counts consumed (by kvmlu or by the interrupt thread)
    stamps: list[int] = field(default_factory=list)
    got: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    binding: Any = None
    #: CPU seconds of each consuming thread (interrupt thread, vCPU thread),
    #: each written once by its own thread as it ends.
    thread_cpu_s: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        msi = self.edu.msi_eventfd
        assert msi is not None
        self.table.set_notify(0, self.notify, nv=0xF2, ndst=0)
        if self.mode == "kernel":
            self.binding = self.table.bind(msi, 0, VECTOR)
        else:
            self.threads.append(threading.Thread(target=self._forwarder, args=(msi,)))
        self.threads.append(threading.Thread(target=self._vcpu))
        for t in self.threads:
            t.start()

    def _forwarder(self, msi: int) -> None:
        cpu0 = time.thread_time()
        self._forward(msi)
        self.thread_cpu_s["interrupt"] = time.thread_time() - cpu0

    def _forward(self, msi: int) -> None:
        while _wait(msi, self.stop):
            n = drain_eventfd(msi)
            if n:
                self.consumed += n
                self.table.post(0, VECTOR)

    def _vcpu(self) -> None:
        cpu0 = time.thread_time()
        self._run_vcpu()
        self.thread_cpu_s["vcpu"] = time.thread_time() - cpu0

    def _run_vcpu(self) -> None:
        while _wait(self.notify, self.stop):
            drain_eventfd(self.notify)
            if VECTOR in self.table.fetch(0):
                self.stamps.append(time.perf_counter_ns())
                self.delivered += 1
                self.got.set()

    def consumed_now(self) -> int:
        """MSI eventfd counts consumed so far, while the stream runs."""
        return self.binding.info().stats.signals if self.binding is not None else self.consumed

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        if self.binding is not None:
            self.consumed = self.binding.info().stats.signals
            self.binding.close()
        self.table.set_notify(0, None, nv=0xF2, ndst=0)
        self.table.fetch(0)
        drain_eventfd(self.notify)


def _latency_round(dev: Device, edu: Edu, mode: str, samples: int) -> list[float]:
    """Raise-to-fetch latency in microseconds, one interrupt in flight at a time."""
    notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    out: list[float] = []
    with dev.create_table(1) as table:
        s = Stream(mode, table, edu, notify)
        s.start()
        try:
            for _ in range(samples):
                s.got.clear()
                n = len(s.stamps)
                t0 = time.perf_counter_ns()
                edu.raise_irq()
                if not s.got.wait(5.0):
                    raise TimeoutError(f"{mode}: an MSI was not delivered within 5 s")
                out.append((s.stamps[n] - t0) / 1000)
        finally:
            s.finish()
            os.close(notify)
    return out


def _throughput_round(
    dev: Device, edu: Edu, mode: str, seconds: float, rate: float | None = None
) -> dict[str, float]:
    """Raise for ``seconds`` and count what reaches the vCPU thread.

    Without ``rate`` the device raises as fast as it takes it; with it, at
    ``rate`` raises a second on an absolute schedule (a raiser that falls
    behind catches up at once), so that both paths get the same stream.
    ``consumer_cpu_us_per_raised`` is the CPU time of the threads that
    take the stream (the interrupt thread of the userspace path, the vCPU
    thread) per raise; the kernel path's posting runs in VFIO's interrupt
    handler and is not in it. (The machine's busy time from /proc/stat was
    tried for that and dropped: its tick sampling missed most of the
    consumers' own CPU time under TCG.)
    """
    notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    raised = 0
    with dev.create_table(1) as table:
        s = Stream(mode, table, edu, notify)
        s.start()
        try:
            t0 = time.perf_counter()
            end = t0 + seconds
            while (now := time.perf_counter()) < end:
                if rate is None:
                    for _ in range(64):
                        edu.raise_irq(syscall=True)
                    raised += 64
                    continue
                due = t0 + raised / rate
                if now < due:
                    time.sleep(min(due, end) - now)
                    continue
                edu.raise_irq(syscall=True)
                raised += 1
            elapsed = time.perf_counter() - t0
            # Let the tail of the stream arrive: wait until every raise has
            # been consumed (the interrupt thread may be behind by many),
            # for at most 2 s (the device may merge a raise into one whose
            # MSI is still in flight, and then the count never gets there).
            deadline = time.perf_counter() + 2.0
            while time.perf_counter() < deadline and s.consumed_now() < raised:
                time.sleep(0.01)
        finally:
            s.finish()
            os.close(notify)
    return {
        "seconds": elapsed,
        "raised_per_s": raised / elapsed,
        "consumed_per_s": s.consumed / elapsed,
        "delivered_per_s": s.delivered / elapsed,
        "raised": raised,
        "consumed": s.consumed,
        "delivered": s.delivered,
        "consumed_per_raised": s.consumed / max(raised, 1),
        "delivered_per_raised": s.delivered / max(raised, 1),
        "consumer_cpu_us_per_raised": sum(s.thread_cpu_s.values()) * 1e6 / max(raised, 1),
    }


#: The per-round figures of a throughput phase that get a spread.
ROUND_KEYS = (
    "raised_per_s",
    "consumed_per_s",
    "delivered_per_s",
    "consumed_per_raised",
    "delivered_per_raised",
    "consumer_cpu_us_per_raised",
)


def summarize_rounds(rounds: list[dict[str, float]]) -> dict[str, Any]:
    """Totals over the rounds of one phase, and each figure's spread across them.

    Rates are totals over total time, per-raised figures totals over total
    raises; ``spread`` gives each figure's mean, sample standard deviation
    (0 for a single round), min and max over the rounds.
    """
    total_s = sum(r["seconds"] for r in rounds)
    raised = sum(r["raised"] for r in rounds)
    out: dict[str, Any] = {
        "rounds": len(rounds),
        "raised_per_s": raised / total_s,
        "consumed_per_s": sum(r["consumed"] for r in rounds) / total_s,
        "delivered_per_s": sum(r["delivered"] for r in rounds) / total_s,
        "consumed_per_raised": sum(r["consumed"] for r in rounds) / max(raised, 1),
        "delivered_per_raised": sum(r["delivered"] for r in rounds) / max(raised, 1),
    }
    out["consumer_cpu_us_per_raised"] = sum(
        r["consumer_cpu_us_per_raised"] * r["raised"] for r in rounds
    ) / max(raised, 1)
    out["spread"] = {
        k: {
            "mean": statistics.fmean(r[k] for r in rounds),
            "stdev": statistics.stdev(r[k] for r in rounds) if len(rounds) > 1 else 0.0,
            "min": min(r[k] for r in rounds),
            "max": max(r[k] for r in rounds),
        }
        for k in ROUND_KEYS
    }
    out["per_round"] = rounds
    return out


#: Raises a second in the paced phase: below what either path takes at full
#: speed in the test VM (about 17,000 and 27,000 a second on one TCG thread).
DEFAULT_RATE = 1000.0


def run(
    edu: Edu,
    samples: int = 2000,
    seconds: float = 4.0,
    rounds: int = 4,
    rate: float = DEFAULT_RATE,
) -> dict[str, Any]:
    """Both modes, alternating for ``rounds`` rounds; returns plain data for JSON.

    Each round measures latency, then throughput at full speed, then the
    same stream of ``rate`` raises a second through both paths. The calling
    thread, which raises, runs on the CPU that takes the device's MSI
    throughout, so that each raise reaches the kernel as its own interrupt.
    """
    lat: dict[str, list[float]] = {m: [] for m in MODES}
    thr: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    paced: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with Device() as dev, pinned(msi_cpus(edu.bdf)):
        for _ in range(rounds):
            for m in MODES:
                lat[m] += _latency_round(dev, edu, m, samples // rounds)
            for m in MODES:
                thr[m].append(_throughput_round(dev, edu, m, seconds / rounds))
            for m in MODES:
                paced[m].append(_throughput_round(dev, edu, m, seconds / rounds, rate))
    modes: dict[str, Any] = {}
    for m in MODES:
        xs = sorted(lat[m])
        modes[m] = {
            "latency_us": {
                "samples": len(xs),
                "p50": percentile(xs, 0.5),
                "p99": percentile(xs, 0.99),
                "max": max(xs),
                "mean": statistics.fmean(xs),
            },
            "throughput": summarize_rounds(thr[m]),
            "paced": summarize_rounds(paced[m]),
        }
    k, u = modes["kernel"], modes["userspace"]
    ratios = {
        "latency_p50_userspace_over_kernel": u["latency_us"]["p50"] / k["latency_us"]["p50"],
        "latency_p99_userspace_over_kernel": u["latency_us"]["p99"] / k["latency_us"]["p99"],
        "consumed_per_s_kernel_over_userspace": k["throughput"]["consumed_per_s"]
        / u["throughput"]["consumed_per_s"],
        "delivered_per_s_kernel_over_userspace": k["throughput"]["delivered_per_s"]
        / max(u["throughput"]["delivered_per_s"], 1e-9),
        "raised_per_s_kernel_over_userspace": k["throughput"]["raised_per_s"]
        / u["throughput"]["raised_per_s"],
        "consumed_per_raised_kernel_over_userspace": k["throughput"]["consumed_per_raised"]
        / max(u["throughput"]["consumed_per_raised"], 1e-9),
        "paced_consumer_cpu_per_raised_userspace_over_kernel": u["paced"][
            "consumer_cpu_us_per_raised"
        ]
        / max(k["paced"]["consumer_cpu_us_per_raised"], 1e-9),
    }
    return {
        "benchmark": "irq-path",
        "edu": edu.bdf,
        "rate": rate,
        "rounds": rounds,
        "modes": modes,
        "ratios": ratios,
    }


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    u = os.uname()
    return {
        "kernel": u.release,
        "cpus": os.cpu_count(),
        "in_vm": os.environ.get("KVMLU_IN_VM") == "1",
        "accel": os.environ.get("KVMLU_ACCEL", "unknown"),
    }


def _spread(phase: dict[str, Any], key: str, fmt: str = ".0f") -> str:
    sp = phase["spread"][key]
    return f"{phase[key]:{fmt}} ± {sp['stdev']:{fmt}}"


def table_text(result: dict[str, Any]) -> str:
    """Markdown tables of a result: latency and full speed, then the paced stream.

    "± x" is the sample standard deviation of that figure over the rounds.
    """
    n = result.get("rounds", 1)
    lines = [
        "| path | p50 µs | p99 µs | max µs | raised/s | consumed/s | deliveries/s "
        "| consumed per raise | deliveries per raise |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in MODES:
        lat, thr = result["modes"][m]["latency_us"], result["modes"][m]["throughput"]
        lines.append(
            f"| {m} | {lat['p50']:.0f} | {lat['p99']:.0f} | {lat['max']:.0f} "
            f"| {_spread(thr, 'raised_per_s')} | {_spread(thr, 'consumed_per_s')} "
            f"| {_spread(thr, 'delivered_per_s')} | {_spread(thr, 'consumed_per_raised', '.3f')} "
            f"| {_spread(thr, 'delivered_per_raised', '.3f')} |"
        )
    rate = result.get("rate")
    if rate is not None:
        lines += [
            "",
            f"The same stream through both paths: {rate:.0f} raises a second, {n} rounds.",
            "",
            "| path | raised/s | consumed per raise | deliveries per raise "
            "| consumer CPU µs per raise |",
            "|---|---:|---:|---:|---:|",
        ]
        for m in MODES:
            pc = result["modes"][m]["paced"]
            lines.append(
                f"| {m} | {_spread(pc, 'raised_per_s')} "
                f"| {_spread(pc, 'consumed_per_raised', '.3f')} "
                f"| {_spread(pc, 'delivered_per_raised', '.3f')} "
                f"| {_spread(pc, 'consumer_cpu_us_per_raised')} |"
            )
    r = result["ratios"]
    lines.append("")
    text = (
        f"userspace/kernel latency: p50 {r['latency_p50_userspace_over_kernel']:.2f}x, "
        f"p99 {r['latency_p99_userspace_over_kernel']:.2f}x; at full speed kernel/userspace "
        f"raised {r.get('raised_per_s_kernel_over_userspace', float('nan')):.2f}x, "
        f"MSIs consumed {r['consumed_per_s_kernel_over_userspace']:.2f}x, deliveries "
        f"{r['delivered_per_s_kernel_over_userspace']:.2f}x"
    )
    if "paced_consumer_cpu_per_raised_userspace_over_kernel" in r:
        text += (
            f"; at the same rate userspace/kernel consumer CPU per raise "
            f"{r['paced_consumer_cpu_per_raised_userspace_over_kernel']:.2f}x"
        )
    lines.append(text)
    return "\n".join(lines)


def main(
    bdf: str, samples: int, seconds: float, out: str | None, rate: float = DEFAULT_RATE
) -> dict[str, Any]:
    """Run on edu function ``bdf``, print the table, write JSON to ``out``."""
    with Edu(bdf) as edu:
        edu.enable_msi()
        try:
            result = run(edu, samples=samples, seconds=seconds, rate=rate)
        finally:
            edu.disable_msi()
            assert edu.msi_eventfd is not None
            os.close(edu.msi_eventfd)
    result["environment"] = environment()
    print(table_text(result))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"results written to {out}")
    return result
