"""Tests of the VM harness that need no VM: kernel lookup, the vng argv, the CLI, status."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import time
from pathlib import Path

import pytest

from pyctl import guest, klog, vm


def fake_kernel(tmp_path: Path) -> vm.KernelInfo:
    image = tmp_path / "vmlinuz-6.1.0-99-amd64"
    image.write_bytes(b"")
    return vm.KernelInfo(version="6.1.0-99-amd64", vmlinuz=image, build_dir=tmp_path / "build")


def options(tmp_path: Path, **kw: object) -> vm.VmOptions:
    defaults: dict[str, object] = {
        "kernel": fake_kernel(tmp_path),
        "command": ["sh", "-c", "echo 'hello world'; exit 3"],
        "results_dir": tmp_path / "results",
        "checkout": Path("/src/kvmlu"),
        "python": Path("/src/kvmlu/.venv/bin/python"),
        "vng": Path("/src/kvmlu/.venv/bin/vng"),
    }
    defaults.update(kw)
    return vm.VmOptions(**defaults)  # type: ignore[arg-type]


def value_of(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def qemu_opts(argv: list[str]) -> list[str]:
    [opt] = [a for a in argv if a.startswith("--qemu-opts=")]
    return opt.removeprefix("--qemu-opts=").split()


def test_default_command_is_tcg_q35_with_iommu_and_two_edu(tmp_path: Path) -> None:
    opts = options(tmp_path)
    argv = vm.build_command(opts)
    assert argv[0] == "/src/kvmlu/.venv/bin/vng"
    assert value_of(argv, "--run") == str(opts.kernel.vmlinuz)
    assert "--disable-kvm" in argv
    assert "--disable-microvm" in argv  # q35, which intel-iommu needs
    assert value_of(argv, "--cpus") == "2"
    assert value_of(argv, "--memory") == "1024M"
    assert "intel_iommu=on" in shlex.split(value_of(argv, "--append"))
    # A BAR that vfio-pci claimed stays mappable through sysfs (nested-guest tests).
    assert "iomem=relaxed" in shlex.split(value_of(argv, "--append"))
    opts_list = qemu_opts(argv)
    assert "intel-iommu,intremap=on" in opts_list
    assert opts_list.count("edu") == 2
    assert value_of(argv, "--rwdir") == str(tmp_path / "results")
    # "--qemu-opts VALUE" would make vng read VALUE as options of its own.
    assert "--qemu-opts" not in argv


def test_cpu_model_is_max_unless_asked(tmp_path: Path) -> None:
    q = qemu_opts(vm.build_command(options(tmp_path)))
    assert q[:2] == ["-cpu", "max"], "AMD-vendor with SVM under TCG: kvm_amd loads inside"
    q = qemu_opts(vm.build_command(options(tmp_path, cpu_model="EPYC,+svm")))
    assert q.count("-cpu") == 1 and value_of(q, "-cpu") == "EPYC,+svm"


def test_rodirs_are_shared_read_only(tmp_path: Path) -> None:
    argv = vm.build_command(options(tmp_path))
    assert not any(a.startswith("--rodir") for a in argv)
    argv = vm.build_command(options(tmp_path, rodirs=["/var/cache/q", "/g=/h"]))
    # "--rodir=" form: vng reads GUEST=HOST from one word.
    assert [a for a in argv if a.startswith("--rodir")] == ["--rodir=/var/cache/q", "--rodir=/g=/h"]


def test_kvm_drops_disable_kvm(tmp_path: Path) -> None:
    argv = vm.build_command(options(tmp_path, accel="kvm"))
    assert "--disable-kvm" not in argv
    assert "-accel" not in qemu_opts(argv)  # vng picks KVM itself


def test_tcg_runs_the_vcpus_on_one_thread_unless_asked(tmp_path: Path) -> None:
    q = qemu_opts(vm.build_command(options(tmp_path)))
    assert q.count("-accel") == 1 and value_of(q, "-accel") == "tcg,thread=single"
    q = qemu_opts(vm.build_command(options(tmp_path, tcg_threads="multi")))
    assert q.count("-accel") == 1 and value_of(q, "-accel") == "tcg,thread=multi"


@pytest.mark.parametrize("n", [0, 1, 4])
def test_edu_count(tmp_path: Path, n: int) -> None:
    argv = vm.build_command(options(tmp_path, edu=n))
    assert qemu_opts(argv).count("edu") == n
    assert "--expect-edu " + str(n) in value_of(argv, "--exec")


def test_scratch_disk_is_a_virtio_disk_with_a_serial(tmp_path: Path) -> None:
    assert not any("virtio-blk" in o for o in qemu_opts(vm.build_command(options(tmp_path))))
    opts = options(tmp_path, scratch_mb=64)
    q = qemu_opts(vm.build_command(opts))
    drive = q[q.index("-drive") + 1]
    assert drive.startswith(f"file={opts.scratch_file},") and "format=raw" in drive
    assert f"virtio-blk-pci,drive=scratch,serial={vm.SCRATCH_SERIAL}" in q


def test_memory_cpus_and_extra_kernel_params(tmp_path: Path) -> None:
    argv = vm.build_command(
        options(tmp_path, memory_mb=2048, cpus=4, kernel_append=["kmemleak=on", "a=b c"])
    )
    assert value_of(argv, "--memory") == "2048M"
    assert value_of(argv, "--cpus") == "4"
    params = shlex.split(value_of(argv, "--append"))
    assert params[0] == "intel_iommu=on"
    assert params[-2:] == ["kmemleak=on", "a=b c"]


def test_exec_runs_guest_runner_then_quoted_command(tmp_path: Path) -> None:
    mods = [Path("/src/kvmlu/kmod/kvmlu.ko"), Path("/src/kvmlu/kmod/kvmlu_vapic_v1.ko")]
    opts = options(tmp_path, modules=mods, env=["A=1"])
    exec_str = value_of(vm.build_command(opts), "--exec")
    words = shlex.split(exec_str)
    assert words[0] == "PYTHONPATH=/src/kvmlu"
    assert words[1] == "exec"
    assert words[2:5] == ["/src/kvmlu/.venv/bin/python", "-m", "pyctl.guest"]
    assert value_of(words, "--status-file") == str(tmp_path / "results" / "status.json")
    assert [words[i + 1] for i, w in enumerate(words) if w == "--module"] == [str(m) for m in mods]
    envs = [words[i + 1] for i, w in enumerate(words) if w == "--env"]
    assert envs == ["KVMLU_ACCEL=tcg", "A=1"], "the accelerator is announced to the guest"
    sep = words.index("--")
    assert words[sep + 1 : sep + 4] == ["sh", "-c", "echo 'hello world'; exit 3"]
    assert words[-1] == "2>&1"
    assert shlex.quote("echo 'hello world'; exit 3") in exec_str
    # What the guest runner will parse from that command line.
    gargs = guest.parse_args(words[5:-1])
    assert gargs.command == ["sh", "-c", "echo 'hello world'; exit 3"]
    assert gargs.module == mods
    assert gargs.status_file == tmp_path / "results" / "status.json"


def test_kernel_tree_is_run_as_a_tree(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    (tree / "arch/x86/boot").mkdir(parents=True)
    (tree / "arch/x86/boot/bzImage").write_bytes(b"")
    (tree / "include/config").mkdir(parents=True)
    (tree / "include/config/kernel.release").write_text("6.1.99-debug\n")
    kernel = vm.find_kernel(str(tree))
    assert kernel.version == "6.1.99-debug"
    assert kernel.build_dir == tree
    argv = vm.build_command(options(tmp_path, kernel=kernel))
    assert value_of(argv, "--run") == str(tree)


def make_boot(tmp_path: Path, versions: list[str], with_build: list[str]) -> tuple[Path, Path]:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for v in versions:
        (boot / f"vmlinuz-{v}").write_bytes(b"")
    for v in with_build:
        (mods / v / "build").mkdir(parents=True)
    return boot, mods


def test_find_kernel_picks_newest_with_build_dir(tmp_path: Path) -> None:
    boot, mods = make_boot(
        tmp_path,
        ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-56-amd64", "6.12.0-1-amd64"],
        ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-56-amd64"],
    )
    k = vm.find_kernel(None, boot_dir=boot, modules_dir=mods)
    assert k.version == "6.1.0-56-amd64"
    assert k.vmlinuz == boot / "vmlinuz-6.1.0-56-amd64"
    assert k.build_dir == mods / "6.1.0-56-amd64" / "build"
    assert vm.find_kernel("6.1.0-9-amd64", boot_dir=boot, modules_dir=mods).version == (
        "6.1.0-9-amd64"
    )


def test_find_kernel_prefers_the_modules_kernel(tmp_path: Path) -> None:
    # The release the modules were built for wins over a newer one; one not
    # installed (or without its build directory) is passed over.
    boot, mods = make_boot(
        tmp_path, ["6.1.0-56-amd64", "6.12.1-amd64", "6.1.0-9-amd64"],
        ["6.1.0-56-amd64", "6.12.1-amd64"],
    )  # fmt: skip
    pick = functools.partial(vm.find_kernel, None, boot_dir=boot, modules_dir=mods)
    assert pick(prefer="6.1.0-56-amd64").version == "6.1.0-56-amd64"
    assert pick(prefer="6.1.0-9-amd64").version == "6.12.1-amd64"
    assert pick(prefer="5.10.0-1-amd64").version == "6.12.1-amd64"
    assert pick().version == "6.12.1-amd64"


def test_find_kernel_takes_an_image_in_the_modules_folder(tmp_path: Path) -> None:
    # Debian 13's layout (and tools/newest-kernel.sh's): no /boot image, the
    # image beside the modules. Found when named, never picked by default.
    boot, mods = make_boot(tmp_path, ["6.1.0-56-amd64"], ["6.1.0-56-amd64", "7.3.4+deb13-amd64"])
    (mods / "7.3.4+deb13-amd64" / "vmlinuz").write_bytes(b"image")
    k = vm.find_kernel("7.3.4+deb13-amd64", boot_dir=boot, modules_dir=mods)
    assert k.vmlinuz == mods / "7.3.4+deb13-amd64" / "vmlinuz"
    assert k.build_dir == mods / "7.3.4+deb13-amd64" / "build"
    assert vm.find_kernel(None, boot_dir=boot, modules_dir=mods).version == "6.1.0-56-amd64"


def test_find_kernel_errors(tmp_path: Path) -> None:
    boot, mods = make_boot(tmp_path, ["6.12.0-1-amd64"], [])
    with pytest.raises(vm.VmError, match="linux-headers-amd64"):
        vm.find_kernel(None, boot_dir=boot, modules_dir=mods)
    with pytest.raises(vm.VmError, match=r"install linux-headers-6\.12\.0-1-amd64"):
        vm.find_kernel("6.12.0-1-amd64", boot_dir=boot, modules_dir=mods)
    with pytest.raises(vm.VmError, match="no kernel image"):
        vm.find_kernel("5.10.0-1-amd64", boot_dir=boot, modules_dir=mods)


def test_check_modules_vermagic(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path)
    good = tmp_path / "good.ko"
    good.write_bytes(b"\x7fELF...vermagic=6.1.0-99-amd64 SMP preempt mod_unload modversions \0x")
    bad = tmp_path / "bad.ko"
    bad.write_bytes(b"\x7fELF...vermagic=6.12.0-1-amd64 SMP mod_unload \0x")
    vm.check_modules([good], kernel)
    with pytest.raises(vm.VmError, match=r"built for 6\.12\.0-1-amd64"):
        vm.check_modules([bad], kernel)
    with pytest.raises(vm.VmError, match="not found"):
        vm.check_modules([tmp_path / "missing.ko"], kernel)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvmlu")
    sub = parser.add_subparsers(dest="subcommand", required=True)
    vm.add_arguments(sub.add_parser("vm"))
    return parser.parse_args(argv)


@pytest.fixture
def kernel_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tree = tmp_path / "linux"
    (tree / "arch/x86/boot").mkdir(parents=True)
    (tree / "arch/x86/boot/bzImage").write_bytes(b"")
    monkeypatch.setattr(vm, "find_vng", lambda: Path("/venv/bin/vng"))
    return tree


def test_dry_run_prints_the_command(kernel_tree: Path, tmp_path: Path, capsys) -> None:
    args = parse(
        ["vm", "--kernel", str(kernel_tree), "--edu", "3", "--no-modules",
         "--results", str(tmp_path / "r"), "--dry-run", "--", "sh", "-c", "exit 7"]
    )  # fmt: skip
    assert vm.main(args) == 0
    out = capsys.readouterr().out.strip()
    argv = shlex.split(out)
    assert argv[0] == "/venv/bin/vng"
    assert "--disable-kvm" in argv
    assert qemu_opts(argv).count("edu") == 3
    assert value_of(argv, "--rwdir") == str(tmp_path / "r")
    words = shlex.split(value_of(argv, "--exec"))
    assert words[words.index("--") + 1 :] == ["sh", "-c", "exit 7", "2>&1"]
    assert not (tmp_path / "r").exists()  # a dry run boots nothing and writes nothing


def test_cli_defaults(kernel_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = tmp_path / "checkout"
    monkeypatch.setattr(vm, "CHECKOUT", checkout)
    args = parse(["vm", "--kernel", str(kernel_tree), "--", "true"])
    assert args.command in (["--", "true"], ["true"])
    opts = vm.options_from_args(args)
    assert opts.command == ["true"]
    assert opts.accel == "tcg"
    assert opts.edu == 2
    assert opts.memory_mb == 1024
    assert opts.timeout == 1800
    assert opts.cpu_model == "max"
    assert opts.tcg_threads == "single"
    assert opts.rodirs == []
    assert opts.modules == []  # kmod/kvmlu.ko not built
    (checkout / "kmod").mkdir(parents=True)
    (checkout / "kmod" / "kvmlu.ko").write_bytes(b"vermagic=linux SMP\0")
    assert vm.options_from_args(args).modules == [checkout / "kmod" / "kvmlu.ko"]
    args = parse(["vm", "--kernel", str(kernel_tree), "--no-modules", "--", "true"])
    assert vm.options_from_args(args).modules == []


def test_cli_modules_in_order(kernel_tree: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "kvmlu.ko", tmp_path / "kvmlu_vapic_v1.ko"
    a.write_bytes(b"")
    b.write_bytes(b"")
    args = parse(["vm", "--kernel", str(kernel_tree), "--accel", "kvm",
                  "--module", str(a), "--module", str(b), "--", "true"])  # fmt: skip
    opts = vm.options_from_args(args)
    assert opts.modules == [a, b]
    assert "--disable-kvm" not in vm.build_command(opts)


def test_cli_cpu_option(kernel_tree: Path, capsys) -> None:
    args = parse(["vm", "--kernel", str(kernel_tree), "--no-modules", "--cpu", "qemu64",
                  "--dry-run", "--", "true"])  # fmt: skip
    assert vm.main(args) == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    assert value_of(qemu_opts(argv), "-cpu") == "qemu64"
    args = parse(["vm", "--kernel", str(kernel_tree), "--no-modules", "--tcg-threads", "multi",
                  "--dry-run", "--", "true"])  # fmt: skip
    assert vm.main(args) == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    assert value_of(qemu_opts(argv), "-accel") == "tcg,thread=multi"
    args = parse(["vm", "--kernel", str(kernel_tree), "--no-modules", "--cpu", "max, x",
                  "--", "true"])  # fmt: skip
    with pytest.raises(vm.VmError, match="no spaces"):
        vm.options_from_args(args)


def test_cli_rejects_a_missing_module(kernel_tree: Path, tmp_path: Path, capsys) -> None:
    args = parse(["vm", "--kernel", str(kernel_tree), "--module", str(tmp_path / "x.ko"),
                  "--dry-run", "--", "true"])  # fmt: skip
    assert vm.main(args) == 3
    assert "not found" in capsys.readouterr().err


def test_cli_bad_options_exit_2(kernel_tree: Path, capsys) -> None:
    args = parse(
        ["vm", "--kernel", str(kernel_tree), "--env", "NOEQUALS", "--dry-run", "--", "true"]
    )
    assert vm.main(args) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_command_list_required(kernel_tree: Path) -> None:
    args = parse(["vm", "--kernel", str(kernel_tree), "--", "true"])
    args.command = "vm"  # a subparsers dest="command" would do this
    with pytest.raises(vm.VmError, match=r"args\.command"):
        vm.options_from_args(args)


def status(**kw: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "command_status": 0,
        "klog_findings": [],
        "rmmod_errors": [],
        "setup_errors": [],
        "edu": [],
    }
    doc.update(kw)
    return doc


def test_evaluate() -> None:
    assert vm.evaluate(status(), 0) == 0
    assert vm.evaluate(status(command_status=3), 3) == 3
    assert vm.evaluate(status(klog_findings=["WARNING: CPU: 0 PID: 1 at fake"]), 1) == 1
    assert vm.evaluate(status(rmmod_errors=["rmmod kvmlu: in use"]), 1) == 1
    assert vm.evaluate(status(command_status=None, setup_errors=["insmod"]), 1) == 1
    assert vm.evaluate(status(), 255) == 1


def test_guest_outcome_json_and_exit_status() -> None:
    out = guest.Outcome(command=["true"], modules=[], command_status=0)
    assert out.ok
    assert out.exit_status() == 0
    doc = json.loads(json.dumps(out.to_json()))
    assert {"command_status", "klog_findings", "rmmod_errors", "edu"} <= doc.keys()
    out.klog_findings.append("WARNING: CPU: 0 PID: 1 at fake")
    assert out.exit_status() == 1
    out.command_status = 137
    assert out.exit_status() == 137
    assert guest.Outcome(command=["x"], modules=[]).exit_status() == 1  # never ran


CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme de pse tsc msr pae svm npt lbrv nrip_save vgif
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu
"""


