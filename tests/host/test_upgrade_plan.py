"""The upgrade's pure parts: optimisation specs, downtime phases, the bench matrix and report."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pytest

from pyctl import bench_upgrade, upgrade
from pyctl.bench_upgrade import (
    ABLATIONS,
    configs,
    merge,
    new_steps,
    ratios,
    row_key,
    run_entry,
    start_doc,
    steps_table,
    table,
)
from pyctl.check import Raise, check
from pyctl.errors import InputError
from pyctl.livevmm import Optimisations
from pyctl.upgrade import (
    P99_MIN_SAMPLES,
    Downtime,
    Raiser,
    RunResult,
    _downtime,
    targets_for,
    windows_of,
)


def test_optimisation_specs() -> None:
    assert Optimisations.parse("all") == Optimisations()
    assert Optimisations.parse("none") == Optimisations(False, False, False, False, False)
    o = Optimisations.parse("no-prestart,no-keep-eventfds")
    assert (o.prestart, o.concurrent, o.keep_eventfds, o.realtime, o.keep_vapic) == (
        False,
        True,
        False,
        True,
        True,
    )
    assert Optimisations.parse("no-keep-vapic") == Optimisations(keep_vapic=False)
    for spec in ["all", "none", "no-prestart", "no-concurrent,no-realtime", "no-keep-vapic"]:
        assert Optimisations.parse(Optimisations.parse(spec).label()) == Optimisations.parse(spec)


@pytest.mark.parametrize("bad", ["", "prestart", "no-warp", "all,no-prestart", "no-"])
def test_bad_optimisation_specs(bad: str) -> None:
    with pytest.raises(ValueError):
        Optimisations.parse(bad)


def test_phases_add_up_to_the_downtime() -> None:
    d = Downtime(pause=1.0, suspended=1.001, saved=1.004, loaded=1.006, running=1.007)
    ph = d.phases_ms()
    assert ph == pytest.approx({"suspend": 1, "save": 3, "load": 2, "startup": 1})
    assert sum(ph.values()) == pytest.approx(d.total_ms) == pytest.approx(7)


def test_startup_in_the_window_is_not_load() -> None:
    # No prestart: 50 ms of starting the new VMM after the save, then 2 ms of load.
    d = Downtime(1.0, 1.001, 1.004, 1.056, 1.057, started_in_window=0.05)
    ph = d.phases_ms()
    assert ph["load"] == pytest.approx(2) and ph["startup"] == pytest.approx(51)
    assert sum(ph.values()) == pytest.approx(d.total_ms)


def test_concurrent_load_that_ends_with_the_save_has_no_load_phase() -> None:
    d = Downtime(1.0, 1.001, 1.004, 1.003, 1.005)
    assert d.phases_ms()["load"] == pytest.approx(0)


def test_targets() -> None:
    assert targets_for(8, 3) == [(0, 0x41), (3, 0x62), (7, 0x73)]
    assert [v for v, _ in targets_for(64, 3)] == [0, 31, 63]


def test_matrix_order_and_ablations() -> None:
    c = configs([8, 88], ["idle"], ["naive", "shared"], ablate=True)
    assert c[:2] == [(8, "idle", "naive", "all"), (8, "idle", "naive", "none")]
    assert [o for v, _, s, o in c if v == 88 and s == "shared"] == ["all", "none", *ABLATIONS]
    assert not [o for v, _, s, o in c if v == 8 and o in ABLATIONS]
    assert len(configs([8, 64, 88], ["idle", "cpu", "memory", "disk"], ["shared"], False)) == 24
    # Ablations run under idle unless asked for other workloads too.
    both = configs([88], ["idle", "cpu"], ["shared"], ablate=True)
    assert [w for _, w, _, o in both if o in ABLATIONS] == ["idle"] * len(ABLATIONS)
    both = configs([88], ["idle", "cpu"], ["shared"], True, ("idle", "cpu"))
    assert len([o for *_, o in both if o in ABLATIONS]) == 2 * len(ABLATIONS)


def run(v: int, s: str, o: str, p50: float, lost: int = 0) -> dict[str, object]:
    return {
        "vcpus": v,
        "workload": "idle",
        "strategy": s,
        "optimisations": o,
        "downtime_ms": {"p50": p50, "p99": p50 * 2, "max": p50 * 3, "min": p50 / 2},
        "phases_p50_ms": {"suspend": 1.0, "save": 2.0, "load": 3.0, "startup": p50 - 6},
        "lost": lost,
        "spurious": 0,
        "duplicated": 0,
        "downtimes_ms": [p50],
    }


def test_ratios_are_against_the_unoptimised_run_of_the_same_configuration(tmp_path: Path) -> None:
    doc = {
        "runs": [
            run(88, "shared", "all", 10),
            run(88, "shared", "none", 800),
            run(88, "naive", "all", 20, lost=5),
            run(88, "naive", "none", 100, lost=9),
            run(8, "shared", "all", 8),
        ],
        "exec_startup_s": [],
    }
    r = ratios(doc)
    assert r[(88, "idle", "shared", "all")] == pytest.approx(80)
    assert r[(88, "idle", "naive", "all")] == pytest.approx(5)
    assert (8, "idle", "shared", "all") not in r  # no baseline measured
    text = table(doc)
    # One sample a row: no p99, only n and the max.
    assert "| 88 | idle | shared | all | 1 | 10.00 | - | 30.00 |" in text
    many = {**doc["runs"][0], "downtimes_ms": [10.0] * P99_MIN_SAMPLES}
    assert "| 100 | 10.00 | 20.00 | 30.00 |" in table({**doc, "runs": [many]})
    assert "80.0x" in text and "| 5 | 0 | 0 |" in text
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({**doc, "runs": doc["runs"][:2], "exec_startup_s": [1.5]}))
    b.write_text(json.dumps({**doc, "runs": doc["runs"][2:], "exec_startup_s": [1.7]}))
    m = merge([str(a), str(b)])
    assert m["runs"] == doc["runs"] and m["exec_startup_s"] == [1.5, 1.7]


def test_run_entry_records_where_the_time_goes() -> None:
    detail = {"old_pause": 10.0, "old_saved": 10.002, "new_running": 10.004}
    dts = [
        Downtime(10.0, 10.001, 10.002, 10.003, 10.004, detail=detail, vapic_handed=True),
        Downtime(20.0, 20.001, 20.002, 20.003, 20.010, rolled_back=True),
    ]
    r = RunResult("shared", "all", 8, dts, check([], []), 0, 0, 0)
    e = run_entry("idle", r, 12.34)
    assert e["workload"] == "idle" and e["wall_s"] == 12.3
    assert e["stamps_p50_ms"] == pytest.approx({"old_pause": 0, "old_saved": 2, "new_running": 4})
    assert e["vapic_handed"] == 1 and e["rolled_back"] == 1
    assert e["downtimes_ms"] == pytest.approx([4, 10])


def test_downtime_from_the_takeover_reply() -> None:
    saved = {"pause": 1.0, "suspended": 1.001, "saved": 1.002}
    reply = {
        "t": {"woke": 1.0025, "loaded": 1.003, "running": 1.004},
        "vapic_inherited": True,
    }
    d = _downtime(saved, reply, 0.0)
    assert d.total_ms == pytest.approx(4.0)
    assert d.vapic_handed
    # Only stamps are stamps: the counters stay out of "where the time goes".
    assert set(d.detail) == {f"old_{k}" for k in saved} | {f"new_{k}" for k in reply["t"]}
    assert _downtime(saved, {"t": reply["t"]}, 0.0).vapic_handed is False


def test_the_new_vmms_steps_are_medians_of_each_upgrades_own() -> None:
    def upgrade(
        t0: float, wake: float, check_: float, cpu: float, switches: int, faults: int
    ) -> Downtime:
        ready = t0 + 0.002 + wake
        detail = {
            "old_pause": t0,
            "old_saved": t0 + 0.002,
            "new_device_ready": ready,
            "new_loaded": ready + check_,
            "new_running": ready + check_ + 0.001,
        }
        use = {
            "device_ready": (5.0, 7, 100),
            "loaded": (5.0 + cpu, 7, 100 + faults),
            "ready": (5.0 + cpu, 7 + switches, 101 + faults),
        }
        return Downtime(
            t0,
            t0 + 0.001,
            t0 + 0.002,
            ready + check_,
            ready + check_ + 0.001,
            detail=detail,
            use=use,
        )

    dts = [
        upgrade(10.0, 0.001, 0.002, 0.0001, 0, 30),
        upgrade(20.0, 0.003, 0.0001, 0.0001, 2, 0),
        upgrade(30.0, 0.002, 0.003, 0.0002, 0, 40),
        Downtime(40.0, 40.1, 40.2, 40.3, 40.4, rolled_back=True, detail={"old_pause": 40.0}),
    ]
    st = new_steps(dts)
    # The wake and check medians come from different upgrades: the median of
    # each upgrade's own length, not a difference of the stamps' medians.
    assert st["wall_p50_ms"] == pytest.approx({"wake": 2.0, "check": 2.0, "finish": 1.0})
    assert st["cpu_p50_ms"] == pytest.approx({"check": 0.1, "finish": 0.0})
    assert st["faults_p50"] == {"check": 30, "finish": 1}
    assert (st["preempted"], st["measured"]) == (1, 3)
    # A reply without thread use (an older VMM) gives the wall times alone.
    bare = [
        Downtime(d.pause, d.suspended, d.saved, d.loaded, d.running, detail=d.detail)
        for d in dts[:3]
    ]
    assert "cpu_p50_ms" not in new_steps(bare)
    doc = {
        "runs": [
            {**run(8, "shared", "all", 3.0), "new_steps": st},
            {**run(8, "shared", "none", 30.0), "new_steps": st},
        ]
    }
    text = steps_table(doc)
    assert "| 8 | idle | shared | 2.00 | 2.00 | 0.10 | 30 | 1.00 | 0.00 | 1 | 1 of 3 |" in text
    assert text.count("| 8 |") == 1
    assert steps_table({"runs": [run(8, "shared", "all", 3.0)]}) == ""


def test_takeover_reply_carries_the_threads_use() -> None:
    saved = {"pause": 1.0, "suspended": 1.001, "saved": 1.002}
    reply = {"t": {"loaded": 1.003, "running": 1.004}, "use": {"loaded": [0.5, 3, 9]}}
    assert _downtime(saved, reply, 0.0).use == {"loaded": (0.5, 3, 9)}
    assert _downtime(saved, {"t": reply["t"]}, 0.0).use == {}


def test_resume_keeps_what_was_measured_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "upgrade.json"
    fresh = start_doc(path, 50, 1.0, resume=True)  # nothing there yet
    assert (fresh["boots"], fresh["runs"]) == (1, [])
    fresh["runs"].append({**run(88, "shared", "all", 3.7), "boot": 1})
    path.write_text(json.dumps(fresh))
    again = start_doc(path, 50, 1.0, resume=True)
    assert again["boots"] == 2
    assert [row_key(r) for r in again["runs"]] == [(88, "idle", "shared", "all")]
    assert start_doc(path, 50, 1.0, resume=False)["runs"] == []
    with pytest.raises(ValueError, match="upgrades_per_run"):
        start_doc(path, 60, 1.0, resume=True)
    with pytest.raises(ValueError, match="land_timeout_s"):
        start_doc(path, 50, 5.0, resume=True)
    fresh["environment"]["kernel"] = "another"
    path.write_text(json.dumps(fresh))
    with pytest.raises(ValueError, match="kernel"):
        start_doc(path, 50, 1.0, resume=True)


def test_a_workload_leaves_no_process_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Like fio's job processes: a worker in a session of its own, which
    # killing the workload's process group does not reach. The worker
    # writes its pid itself, once in its session, and the test waits for
    # it: workload() gives the workload 2 s to start, which a loaded
    # machine may not honour.
    pidfile = tmp_path / "worker.pid"
    worker_sh = f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; exec sleep 300"
    script = f"setsid sh -c {shlex.quote(worker_sh)} & exec sleep 300"
    monkeypatch.setattr(bench_upgrade, "workload_argv", lambda name: ["sh", "-c", script])
    with bench_upgrade.workload("disk"):
        deadline = time.monotonic() + 120  # a guard only
        while not pidfile.exists():
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.01)
        worker = int(pidfile.read_text())
        assert worker in bench_upgrade.descendants(os.getpid())
        assert os.getsid(worker) == worker  # not in the workload's session
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text()


class _Edu:
    bdf = "0000:00:04.0"

    def __init__(self) -> None:
        self.raised = 0

    def raise_irq(self) -> None:
        self.raised += 1


class _Counter:
    """The host's MSI count: read ``reads`` times, then one more MSI."""

    def __init__(self, reads: int) -> None:
        self.reads, self.n = reads, 0

    def count(self) -> int:
        self.reads -= 1
        return self.n + (self.reads < 0)

    def close(self) -> None:
        pass


