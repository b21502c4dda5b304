"""Each option a ``kvmlu`` subcommand parses reaches the code that acts on it, and
the command line behaves: one-line errors, exit statuses, --version, help.

A test that checks options is marked ``@covers(COMMAND, DEST...)``;
:func:`test_every_option_is_covered` walks the parser and fails for any option
no test claims. Nothing here needs the kernel module or a VM: the functions
that act are replaced by fakes that record what they receive.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import socket
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, TypeVar

import pytest

from pyctl import (
    bench_irq,
    bench_sessions,
    bench_upgrade,
    check,
    cli,
    demo,
    livevmm,
    upgrade,
    vm,
    vmm,
)
from pyctl import swap as swap_mod
from pyctl.errors import KvmluError, RunError, SetupError, UsageError
from pyctl.kvmlu import SessionEntry
from pyctl.qemu import QemuError
from pyctl.vfio import VfioError

F = TypeVar("F", bound=Callable[..., Any])
HERE = Path(__file__).parent

#: The dests each subcommand's tests show reaching their code, filled by @covers.
COVERED: dict[str, set[str]] = defaultdict(set)
#: Subcommands whose options other files check, each option by a run of it.
ELSEWHERE = {
    "qemu": "test_qemu_inner.py",
    "qemu-upgrade": "test_qemu_cpr.py",
    "bench qemu": "test_qemu_bench.py",
    "bench qemu-upgrade": "test_qemu_bench.py",
}


def covers(command: str, *dests: str) -> Callable[[F], F]:
    """Mark a test as the one showing that ``dests`` of ``command`` reach their code."""

    def mark(test: F) -> F:
        COVERED[command].update(dests)
        return test

    return mark


def subcommands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command's name and parser, depth first."""
    if prefix:
        yield " ".join(prefix), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, (*prefix, name))


def dests(parser: argparse.ArgumentParser) -> set[str]:
    skip = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
    return {a.dest for a in parser._actions if not isinstance(a, skip)}


def test_every_option_is_covered() -> None:
    """Every parsed option of every subcommand is claimed by a test (or another file)."""
    found = dict(subcommands(cli.build_parser()))
    for command, parser in found.items():
        if command in ELSEWHERE:
            assert (HERE / ELSEWHERE[command]).is_file(), ELSEWHERE[command]
            continue
        missing = dests(parser) - COVERED[command]
        assert not missing, f"kvmlu {command}: no test shows {sorted(missing)} reach their code"
    stale = {c: d - dests(found[c]) for c, d in COVERED.items() if c in found}
    assert set(COVERED) <= set(found), (
        f"@covers names unknown commands: {set(COVERED) - set(found)}"
    )
    assert not any(stale.values()), f"@covers names options that do not exist: {stale}"


# Fakes of the kernel objects: they record what the commands give them.


class FakeBinding:
    def __init__(self, edu: FakeEdu) -> None:
        self.edu = edu

    def __enter__(self) -> FakeBinding:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def info(self) -> SimpleNamespace:
        stats = SimpleNamespace(signals=self.edu.raised)
        return SimpleNamespace(active=True, hup=False, stats=stats)


class FakeTable:
    def __init__(self, nr_vcpus: int) -> None:
        self.nr_vcpus = nr_vcpus
        self.posted: dict[int, set[int]] = defaultdict(set)
        self.notify: list[tuple[int, int]] = []
        self.bound: list[tuple[int, int]] = []
        self.edu: FakeEdu | None = None

    def __enter__(self) -> FakeTable:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        pass

    def post(self, vcpu: int, vector: int) -> None:
        self.posted[vcpu].add(vector)

    def pir(self, vcpu: int) -> list[int]:
        return sorted(self.posted[vcpu])

    def set_notify(self, vcpu: int, fd: int, nv: int, ndst: int) -> None:
        self.notify.append((vcpu, ndst))

    def bind(self, msi: int, vcpu: int, vector: int) -> FakeBinding:
        self.bound.append((vcpu, vector))
        assert self.edu is not None
        return FakeBinding(self.edu)

    def view(self, vcpu: int) -> str:
        return f"view of {vcpu}"


class FakeDevice:
    made: ClassVar[list[FakeDevice]] = []

    def __init__(self) -> None:
        self.tables: list[FakeTable] = []
        FakeDevice.made.append(self)

    def __enter__(self) -> FakeDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def create_table(self, nr_vcpus: int) -> FakeTable:
        self.tables.append(FakeTable(nr_vcpus))
        return self.tables[-1]

    def list_sessions(self) -> list[SessionEntry]:
        return [SessionEntry("vmm0", 3, True)]