def test_guest_picks_the_kvm_module_from_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    flags = guest.cpu_flags(info)
    assert {"svm", "npt", "vgif"} <= flags and "fpu" in flags
    assert guest.kvm_module_for(flags) == "kvm_amd"
    assert guest.kvm_module_for({"vmx", "ept"}) == "kvm_intel"
    assert guest.kvm_module_for({"fpu"}) is None
    assert guest.cpu_flags(tmp_path / "absent") == set()


def test_guest_without_svm_or_vmx_reports_no_kvm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse\n")
    monkeypatch.setattr(guest, "CPUINFO", info)
    monkeypatch.setattr(guest, "DEV_KVM", tmp_path / "kvm")
    assert guest.load_kvm(0.1) == {
        "module": None,
        "dev": None,
        "error": "the CPU has neither svm nor vmx",
    }


def test_guest_module_name() -> None:
    assert guest.module_name(Path("/k/kvmlu.ko")) == "kvmlu"
    assert guest.module_name(Path("/k/kvmlu_vapic-v2.ko.xz")) == "kvmlu_vapic_v2"


def test_guest_parse_args_strips_separator() -> None:
    args = guest.parse_args(["--status-file", "/r/status.json", "--", "sh", "-c", "x --y"])
    assert args.command == ["sh", "-c", "x --y"]
    assert args.module == []
    assert args.expect_edu is None