def _raise_with_clock(monkeypatch: pytest.MonkeyPatch, reads: int) -> Raiser:
    # The raiser's clock: the raise at 0, every later look 2 s on, as if the
    # raiser had lost its CPU for longer than the landing timeout.
    ticks = iter([0.0])
    monkeypatch.setattr(upgrade.time, "monotonic", lambda: next(ticks, 2.0))
    monkeypatch.setattr(upgrade.time, "sleep", lambda _s: None)
    r = Raiser([_Edu()], [(0, 0x41)], land_timeout=1.0)  # type: ignore[list-item]
    r._counters[0] = _Counter(reads)  # type: ignore[assignment]
    r.raise_one(0)
    return r


def test_a_raise_that_landed_while_the_raiser_was_late_is_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The count before the raise and at the loop's first look are unchanged;
    # by the time the raiser sees its clock past the deadline the MSI landed.
    late = _raise_with_clock(monkeypatch, reads=2)
    assert late.unlanded == 0 and late.land_max == pytest.approx(2.0)
    assert late.given_up == []
    # One that has not landed by then is counted as never landed.
    lost = _raise_with_clock(monkeypatch, reads=10**6)
    assert lost.unlanded == 1 and len(lost.raises) == 1
    assert lost.given_up == lost.raises


def test_windows_hold_the_raises_stamped_between_pause_and_resume() -> None:
    downtimes = [
        Downtime(pause=1.0, suspended=1.1, saved=1.2, loaded=1.3, running=1.5),
        Downtime(2.0, 2.1, 2.2, 2.3, 2.4, rolled_back=True),
        Downtime(3.0, 3.0, 3.0, 3.0, 3.0, rolled_back=True),  # never paused
    ]
    before, first, edge, between = (Raise(t, 0, 0x41) for t in (0.9, 1.25, 1.5, 1.7))
    gave_up, second = Raise(2.2, 3, 0x62), Raise(2.3, 7, 0x73)
    raises = [before, first, edge, between, gave_up, second]
    w = windows_of(downtimes, raises, [gave_up])
    assert [(x.pause, x.resume, x.rolled_back) for x in w] == [
        (1.0, 1.5, False),
        (2.0, 2.4, True),
        (3.0, 3.0, True),
    ]
    assert (w[0].landed, w[0].unlanded) == ((first, edge), ())
    assert (w[1].landed, w[1].unlanded) == ((second,), (gave_up,))
    assert (w[2].landed, w[2].unlanded) == ((), ())


