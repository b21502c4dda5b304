"""kvmlu qemu-upgrade's pieces that run without a VM: QMP, options, arithmetic."""

from __future__ import annotations

import json
import shlex
import socket
import threading
from pathlib import Path

import pytest

from pyctl import cli
from pyctl.qemu import cpr as qcpr
from pyctl.qemu import run as qrun
from pyctl.qemu import upgrade_cli as qup
from pyctl.qemu.qmp import Qmp, QmpError


def _opts(tmp_path: Path, **kw: object) -> qrun.InnerOptions:
    base = {
        "bdf": "0000:00:0a.0",
        "kernel": tmp_path / "vmlinuz",
        "initrd": tmp_path / "i",
        "workdir": tmp_path / "w",
        "qemu": tmp_path / "qemu",
        "firmware": [],
    }
    base.update(kw)
    return qrun.InnerOptions(**base)  # type: ignore[arg-type]


def test_cpr_options_put_ram_in_a_memfd_and_open_a_monitor(tmp_path: Path) -> None:
    argv = qrun.qemu_argv(_opts(tmp_path, cpr=True, kvmlu=True, kvmlu_props=["x-eager=on"]))
    joined = shlex.join(argv)
    assert "memory-backend-memfd,id=ram0,size=256M" in joined
    assert "memory-backend=ram0,aux-ram-share=on" in joined
    assert f"unix:{tmp_path / 'w' / 'qmp.sock'},server=on,wait=off" in argv
    assert "kvmlu,id=pi0,x-eager=on" in argv
    assert "-incoming" not in argv and "-S" not in argv


def test_successor_listens_on_the_cpr_fd_and_holds(tmp_path: Path) -> None:
    opts = _opts(tmp_path, cpr=True)
    new = qcpr.successor_options(opts, tmp_path / "gen-1", 7, hold=True)
    argv = qrun.qemu_argv(new)
    incoming = [argv[i + 1] for i, a in enumerate(argv) if a == "-incoming"]
    assert incoming == [
        f"unix:{tmp_path / 'gen-1' / 'main.sock'}",
        "cpr,addr.transport=socket,addr.type=fd,addr.str=7",
    ]
    assert "-S" in argv
    assert new.qmp_path == tmp_path / "gen-1" / "qmp.sock"
    assert opts.incoming == [], "the old options are not changed"


def test_listening_socket_is_inheritable(tmp_path: Path) -> None:
    with qcpr.listening_socket(tmp_path / "cpr.sock") as s:
        assert s.get_inheritable()
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(tmp_path / "cpr.sock"))
        c.close()


def _serve(sock: socket.socket, script: list[tuple[str | None, list[dict[str, object]]]]) -> None:
    f = sock.makefile("rw")
    f.write(json.dumps({"QMP": {"version": {}, "capabilities": []}}) + "\n")
    f.flush()
    for expect, replies in script:
        if expect is not None:
            req = json.loads(f.readline())
            assert req["execute"] == expect
        for r in replies:
            f.write(json.dumps(r) + "\n")
        f.flush()
    f.close()
    sock.close()


def test_qmp_keeps_events_and_reports_errors() -> None:
    a, b = socket.socketpair()
    ev = {"event": "STOP", "data": {}, "timestamp": {"seconds": 10, "microseconds": 500000}}
    script: list[tuple[str | None, list[dict[str, object]]]] = [
        ("qmp_capabilities", [{"return": {}}]),
        ("query-status", [ev, {"return": {"status": "paused"}}]),
        ("migrate", [{"error": {"class": "GenericError", "desc": "no"}}]),
        (None, [{"event": "RESUME", "data": {}, "timestamp": {"seconds": 11, "microseconds": 0}}]),
    ]
    t = threading.Thread(target=_serve, args=(b, script))
    t.start()
    with Qmp(a) as q:
        assert q.execute("query-status") == {"status": "paused"}
        with pytest.raises(QmpError, match="migrate: GenericError: no"):
            q.execute("migrate")
        stop = q.wait_event("STOP", 5)
        assert stop.time == 10.5
        resume = q.wait_event("RESUME", 5)
        assert resume.time - stop.time == pytest.approx(0.5)
        with pytest.raises(QmpError, match="closed"):
            q.wait_event("SHUTDOWN", 5)
    t.join()