def test_guest_command_env_lists_the_modules_it_loaded(tmp_path: Path) -> None:
    mods = [tmp_path / "dbg/kvmlu.ko", tmp_path / "dbg/kvmlu_vapic_v1.ko"]
    env = guest._command_env([{"bdf": "0000:00:0a.0"}], tmp_path, ["A=1"], mods)
    assert env["KVMLU_MODULES"].split(":") == [str(m) for m in mods]
    assert env["KVMLU_EDU"] == "0000:00:0a.0" and env["A"] == "1"
    assert guest._command_env([], tmp_path, [])["KVMLU_MODULES"] == ""


def test_require_kmemleak_reaches_the_guest_runner(tmp_path: Path) -> None:
    for required in (False, True):
        words = shlex.split(
            value_of(vm.build_command(options(tmp_path, require_kmemleak=required)), "--exec")
        )
        assert ("--require-kmemleak" in words) is required
        assert guest.parse_args(words[5:-1]).require_kmemleak is required


KMEMLEAK_REPORT = """\
unreferenced object 0xffff888003a8c000 (size 64):
  comm "python3", pid 301, jiffies 4294937296 (age 12.004s)
  hex dump (first 32 bytes):
  backtrace:
    [<000000001c3bd8fd>] kmalloc_trace+0x26/0x60
unreferenced object 0xffff888003a8d000 (size 128):
  comm "python3", pid 301, jiffies 4294937300 (age 12.000s)
"""