class FakeEdu:
    opened: ClassVar[list[FakeEdu]] = []

    def __init__(self, bdf: str) -> None:
        self.bdf = bdf
        self.raised = 0
        FakeEdu.opened.append(self)

    def __enter__(self) -> FakeEdu:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def enable_msi(self) -> int:
        return os.eventfd(0, os.EFD_CLOEXEC)  # cmd_bind closes it

    def disable_msi(self) -> None:
        pass

    def raise_irq(self) -> None:
        self.raised += 1


@pytest.fixture
def fake_device(monkeypatch: pytest.MonkeyPatch) -> type[FakeDevice]:
    FakeDevice.made = []
    monkeypatch.setattr(cli, "Device", FakeDevice)
    return FakeDevice


def no_module(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise FileNotFoundError(2, "No such file or directory", "/dev/kvmlu")

    monkeypatch.setattr(cli, "Device", missing)


# status, sessions, check, demo


@covers("status", "json")
def test_status_json_or_text(
    fake_device: type[FakeDevice],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    printed: list[object] = []
    monkeypatch.setattr(cli, "status_dict", lambda dev: {"api_version": 1})
    monkeypatch.setattr(cli, "print_status", printed.append)
    assert cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"api_version": 1}
    assert printed == []
    assert cli.main(["status"]) == 0
    assert printed == [fake_device.made[-1]]


@covers("sessions", "json")
def test_sessions_json_or_text(
    fake_device: type[FakeDevice], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["sessions", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "vmm0", "nr_objects": 3, "held": True}]
    assert cli.main(["sessions"]) == 0
    assert capsys.readouterr().out == "vmm0: 3 objects, held\n"


@pytest.mark.parametrize("command", ["status", "sessions", "demo", "swap", "bind"])
def test_without_the_module_says_so(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each command that opens /dev/kvmlu says the module is not loaded, in one line, exit 3."""
    no_module(monkeypatch)
    monkeypatch.setattr(cli, "find_vfio_edu", lambda: ["0000:00:04.0"])
    monkeypatch.setattr(cli, "Edu", FakeEdu)
    assert cli.main([command]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err == f"kvmlu {command}: kvmlu.ko is not loaded (/dev/kvmlu is missing)\n"


@covers("check", "log", "json")
def test_check_reads_its_log_and_prints_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    logs: list[str] = []
    report = SimpleNamespace(ok=False, text=lambda: "vCPU 0 vector 0x51: lost", to_json=dict)
    monkeypatch.setattr(check, "load_log", lambda path: logs.append(path) or ([], [], None))
    monkeypatch.setattr(check, "check", lambda raises, fetches, switch: report)
    assert cli.main(["check", "/r/log.json", "--json"]) == cli.EXIT_CHECK_FAILED
    assert json.loads(capsys.readouterr().out) == {}
    assert cli.main(["check", "/r/other.json"]) == cli.EXIT_CHECK_FAILED
    assert capsys.readouterr().out == "vCPU 0 vector 0x51: lost\n"
    assert logs == ["/r/log.json", "/r/other.json"]


def test_check_of_a_missing_log_is_an_error_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check", str(tmp_path / "none.json")]) == cli.EXIT_ERROR
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_demo_runs_on_the_device(
    fake_device: type[FakeDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[object] = []
    monkeypatch.setattr(demo, "run", lambda dev: ran.append(dev) or 0)
    assert cli.main(["demo"]) == 0
    assert ran == fake_device.made


# swap, bind


@covers("swap", "from_version", "to_version", "tables", "vcpus", "unload")
def test_swap_options_reach_the_swap(
    fake_device: type[FakeDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    versions: list[int] = []
    swaps: list[tuple[int, int, bool]] = []

    class FakeVapicDevice:
        def __init__(self, version: int) -> None:
            versions.append(version)

        def __enter__(self) -> FakeVapicDevice:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def create(self, table: FakeTable) -> SimpleNamespace:
            return SimpleNamespace(sync=lambda vcpu: None, ack=lambda vcpu: None)

    def fake_swap(pairs: list[Any], dst: object, format: int, unload_old: bool) -> Any:
        swaps.append((len(pairs), format, unload_old))
        return [], SimpleNamespace(ok=True, text=lambda: "swapped")

    monkeypatch.setattr(cli, "VapicDevice", FakeVapicDevice)
    monkeypatch.setattr(swap_mod, "swap", fake_swap)
    argv = ["swap", "--from", "v2", "--to", "1", "--tables", "3", "--vcpus", "5", "--unload"]
    assert cli.main(argv) == 0
    assert versions == [2, 1]
    [dev] = fake_device.made
    assert [t.nr_vcpus for t in dev.tables] == [5, 5, 5]
    assert swaps == [(3, 1, True)]  # to an older version: in its format


@covers("bind", "device", "vcpus", "vcpu", "vector", "raise_count")
def test_bind_options_reach_the_table_and_the_device(
    fake_device: type[FakeDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeEdu.opened = []
    monkeypatch.setattr(cli, "find_vfio_edu", lambda: ["0000:00:04.0", "0000:00:05.0"])
    monkeypatch.setattr(cli, "Edu", FakeEdu)
    real_create = FakeDevice.create_table

    def create_table(self: FakeDevice, nr_vcpus: int) -> FakeTable:
        table = real_create(self, nr_vcpus)
        table.edu = FakeEdu.opened[-1]
        return table

    monkeypatch.setattr(FakeDevice, "create_table", create_table)
    argv = ["bind", "--device", "0000:00:05.0", "--vcpus", "16", "--vcpu", "3"]
    assert cli.main([*argv, "--vector", "0x61", "--raise", "4"]) == 0
    [edu] = FakeEdu.opened
    [table] = fake_device.made[0].tables
    assert (edu.bdf, edu.raised) == ("0000:00:05.0", 4)
    assert table.nr_vcpus == 16
    assert table.notify == [(3, 3)]
    assert table.bound == [(3, 0x61)]


def test_bind_refuses_a_vcpu_outside_its_table(
    fake_device: type[FakeDevice], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bind", "--vcpus", "4", "--vcpu", "4"]) == cli.EXIT_USAGE
    assert "the table has vCPUs 0..3" in capsys.readouterr().err
    assert fake_device.made == []


# bench irq, bench upgrade, bench report


@covers("bench irq", "device", "samples", "seconds", "json", "rate")
def test_bench_irq_options_reach_the_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[object, ...]] = []
    monkeypatch.setattr(cli, "find_vfio_edu", lambda: ["0000:00:04.0", "0000:00:05.0"])
    monkeypatch.setattr(bench_irq, "main", lambda *a: seen.append(a) or {})
    argv = ["bench", "irq", "--device", "0000:00:05.0", "--samples", "10", "--seconds", "0.5"]
    assert cli.main([*argv, "--json", "/r/irq.json", "--rate", "250"]) == 0
    assert seen == [("0000:00:05.0", 10, 0.5, "/r/irq.json", 250.0)]


@covers("bench sessions", "owners", "per_owner", "json")
def test_bench_sessions_options_reach_the_benchmark(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[tuple[int, int]] = []

    def fake_run(owners: int, per_owner: int) -> dict[str, Any]:
        seen.append((owners, per_owner))
        return {
            "owners": owners,
            "per_owner": per_owner,
            "batch_s": [0.5, 1.0],
            "ratio_to_first": [1.0, 2.0],
            "left": 0,
        }

    monkeypatch.setattr(bench_sessions, "run", fake_run)
    out = tmp_path / "sessions.json"
    argv = ["bench", "sessions", "--owners", "2", "--per-owner", "7", "--json", str(out)]
    assert cli.main(argv) == 0
    assert seen == [(2, 7)]
    assert json.loads(out.read_text())["ratio_to_first"] == [1.0, 2.0]


def test_bench_irq_without_an_edu_device_is_an_environment_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "find_vfio_edu", list)
    assert cli.main(["bench", "irq"]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.startswith("kvmlu bench irq: no edu device bound to vfio-pci")


class Stop(Exception):
    """Raised by a fake once it has seen what it was given."""


@covers(
    "bench upgrade",
    "vcpus",
    "workloads",
    "strategies",
    "upgrades",
    "no_ablations",
    "ablation_workloads",
    "land_timeout",
    "json",
    "resume",
)
def test_bench_upgrade_options_reach_the_matrix_and_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}

    def fake_start_doc(path: Path, upgrades: int, land_timeout: float, resume: bool) -> Any:
        seen["doc"] = (path, upgrades, land_timeout, resume)
        return {"runs": [], "boots": 1, "exec_startup_s": []}

    def fake_configs(*args: object) -> list[tuple[int, str, str, str]]:
        seen["configs"] = args
        return [(5, "memory", "naive", "no-realtime")]

    def fake_run(edus: object, v: int, s: str, opts: object, n: int, **kw: object) -> None:
        seen["run"] = (edus, v, s, opts, n, kw["land_timeout"])
        raise Stop

    class FakeZygote:
        def close(self) -> None:
            pass

    monkeypatch.setattr(bench_upgrade, "start_doc", fake_start_doc)
    monkeypatch.setattr(bench_upgrade, "configs", fake_configs)
    monkeypatch.setattr(bench_upgrade, "run", fake_run)
    monkeypatch.setattr(bench_upgrade, "open_edus", lambda n: ["edu"] * n)
    monkeypatch.setattr(bench_upgrade, "close_edus", lambda edus: None)
    monkeypatch.setattr(bench_upgrade, "exec_startup", lambda n: [])
    monkeypatch.setattr(bench_upgrade, "Zygote", FakeZygote)
    monkeypatch.setattr(bench_upgrade, "workload", lambda name: contextlib.nullcontext())
    out = tmp_path / "b" / "upgrade.json"
    argv = ["bench", "upgrade", "--vcpus", "5", "7", "--workloads", "memory", "--strategies"]
    argv += ["naive", "cpr", "--upgrades", "9", "--no-ablations", "--ablation-workloads", "cpu"]
    argv += ["--land-timeout", "2.5", "--json", str(out), "--resume"]
    with pytest.raises(Stop):
        cli.main(argv)
    assert seen["doc"] == (out, 9, 2.5, True)
    assert seen["configs"] == ([5, 7], ["memory"], ["naive", "cpr"], False, ("cpu",))
    opts = upgrade.Optimisations.parse("no-realtime")
    assert seen["run"] == (["edu"] * bench_upgrade.EDUS, 5, "naive", opts, 9, 2.5)


@covers("bench report", "json", "merged", "markdown", "png")
def test_bench_report_options_reach_merge_table_and_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merged: list[list[str]] = []
    plots: list[Path] = []
    monkeypatch.setattr(bench_upgrade, "merge", lambda paths: merged.append(paths) or {"runs": []})
    monkeypatch.setattr(bench_upgrade, "table", lambda doc: "TABLE")
    monkeypatch.setattr(bench_upgrade, "stamps_table", lambda doc: "STAMPS")
    monkeypatch.setattr(bench_upgrade, "steps_table", lambda doc: "")
    monkeypatch.setattr(bench_upgrade, "plot", lambda doc, path: plots.append(path))
    m, md, png = tmp_path / "m.json", tmp_path / "t.md", tmp_path / "p.png"
    argv = ["bench", "report", "a.json", "b.json", "--merged", str(m), "--markdown", str(md)]
    assert cli.main([*argv, "--png", str(png)]) == 0
    assert merged == [["a.json", "b.json"]]
    assert json.loads(m.read_text()) == {"runs": []}
    assert md.read_text().startswith("TABLE") and "STAMPS" in md.read_text()
    assert plots == [png]


# vmm, upgrade


@covers("vmm", "control_fd", "strategy", "vapic", "optimisations")
def test_vmm_options_reach_the_test_vmm(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[object, ...]] = []
    served: list[int] = []
    monkeypatch.setattr(livevmm, "LiveVmm", lambda *a: made.append(a) or "vmm")
    monkeypatch.setattr(livevmm, "serve", lambda ctl, v: served.append(ctl.fileno()))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        fd = os.dup(theirs.fileno())  # the VMM closes the fd it is given
        argv = ["vmm", "--control-fd", str(fd), "--strategy", "naive", "--vapic", "1"]
        assert cli.main([*argv, "--optimisations", "no-keep-vapic, no-realtime"]) == 0
    opts = livevmm.Optimisations(realtime=False, keep_vapic=False)
    assert made == [("naive", 1, opts)]
    assert served == [fd]


def upgrade_result() -> SimpleNamespace:
    summary = {"optimisations": "none", "upgrades": 7, "rolled_back": 0, "downtime_ms": {}}
    summary |= {"raised": 10, "deliveries": 10, "acked": 10}
    report = SimpleNamespace(ok=True, text=lambda: "no loss", to_json=lambda: {"ok": True})
    return SimpleNamespace(
        summary=lambda: summary, report=report, downtimes=[], timeline=(["raises"], ["fetches"])
    )


@covers(
    "upgrade",
    "strategy",
    "vcpus",
    "upgrades",
    "edu",
    "vapic",
    "optimisations",
    "fault",
    "interval",
    "raise_in_window",
    "json",
    "log",
)
def test_upgrade_options_reach_run_and_the_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path from ``kvmlu upgrade``: run's arguments, then what is written."""
    runs: list[tuple[tuple[object, ...], dict[str, object]]] = []
    logs: list[tuple[object, ...]] = []
    monkeypatch.setattr(upgrade, "open_edus", lambda n: [f"edu{i}" for i in range(n)])
    monkeypatch.setattr(upgrade, "close_edus", lambda edus: None)
    monkeypatch.setattr(upgrade, "run", lambda *a, **kw: runs.append((a, kw)) or upgrade_result())
    monkeypatch.setattr(upgrade, "dump_log", lambda *a: logs.append(a))
    out, log = tmp_path / "u.json", tmp_path / "log.json"
    argv = ["upgrade", "--strategy", "cpr", "--vcpus", "6", "--upgrades", "7", "--edu", "2"]
    argv += ["--vapic", "1", "--optimisations", "none", "--fault", "3:load", "--fault", "0:old"]
    argv += ["--interval", "0.25", "--raise-in-window", "--json", str(out), "--log", str(log)]
    assert cli.main(argv) == 0
    assert callable(runs[0][1].pop("on_upgrade"))
    assert runs == [
        (
            (["edu0", "edu1"], 6, "cpr", upgrade.Optimisations.parse("none"), 7),
            {
                "vapic": 1,
                "faults": {3: "load", 0: "old"},
                "raise_in_window": True,
                "interval": 0.25,
            },
        )
    ]
    assert json.loads(out.read_text())["report"] == {"ok": True}
    assert logs == [(str(log), ["raises"], ["fetches"], None)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimisations", "no-speed"], "'no-speed' is not all, none or no-NAME"),
        (["--optimisations", "prestart"], "NAME one of concurrent, keep-eventfds"),
        (["--fault", "1:explode"], "'1:explode' is not I:KIND"),
        (["--fault", "x:load"], "'x:load' is not I:KIND"),
        (["--fault", "7:load"], "--fault 7: there are upgrades 0..6"),
        (["--vcpus", "0"], "argument --vcpus: 0 is not in 1..246"),
        (["--vcpus", "247"], "argument --vcpus: 247 is not in 1..246"),
        (["--vcpus", "eight"], "argument --vcpus: 'eight' is not an integer"),
        (["--vcpus", "240", "--edu", "4"], "the handoff would carry 256 fds"),
        (["--edu", "0"], "argument --edu: 0 is not at least 1"),
    ],
)
def test_upgrade_usage_errors_are_one_line_exit_2(
    argv: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_edus(n: int) -> None:
        raise AssertionError("the options were checked too late")

    monkeypatch.setattr(upgrade, "open_edus", no_edus)
    try:
        rc = cli.main(["upgrade", "--upgrades", "7", *argv])
    except SystemExit as e:
        rc = e.code
    assert rc == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err
    assert len(err.splitlines()) == 1, err


def test_the_largest_handoff_fits_one_message() -> None:
    """--vcpus is bounded so that the handoff's fds travel in one SCM_RIGHTS message."""
    assert livevmm.handoff_fds(livevmm.max_vcpus(3), 3) == vmm.SCM_MAX_FD == 253
    assert livevmm.max_vcpus(bench_upgrade.EDUS) == 240
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "upgrade", "--vcpus", "8", "241"])
    args = cli.build_parser().parse_args(["bench", "upgrade", "--vcpus", "8", "240"])
    assert args.vcpus == [8, 240]


