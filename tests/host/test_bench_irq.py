"""The IRQ benchmark's arithmetic and its paced raiser, without a device.

The figures themselves come from the test VM (``make bench``); here a fake
edu function and table stand in, so that what the benchmark computes from
its rounds, and that the paced stream never runs ahead of its rate, can be
checked on the build machine.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import pytest

from pyctl import bench_irq
from pyctl.argtypes import positive_float


class FakeEdu:
    """An edu function whose MSI is a write to its eventfd."""

    def __init__(self) -> None:
        self.msi_eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.raises = 0

    def raise_irq(self, syscall: bool = False) -> None:
        self.raises += 1
        os.eventfd_write(self.msi_eventfd, 1)


class FakeTable:
    """A one-vCPU table: POST signals the notification eventfd, FETCH takes PIR."""

    def __init__(self) -> None:
        self.notify: int | None = None
        self.pir: set[int] = set()

    def __enter__(self) -> FakeTable:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def set_notify(self, vcpu: int, fd: int | None, nv: int, ndst: int) -> None:
        self.notify = fd

    def post(self, vcpu: int, vector: int) -> None:
        self.pir.add(vector)
        assert self.notify is not None
        os.eventfd_write(self.notify, 1)

    def fetch(self, vcpu: int) -> set[int]:
        out, self.pir = self.pir, set()
        return out


class FakeDevice:
    def create_table(self, nr_vcpus: int) -> FakeTable:
        return FakeTable()


def test_the_paced_stream_never_runs_ahead_of_its_rate() -> None:
    # Verifies: with a rate, a round raises no more than rate x elapsed
    # (+1 for the raise due at the start), and reports per-raise figures
    # from its own counts.
    edu = FakeEdu()
    try:
        r = bench_irq._throughput_round(FakeDevice(), edu, "userspace", 0.5, rate=200.0)  # type: ignore[arg-type]
    finally:
        os.close(edu.msi_eventfd)
    assert r["raised"] == edu.raises > 0
    assert r["raised"] <= 200.0 * r["seconds"] + 1
    assert r["consumed_per_raised"] == r["consumed"] / r["raised"]
    assert r["delivered"] <= r["consumed"] <= r["raised"]
    assert r["consumer_cpu_us_per_raised"] > 0


def _round(
    seconds: float, raised: int, consumed: int, delivered: int, cpu_us: float
) -> dict[str, float]:
    return {
        "seconds": seconds,
        "raised": raised,
        "consumed": consumed,
        "delivered": delivered,
        "raised_per_s": raised / seconds,
        "consumed_per_s": consumed / seconds,
        "delivered_per_s": delivered / seconds,
        "consumed_per_raised": consumed / raised,
        "delivered_per_raised": delivered / raised,
        "consumer_cpu_us_per_raised": cpu_us,
    }


def test_rounds_are_totalled_and_their_spread_kept() -> None:
    # Verifies: rates are totals over total time, per-raise figures totals
    # over total raises (CPU weighted by raises), and the spread is over rounds.
    s = bench_irq.summarize_rounds(
        [_round(1.0, 100, 90, 50, 10.0), _round(3.0, 300, 300, 150, 20.0)]
    )
    assert s["rounds"] == 2
    assert s["raised_per_s"] == 100.0
    assert s["consumed_per_s"] == 97.5
    assert s["consumed_per_raised"] == 390 / 400
    assert s["consumer_cpu_us_per_raised"] == (10.0 * 100 + 20.0 * 300) / 400
    sp = s["spread"]["consumed_per_raised"]
    assert (sp["min"], sp["max"], sp["mean"]) == (0.9, 1.0, 0.95)
    assert sp["stdev"] == pytest.approx(0.0707, abs=1e-4)
    assert (
        bench_irq.summarize_rounds([_round(1.0, 10, 10, 10, 1.0)])["spread"]["raised_per_s"][
            "stdev"
        ]
        == 0.0
    )


def test_the_table_names_the_spread_and_the_paced_stream() -> None:
    one = bench_irq.summarize_rounds(
        [_round(1.0, 100, 90, 50, 10.0), _round(1.0, 100, 100, 60, 12.0)]
    )
    mode: dict[str, Any] = {
        "latency_us": {"p50": 1.0, "p99": 2.0, "max": 3.0},
        "throughput": one,
        "paced": one,
    }
    result = {
        "rate": 100.0,
        "rounds": 2,
        "modes": {"kernel": mode, "userspace": mode},
        "ratios": {
            "latency_p50_userspace_over_kernel": 1.0,
            "latency_p99_userspace_over_kernel": 1.0,
            "consumed_per_s_kernel_over_userspace": 1.0,
            "delivered_per_s_kernel_over_userspace": 1.0,
            "raised_per_s_kernel_over_userspace": 1.0,
            "paced_consumer_cpu_per_raised_userspace_over_kernel": 1.0,
        },
    }
    text = bench_irq.table_text(result)
    assert "100 raises a second, 2 rounds" in text
    assert "| kernel | 100 ± 0 | 0.950 ± 0.071 |" in text
    assert "consumer CPU per raise 1.00x" in text


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "x"])
def test_positive_float_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_float(text)
    assert positive_float("0.25") == 0.25