def test_kmemleak_clear_then_scan(tmp_path: Path) -> None:
    node = tmp_path / "kmemleak"
    node.write_text("")
    leak = guest.Kmemleak(node)
    assert leak.start() is None and leak.enabled
    assert node.read_text() == "scan=off", "no scans of its own during the run"
    assert leak.scan() == ["scan"]  # what a file gives back; the kernel gives its report
    assert guest.count_leaks(KMEMLEAK_REPORT.splitlines()) == 2
    assert guest.count_leaks([]) == 0


def test_kmemleak_missing_or_off(tmp_path: Path) -> None:
    leak = guest.Kmemleak(tmp_path / "absent")
    assert "missing" in str(leak.start()) and not leak.enabled
    (tmp_path / "off").mkdir()  # a write that fails, as kmemleak's EPERM when it is off
    leak = guest.Kmemleak(tmp_path / "off")
    assert "kmemleak is off" in str(leak.start()) and not leak.enabled


@pytest.mark.parametrize("required", [False, True])
def test_kmemleak_required_fails_setup_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, required: bool
) -> None:
    monkeypatch.setattr(guest, "mount_debugfs", lambda: None)
    monkeypatch.setattr(guest, "KMEMLEAK", tmp_path / "absent")
    out = guest.Outcome(command=["true"], modules=[])
    leak = guest._start_kmemleak(required, out)
    assert not leak.enabled
    assert bool(out.setup_errors) is required
    assert guest._finish_kmemleak(leak, out) == [] and out.kmemleak_reports is None