# vm


@covers(
    "vm",
    "kernel",
    "accel",
    "tcg_threads",
    "edu",
    "memory",
    "cpus",
    "cpu_model",
    "modules",
    "no_modules",
    "results",
    "timeout",
    "kernel_append",
    "rodirs",
    "require_kmemleak",
    "vm_env",
    "console",
    "scratch_mb",
    "dry_run",
    "command",
)
def test_vm_options_reach_the_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = vm.KernelInfo("6.1.0-99-amd64", tmp_path / "vmlinuz", tmp_path / "build")
    asked: list[str | None] = []
    ran: list[vm.VmOptions] = []
    printed: list[vm.VmOptions] = []
    monkeypatch.setattr(vm, "find_kernel", lambda k, **kw: asked.append(k) or kernel)
    monkeypatch.setattr(vm, "check_modules", lambda modules, k: None)
    monkeypatch.setattr(vm, "find_vng", lambda: Path("/venv/bin/vng"))
    monkeypatch.setattr(vm, "run", lambda opts: ran.append(opts) or 0)
    monkeypatch.setattr(vm, "build_command", lambda opts: printed.append(opts) or ["vng", "x"])
    ko = tmp_path / "a.ko"
    argv = ["vm", "--kernel", "6.1.0-99-amd64", "--accel", "kvm", "--edu", "4", "--memory", "512"]
    argv += ["--cpus", "3", "--cpu", "host", "--module", str(ko), "--results", str(tmp_path)]
    argv += ["--timeout", "60", "--append", "quiet", "--rodir", "/var/cache", "--env", "A=1"]
    argv += ["--require-kmemleak", "--console", "--scratch-disk", "64", "--tcg-threads", "multi"]
    assert cli.main([*argv, "--", "true", "-x"]) == 0
    [opts] = ran
    assert opts.tcg_threads == "multi"
    assert asked == ["6.1.0-99-amd64"] and opts.kernel == kernel
    assert (opts.accel, opts.edu, opts.memory_mb, opts.cpus, opts.cpu_model) == (
        "kvm",
        4,
        512,
        3,
        "host",
    )
    assert opts.modules == [ko.resolve()]
    assert (opts.results_dir, opts.timeout) == (tmp_path.resolve(), 60.0)
    assert (opts.kernel_append, opts.rodirs, opts.env) == (["quiet"], ["/var/cache"], ["A=1"])
    assert (opts.require_kmemleak, opts.console, opts.scratch_mb) == (True, True, 64)
    assert opts.command == ["true", "-x"]
    assert printed == []
    assert cli.main(["vm", "--no-modules", "--module", str(ko), "--dry-run", "--", "true"]) == 0
    assert len(ran) == 1, "--dry-run runs nothing"
    assert [o.modules for o in printed] == [[]]
    assert capsys.readouterr().out == "vng x\n"