def test_summary_reports_n_and_calls_the_max_the_max() -> None:
    ups = [
        qcpr.Upgrade(i, pause_ms=float(i), ok=True, window_raises=1, counted=1)
        for i in range(1, 11)
    ]
    s = qcpr.summary(ups)
    assert s["pause_ms"] == {"n": 10, "p50": 5.0, "p90": 9.0, "max": 10.0}
    assert (s["ok"], s["window_raises"], s["counted"]) == (10, 10, 10)
    assert qcpr.summary([])["pause_ms"]["n"] == 0


def test_upgrade_options_reach_the_vm_command(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(
        [
            "qemu-upgrade",
            "--paths",
            "kvmlu",
            "--upgrades",
            "7",
            "--between",
            "2",
            "--no-hold",
            "--faults",
            "--cpus",
            "2",
            "--device",
            "0000:00:0b.0",
            "--kernel",
            "6.1.0-56-amd64",
            "--json",
            str(tmp_path / "o.json"),
        ]
    )
    argv = qup.vm_argv(args, tmp_path / "initramfs.cpio")
    inner = argv[argv.index("--") + 1 :]
    assert inner[1:4] == ["-m", "pyctl.cli", "qemu-upgrade"]

    def val(flag: str) -> str:
        return inner[inner.index(flag) + 1]

    assert (val("--paths"), val("--upgrades"), val("--between"), val("--cpus")) == (
        "kvmlu",
        "7",
        "2",
        "2",
    )
    assert "--no-hold" in inner and "--faults" in inner
    assert val("--accel") == "kvm"
    assert val("--device") == "0000:00:0b.0"
    assert val("--json") == str(tmp_path / "o.json")
    assert argv[argv.index("--kernel") + 1] == "6.1.0-56-amd64"
    args = cli.build_parser().parse_args(
        [
            "qemu-upgrade",
            "--results",
            str(tmp_path / "r"),
            "--timeout",
            "99",
            "--dry-run",
            "--qemu",
            "/usr/bin/qemu-system-x86_64",
        ]
    )
    argv = qup.vm_argv(args, tmp_path / "initramfs.cpio")
    inner = argv[argv.index("--") + 1 :]
    assert argv[argv.index("--results") + 1] == str(tmp_path / "r")
    assert inner[inner.index("--results") + 1] == str(tmp_path / "r")
    assert argv[argv.index("--timeout") + 1] == "99.0" and "--dry-run" in argv
    assert inner[inner.index("--qemu") + 1] == "/usr/bin/qemu-system-x86_64"
    assert inner[inner.index("--initrd") + 1] == str(tmp_path / "initramfs.cpio")


def test_upgrade_plan_reaches_run_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, qup.Plan, int]] = []

    def fake_run_path(
        path: str, plan: qup.Plan, base: qrun.InnerOptions, work: Path
    ) -> qup.PathReport:
        assert base.accel == "tcg"
        seen.append((path, plan, base.cpus))
        return qup.PathReport(path)

    monkeypatch.setenv("KVMLU_IN_VM", "1")
    monkeypatch.setenv("KVMLU_EDU", "0000:00:0a.0")
    monkeypatch.setenv("KVMLU_RESULTS", str(tmp_path))
    monkeypatch.setattr(qrun, "check_host", lambda q, b: None)
    monkeypatch.setattr(qup.qguest, "module_release", lambda ko: "6.1")
    monkeypatch.setattr(qrun, "find_kernel_image", lambda r: tmp_path / "vmlinuz")
    monkeypatch.setattr(qup, "run_path", fake_run_path)
    rc = cli.main(
        [
            "qemu-upgrade",
            "--paths",
            "stock,kvmlu",
            "--upgrades",
            "4",
            "--between",
            "1",
            "--faults",
            "--cpus",
            "3",
            "--accel",
            "tcg",
            "--initrd",
            str(tmp_path / "i"),
        ]
    )
    assert rc == 0
    assert seen == [
        ("stock", qup.Plan(4, 1, True, True), 3),
        ("kvmlu", qup.Plan(4, 1, True, True), 3),
    ]


def test_upgrade_rejects_unknown_paths() -> None:
    assert cli.main(["qemu-upgrade", "--paths", "kvmlu,maybe"]) == 2
    assert cli.main(["qemu-upgrade", "--upgrades", "-1"]) == 2