def test_kmemleak_reports_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Fake(guest.Kmemleak):
        def scan(self) -> list[str]:
            return KMEMLEAK_REPORT.splitlines()

    monkeypatch.setattr(guest, "KMEMLEAK_MIN_AGE", -1.0)
    node = tmp_path / "kmemleak"
    node.write_text("")
    leak = Fake(node)
    assert leak.start() is None
    out = guest.Outcome(command=["true"], modules=[], command_status=0)
    report = guest._finish_kmemleak(leak, out)
    assert out.kmemleak_reports == 2
    assert out.to_json()["kmemleak_reports"] == 2
    # The report's lines are kernel log findings like any other.
    assert klog.scan(report)


def _fake_boots(
    monkeypatch: pytest.MonkeyPatch, opts: vm.VmOptions, boots: list[tuple[str, str, bool]]
) -> list[int]:
    """Replace the VM by *boots*: per boot, (console text, guest.log text,
    whether the guest writes a passing status). Returns the boots made."""
    made: list[int] = []

    def boot(o: vm.VmOptions, argv: list[str], env: dict[str, str]) -> tuple[int, vm.BootEnd]:
        console, said, passes = boots[len(made)]
        made.append(1)
        for name in ("status.json", "console.log", "guest.log"):
            (o.results_dir / name).unlink(missing_ok=True)
        (o.results_dir / "console.log").write_text(console)
        (o.results_dir / "guest.log").write_text(said)
        if passes:
            o.status_file.write_text(json.dumps({"command_status": 0}))
        return 0, "lockup" if LOCKUP in console else "exit"

    monkeypatch.setattr(vm, "_boot", boot)
    return made