# The command line itself.


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"kvmlu {cli.version()}\n"
    project = tomllib.loads((HERE.parents[1] / "pyproject.toml").read_text())["project"]
    try:
        installed = importlib.metadata.version("kvmlu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kvmlu is not installed: no metadata to read")
    assert cli.version() == installed == project["version"]


def test_help_shows_defaults_and_exit_statuses() -> None:
    parser = cli.build_parser()
    top = parser.format_help()
    assert "exit status: 0 done; 1 a check failed" in " ".join(top.split())
    assert "3 environment or runtime error" in " ".join(top.split())
    found = dict(subcommands(parser))
    upgrade_help = " ".join(found["upgrade"].format_help().split())
    assert "(default: 8)" in upgrade_help and "(default: shared)" in upgrade_help
    assert "(default: 2000)" in found["bench irq"].format_help()
    for command, p in found.items():
        text = p.format_help()
        assert "(default: None)" not in text, command
        assert "(default: False)" not in text, command


def test_vmm_is_hidden_from_the_listing_but_callable() -> None:
    parser = cli.build_parser()
    listing = parser.format_help().split("options:")[0]
    assert "\n    upgrade " in listing
    assert "\n    vmm " not in listing
    args = parser.parse_args(["vmm", "--control-fd", "3"])
    assert args.func is livevmm.main and args.control_fd == 3