def test_upgrade_command_passes_every_option_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each option ``kvmlu upgrade`` parses reaches ``upgrade.run`` (raise-in-window
    and interval were once parsed and dropped)."""
    import argparse
    from types import SimpleNamespace

    seen: dict[str, object] = {}

    def fake_run(*args: object, **kwargs: object) -> object:
        seen["args"], seen["kwargs"] = args, kwargs
        raise RuntimeError("stop here")

    monkeypatch.setattr(upgrade, "open_edus", lambda n: SimpleNamespace(n=n))
    monkeypatch.setattr(upgrade, "close_edus", lambda edus: None)
    monkeypatch.setattr(upgrade, "run", fake_run)
    p = argparse.ArgumentParser()
    upgrade.add_arguments(p)
    argv = "--strategy naive --vcpus 5 --upgrades 7 --edu 2 --vapic 1 --fault 3:load"
    argv += " --interval 0.25 --raise-in-window --optimisations none"
    with pytest.raises(RuntimeError, match="stop here"):
        upgrade.main(p.parse_args(argv.split()))
    args, kwargs = seen["args"], seen["kwargs"]
    assert isinstance(args, tuple) and isinstance(kwargs, dict)
    assert getattr(args[0], "n", None) == 2
    assert args[1:3] == (5, "naive") and args[4] == 7
    assert args[3] == upgrade.Optimisations.parse("none")
    on_upgrade = kwargs.pop("on_upgrade")
    assert kwargs == {
        "vapic": 1,
        "faults": {3: "load"},
        "raise_in_window": True,
        "interval": 0.25,
    }
    assert callable(on_upgrade)


def test_upgrade_prints_a_line_per_upgrade_and_no_p99_of_few(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each upgrade says its downtime as it ends; a p99 is printed only of 100
    samples or more, the max and n always."""
    upgrade._print_upgrade(7, 2, Downtime(1.0, 1.002, 1.004, 1.008, 1.0125))
    assert capsys.readouterr().out == "  upgrade 3/7: vCPU downtime 12.50 ms\n"
    d = {"p50": 1.0, "p99": 2.0, "max": 3.0, "min": 0.5}
    assert upgrade.downtime_text(d, 50) == "p50 1.00 ms, max 3.00 ms (n=50)"
    assert "p99 2.00 ms" in upgrade.downtime_text(d, 100)


def test_bench_results_that_are_not_are_input_errors(tmp_path: Path) -> None:
    """bench report refuses an empty file and a result with no runs."""
    empty, none = tmp_path / "empty.json", tmp_path / "none.json"
    empty.write_text("")
    none.write_text(json.dumps({"runs": [], "exec_startup_s": []}))
    with pytest.raises(InputError, match="empty"):
        merge([str(empty)])
    with pytest.raises(InputError, match="no runs"):
        merge([str(none)])