PANIC = "[    1.8] Oops: int3: 0000 [#1] SMP NOPTI\n[    1.9] Kernel panic - not syncing\n"
STARTED = "kvmlu-guest: started 15.3 s after boot\n"
LOCKUP = "[  400.1] watchdog: BUG: soft lockup - CPU#1 stuck for 301s! [systemd-udevd:117]\n"


def test_a_panic_before_the_runner_boots_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Verifies: a kernel that panicked before the guest runner started is
    # booted again, once, and its console is kept; the second boot counts.
    opts = options(tmp_path)
    made = _fake_boots(monkeypatch, opts, [(PANIC, "", False), ("", STARTED, True)])
    assert vm.run(opts) == 0
    assert len(made) == 2
    assert "Kernel panic" in (opts.results_dir / "console-panic-1.log").read_text()


def test_a_panic_after_the_runner_started_is_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Verifies: once kvmlu's runner ran, a panic is the run's result, not a
    # reason to boot again; nor is a second early panic.
    opts = options(tmp_path)
    made = _fake_boots(monkeypatch, opts, [(PANIC, STARTED, False), ("", STARTED, True)])
    assert vm.run(opts) == vm.EXIT_NO_STATUS
    assert len(made) == 1
    opts = options(tmp_path, results_dir=tmp_path / "twice")
    made = _fake_boots(monkeypatch, opts, [(PANIC, "", False)] * 3)
    assert vm.run(opts) == vm.EXIT_NO_STATUS
    assert len(made) == vm.EARLY_PANIC_RETRIES + 1