def test_a_usage_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["swap", "--vcpus", "1025"], ["nonsense"], ["bind", "--vector", "0x10"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert err.startswith("kvmlu"), err


@pytest.mark.parametrize(
    "error",
    [
        RunError("settle: vCPUs [3] did not SYNC in 60 s\nsecond line"),
        SetupError("no edu device"),
        vm.VmError("vng not found"),
        QemuError("guest did not boot"),
        PermissionError(13, "Permission denied", "/dev/kvmlu"),
    ],
)
def test_a_runtime_error_is_one_line_exit_3(
    error: Exception,
    fake_device: type[FakeDevice],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fail(dev: object) -> int:
        raise error

    monkeypatch.setattr(demo, "run", fail)
    assert cli.main(["demo"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("kvmlu demo: ") and len(err.splitlines()) == 1, err


def test_one_root_for_what_pyctl_raises() -> None:
    for cls in (RunError, SetupError, UsageError, VfioError, vm.VmError, upgrade.VmmError,
                QemuError, vm.VmUsageError):  # fmt: skip
        assert issubclass(cls, KvmluError), cls
    # Still what callers caught before the root existed.
    assert issubclass(upgrade.VmmError, RuntimeError)
    assert issubclass(RunError, RuntimeError)
    assert issubclass(QemuError, RunError)
    assert issubclass(vm.VmUsageError, UsageError)
