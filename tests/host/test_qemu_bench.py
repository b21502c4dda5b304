"""kvmlu bench qemu: its arithmetic, its table, and every option reaching its code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pyctl import cli
from pyctl.metrics import drain_eventfd, percentile
from pyctl.qemu import bench as qbench
from pyctl.qemu import guest as qguest
from pyctl.qemu import run as qrun


def test_percentile_is_nearest_rank() -> None:
    us = [float(x) for x in range(1, 11)]
    assert percentile(us, 0.9) == 9.0
    assert percentile(us, 1.0) == 10.0
    assert percentile(us, 0.5) == 5.0
    assert percentile([5.0], 0.9) == 5.0
    # A p99 of 50 samples is their maximum.
    assert percentile([float(x) for x in range(50)], 0.99) == 49.0
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            percentile(us, bad)
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_drain_eventfd_reads_and_resets() -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        assert drain_eventfd(fd) == 0
        os.eventfd_write(fd, 3)
        os.eventfd_write(fd, 4)
        assert drain_eventfd(fd) == 7
        assert drain_eventfd(fd) == 0
    finally:
        os.close(fd)


def test_summary_subtracts_the_idle_stretch() -> None:
    r = qbench.PathResult("kvmlu", interrupts=4, samples_ns=[1000, 2000, 3000, 40000])
    r.qemu_cpu_seconds, r.idle_qemu_cpu_seconds = 0.010, 0.002
    r.host_cpu_seconds, r.idle_host_cpu_seconds = 0.030, 0.010
    s = r.summary()
    assert s["p50_us"] == 2.5 and s["max_us"] == 40.0
    assert s["qemu_cpu_us_per_irq"] == pytest.approx(2000.0)
    assert s["host_cpu_us_per_irq"] == pytest.approx(5000.0)
    assert qbench.PathResult("on").summary() == {}


def test_cpu_readers_read_this_process() -> None:

    assert qbench.proc_cpu_seconds(os.getpid()) >= 0.0
    assert qbench.host_busy_seconds() > 0.0


def test_options_reach_measure_and_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[qrun.InnerOptions, int, float]] = []

    def fake_measure(opts: qrun.InnerOptions, n: int, boot_timeout: float) -> qbench.PathResult:
        seen.append((opts, n, boot_timeout))
        return qbench.PathResult(opts.mode, interrupts=n, samples_ns=[1000] * n)

    qemu = tmp_path / "qemu"
    monkeypatch.setenv("KVMLU_EDU", "0000:00:09.0,0000:00:0a.0")
    monkeypatch.setattr(qrun, "check_host", lambda q, bdf: None)
    monkeypatch.setattr(qguest, "module_release", lambda ko=None: "6.1.0-test")
    monkeypatch.setattr(qrun, "find_kernel_image", lambda release: tmp_path / "vmlinuz")
    monkeypatch.setattr(qguest, "build_initramfs", lambda out, *a: out)
    monkeypatch.setattr(
        qrun,
        "mode_settings",
        lambda mode, q: (
            "off" if mode != "on" else "on",
            mode == "kvmlu",
            mode != "on",
            None,
        ),
    )
    monkeypatch.setattr(qrun, "qemu_version", lambda q: (10, 2, 2))
    monkeypatch.setattr(qbench, "measure", fake_measure)
    out, md = tmp_path / "q.json", tmp_path / "q.md"
    rc = cli.main(["bench", "qemu", "--interrupts", "7", "--paths", "on,kvmlu",
                   "--device", "0000:00:09.0", "--qemu", str(qemu), "--boot-timeout", "99",
                   "--json", str(out), "--markdown", str(md)])  # fmt: skip
    assert rc == 0
    assert [(o.mode, n, t) for o, n, t in seen] == [("on", 7, 99.0), ("kvmlu", 7, 99.0)]
    assert all(o.bdf == "0000:00:09.0" and o.qemu == qemu for o, _, _ in seen)
    doc = json.loads(out.read_text())
    assert [p["path"] for p in doc["paths"]] == ["on", "kvmlu"]
    assert doc["qemu_version"] == "10.2.2"
    assert "| kvmlu | 7 | 1 | 1 | 1 |" in md.read_text()


def test_bad_paths_are_refused() -> None:
    assert cli.main(["bench", "qemu", "--paths", "on,maybe"]) == 2
    assert cli.main(["bench", "qemu", "--interrupts", "0"]) == 2


def test_bench_qemu_upgrade_options_reach_measure_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyctl.qemu import bench_cpr

    seen: list[tuple[str, str, int, Path, str, int]] = []

    def fake_measure_row(
        row: bench_cpr.Row, workload: str, n: int, base: qrun.InnerOptions, work: Path
    ) -> dict[str, object]:
        seen.append((row.name, workload, n, base.qemu, base.accel, base.cpus))
        assert base.bdf == "0000:00:09.0"
        pause = {"n": n, "p50": 10.0 if row.path == "stock" else 5.0, "p90": 11.0, "max": 12.0}
        return {"row": row.name, "path": row.path, "kvmlu_props": list(row.kvmlu_props),
                "workload": workload, "ok": True, "error": None, "skipped": None,
                "upgrades_ok": n, "between_raised": n, "between_counted": n,
                "pause_ms": pause, "qemu_downtime_ms": {"n": 0}, "upgrades": []}  # fmt: skip

    qemu = tmp_path / "qemu"
    monkeypatch.setattr(qrun, "check_host", lambda q, bdf: None)
    monkeypatch.setattr(qguest, "module_release", lambda ko=None: "6.1.0-test")
    monkeypatch.setattr(qrun, "find_kernel_image", lambda release: tmp_path / "vmlinuz")
    monkeypatch.setattr(qguest, "build_initramfs", lambda out, *a: out)
    monkeypatch.setattr(qrun, "qemu_version", lambda q: (10, 2, 2))
    monkeypatch.setattr(bench_cpr, "measure_row", fake_measure_row)
    out, md = tmp_path / "u.json", tmp_path / "u.md"
    rc = cli.main(["bench", "qemu-upgrade", "--upgrades", "3", "--rows", "0,1",
                   "--workloads", "cpu", "--device", "0000:00:09.0", "--qemu", str(qemu),
                   "--accel", "tcg", "--cpus", "2",
                   "--json", str(out), "--markdown", str(md)])  # fmt: skip
    assert rc == 0
    assert seen == [
        ("stock cpr-transfer", "cpu", 3, qemu, "tcg", 2),
        ("kvmlu, every optimisation", "cpu", 3, qemu, "tcg", 2),
    ]
    doc = json.loads(out.read_text())
    assert [r["row"] for r in doc["rows"]] == [s[0] for s in seen]
    assert (doc["environment"]["inner_guest_accel"], doc["environment"]["inner_guest_cpus"]) == (
        "tcg",
        2,
    )
    assert "2 vCPU(s) under tcg" in md.read_text()
    assert "| kvmlu, every optimisation | cpu | 3 | 5.0 |" in md.read_text()
    assert "0.50x" in md.read_text()
    assert cli.main(["bench", "qemu-upgrade", "--rows", "9"]) == 2
    assert cli.main(["bench", "qemu-upgrade", "--workloads", "busy"]) == 2
    assert cli.main(["bench", "qemu-upgrade", "--cpus", "0"]) == 2
