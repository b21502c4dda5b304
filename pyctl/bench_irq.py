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
its store traps. Modes alternate, so drift in the machine hits both alike.
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


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


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
        while _wait(msi, self.stop):
            n = _drain(msi)
            if n:
                self.consumed += n
                self.table.post(0, VECTOR)

    def _vcpu(self) -> None:
        while _wait(self.notify, self.stop):
            _drain(self.notify)
            if VECTOR in self.table.fetch(0):
                self.stamps.append(time.perf_counter_ns())
                self.delivered += 1
                self.got.set()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        if self.binding is not None:
            self.consumed = self.binding.info().stats.signals
            self.binding.close()
        self.table.set_notify(0, None, nv=0xF2, ndst=0)
        self.table.fetch(0)
        _drain(self.notify)


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


def _throughput_round(dev: Device, edu: Edu, mode: str, seconds: float) -> dict[str, float]:
    """Raise as fast as the device takes it for ``seconds``; count what reaches the vCPU."""
    notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    raised = 0
    with dev.create_table(1) as table:
        s = Stream(mode, table, edu, notify)
        s.start()
        try:
            t0 = time.perf_counter()
            end = t0 + seconds
            while time.perf_counter() < end:
                for _ in range(64):
                    edu.raise_irq(syscall=True)
                raised += 64
            elapsed = time.perf_counter() - t0
            # Let the tail of the stream arrive: the last raise's MSI is consumed
            # once the counter stops moving for 50 ms (bounded by 2 s).
            deadline = time.perf_counter() + 2.0
            last = -1
            while time.perf_counter() < deadline:
                now = s.binding.info().stats.signals if s.binding else s.consumed
                if now == last:
                    break
                last = now
                time.sleep(0.05)
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
    }


def _percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def run(edu: Edu, samples: int = 2000, seconds: float = 4.0, rounds: int = 4) -> dict[str, Any]:
    """Both modes, alternating for ``rounds`` rounds; returns plain data for JSON."""
    lat: dict[str, list[float]] = {m: [] for m in MODES}
    thr: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with Device() as dev:
        for _ in range(rounds):
            for m in MODES:
                lat[m] += _latency_round(dev, edu, m, samples // rounds)
            for m in MODES:
                thr[m].append(_throughput_round(dev, edu, m, seconds / rounds))
    modes: dict[str, Any] = {}
    for m in MODES:
        xs = lat[m]
        total_s = sum(r["seconds"] for r in thr[m])
        modes[m] = {
            "latency_us": {
                "samples": len(xs),
                "p50": _percentile(xs, 50),
                "p99": _percentile(xs, 99),
                "max": max(xs),
                "mean": statistics.fmean(xs),
            },
            "throughput": {
                k: sum(r[k] for r in thr[m]) / total_s
                for k in ("raised_per_s", "consumed_per_s", "delivered_per_s")
            },
        }
    k, u = modes["kernel"], modes["userspace"]
    ratios = {
        "latency_p50_userspace_over_kernel": u["latency_us"]["p50"] / k["latency_us"]["p50"],
        "latency_p99_userspace_over_kernel": u["latency_us"]["p99"] / k["latency_us"]["p99"],
        "consumed_per_s_kernel_over_userspace": k["throughput"]["consumed_per_s"]
        / u["throughput"]["consumed_per_s"],
        "delivered_per_s_kernel_over_userspace": k["throughput"]["delivered_per_s"]
        / max(u["throughput"]["delivered_per_s"], 1e-9),
    }
    return {"benchmark": "irq-path", "edu": edu.bdf, "modes": modes, "ratios": ratios}


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    u = os.uname()
    return {
        "kernel": u.release,
        "cpus": os.cpu_count(),
        "in_vm": os.environ.get("KVMLU_IN_VM") == "1",
        "accel": os.environ.get("KVMLU_ACCEL", "unknown"),
    }


def table_text(result: dict[str, Any]) -> str:
    """A short Markdown table of a result."""
    lines = [
        "| path | p50 µs | p99 µs | max µs | raised/s | MSIs consumed/s | deliveries/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in MODES:
        lat, thr = result["modes"][m]["latency_us"], result["modes"][m]["throughput"]
        lines.append(
            f"| {m} | {lat['p50']:.0f} | {lat['p99']:.0f} | {lat['max']:.0f} "
            f"| {thr['raised_per_s']:.0f} | {thr['consumed_per_s']:.0f} "
            f"| {thr['delivered_per_s']:.0f} |"
        )
    r = result["ratios"]
    lines.append("")
    lines.append(
        f"userspace/kernel latency: p50 {r['latency_p50_userspace_over_kernel']:.2f}x, "
        f"p99 {r['latency_p99_userspace_over_kernel']:.2f}x; kernel/userspace MSIs consumed "
        f"{r['consumed_per_s_kernel_over_userspace']:.2f}x, deliveries "
        f"{r['delivered_per_s_kernel_over_userspace']:.2f}x"
    )
    return "\n".join(lines)


def main(bdf: str, samples: int, seconds: float, out: str | None) -> dict[str, Any]:
    """Run on edu function ``bdf``, print the table, write JSON to ``out``."""
    with Edu(bdf) as edu:
        edu.enable_msi()
        try:
            result = run(edu, samples=samples, seconds=seconds)
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