def test_a_lockup_before_the_runner_boots_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Verifies: a kernel stuck for good before the runner started is booted
    # again like one that panicked; once the runner ran, it is a failure.
    opts = options(tmp_path)
    made = _fake_boots(monkeypatch, opts, [(LOCKUP, "", False), ("", STARTED, True)])
    assert vm.run(opts) == 0
    assert len(made) == 2
    assert "soft lockup" in (opts.results_dir / "console-panic-1.log").read_text()
    opts = options(tmp_path, results_dir=tmp_path / "late")
    made = _fake_boots(monkeypatch, opts, [(LOCKUP, STARTED, False), ("", STARTED, True)])
    assert vm.run(opts) == vm.EXIT_NO_STATUS
    assert len(made) == 1


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_lockup_watch_needs_a_cpu_stuck_for_good(chunk: int) -> None:
    # Verifies: short lockups (a starved TCG vCPU) pass; the first report
    # at the threshold is kept, however the console's bytes are split.
    text = (
        "[   12.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [python3:377]\n"
        f"[  300.0] watchdog: BUG: soft lockup - CPU#0 stuck for {vm.LOCKUP_FATAL_S - 1}s! [x:1]\n"
    ).encode()
    watch = vm.LockupWatch()
    for i in range(0, len(text), chunk):
        watch.write(text[i : i + chunk])
    assert watch.line is None
    late = LOCKUP.encode() + LOCKUP.replace("CPU#1", "CPU#0").encode()
    for i in range(0, len(late), chunk):
        watch.write(late[i : i + chunk])
    assert watch.line == LOCKUP.strip()


def test_a_locked_up_guest_is_stopped_before_the_timeout(tmp_path: Path) -> None:
    # Verifies: _boot stops the VM's process group as soon as the console
    # shows a CPU stuck for good, long before --timeout.
    opts = options(tmp_path, timeout=600.0)
    opts.results_dir.mkdir()
    script = f"printf '%s' {shlex.quote(LOCKUP)} >&2; exec sleep 600"
    began = time.monotonic()
    status, end = vm._boot(opts, ["sh", "-c", script], dict(os.environ))
    assert end == "lockup" and status != 0
    assert time.monotonic() - began < 300
    assert "soft lockup" in (opts.results_dir / "console.log").read_text()


def test_modules_in_a_folder_the_guest_hides_are_shared(tmp_path: Path) -> None:
    # Verifies: a release whose /lib/modules entry links into /var/cache
    # (tools/newest-kernel.sh) gets that folder as a read-only share; an
    # ordinary one does not.
    mods = tmp_path / "modules"
    mods.mkdir()
    (mods / "7.3.4+deb13-amd64").symlink_to("/var/cache/kvmlu/kernels/7.3/usr/lib/modules/7.3")
    (mods / "6.1.0-99-amd64").mkdir()
    k73 = vm.KernelInfo("7.3.4+deb13-amd64", tmp_path / "vmlinuz", tmp_path / "build")
    k61 = vm.KernelInfo("6.1.0-99-amd64", tmp_path / "vmlinuz", tmp_path / "build")
    assert vm.kernel_rodirs(k73, mods) == ["/var/cache/kvmlu/kernels/7.3/usr/lib/modules/7.3"]
    assert vm.kernel_rodirs(k61, mods) == []
