"""Tests of the nested guest's host-side code that need no VM: the initramfs,
the inner QEMU's command line, the guest's line protocol (against a fake QEMU),
and ``kvmlu qemu``'s way into the test VM."""

from __future__ import annotations

import shlex
import stat
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pyctl import cli, vm
from pyctl.qemu import GuestBootError, GuestCommandError
from pyctl.qemu import bar as qbar
from pyctl.qemu import check as qcheck
from pyctl.qemu import cli as qcli
from pyctl.qemu import guest as qguest
from pyctl.qemu import run as qrun
from pyctl.qemu.raising import RaiseResult

FAKE_KO = b"\x7fELF...vermagic=6.1.0-99-amd64 SMP preempt mod_unload modversions \0rest"


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev) of a newc archive, up to its trailer."""
    out = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos = (pos + namesize + 3) & ~3
        body = data[pos : pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (fields[1], body, (fields[9], fields[10]))


def test_initramfs_holds_busybox_init_and_module(tmp_path: Path) -> None:
    ko = tmp_path / "edu_count.ko"
    ko.write_bytes(FAKE_KO)
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF busybox")
    out = qguest.build_initramfs(tmp_path / "out" / "initramfs.cpio", ko, bb)
    files = read_newc(out.read_bytes())
    assert files["bin/busybox"][1] == b"\x7fELF busybox"
    assert stat.S_ISLNK(files["bin/sh"][0]) and files["bin/sh"][1] == b"busybox"
    assert files["edu_count.ko"][1] == FAKE_KO
    mode, init, _ = files["init"]
    assert mode & 0o111 and init.startswith(b"#!/bin/sh\n")
    assert b"insmod /edu_count.ko" in init
    assert b"/dev/ttyS1" in files["ctl.sh"][1]
    assert stat.S_ISCHR(files["dev/console"][0]) and files["dev/console"][2] == (5, 1)
    assert stat.S_ISDIR(files["proc"][0])
    # Directories come before what they hold, as the kernel unpacks in order.
    names = list(files)
    assert names.index("bin") < names.index("bin/busybox")
    # Built twice, the same bytes.
    again = qguest.build_initramfs(tmp_path / "again.cpio", ko, bb)
    assert again.read_bytes() == out.read_bytes()


def test_initramfs_needs_the_module(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make guest-module"):
        qguest.build_initramfs(tmp_path / "x.cpio", tmp_path / "missing.ko")


def test_module_release(tmp_path: Path) -> None:
    ko = tmp_path / "edu_count.ko"
    ko.write_bytes(FAKE_KO)
    assert qguest.module_release(ko) == "6.1.0-99-amd64"
    ko.write_bytes(b"not a module")
    with pytest.raises(ValueError, match="no vermagic"):
        qguest.module_release(ko)


def inner(tmp_path: Path, **kw: object) -> qrun.InnerOptions:
    defaults: dict[str, object] = {
        "bdf": "0000:00:0a.0",
        "kernel": Path("/boot/vmlinuz-6.1.0-99-amd64"),
        "initrd": tmp_path / "initramfs.cpio",
        "workdir": tmp_path / "work",
        "qemu": qrun.SYSTEM_QEMU,
    }
    defaults.update(kw)
    return qrun.InnerOptions(**defaults)  # type: ignore[arg-type]


def value_of(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize(("irqchip", "cpu"), [("on", "host"), ("off", "host,kvm=off")])
def test_inner_qemu_command_line(tmp_path: Path, irqchip: qrun.Irqchip, cpu: str) -> None:
    opts = inner(tmp_path, irqchip=irqchip)
    argv = qrun.qemu_argv(opts)
    assert argv[0] == str(qrun.SYSTEM_QEMU)
    assert "-L" not in argv, "Debian's QEMU finds its firmware itself"
    assert value_of(argv, "-accel") == "kvm"
    assert value_of(argv, "-cpu") == cpu
    assert value_of(argv, "-machine") == f"q35,kernel-irqchip={irqchip}"
    assert value_of(argv, "-device") == "vfio-pci,host=0000:00:0a.0"
    assert {"-nographic", "-nodefaults", "-no-reboot"} <= set(argv)
    assert value_of(argv, "-kernel") == "/boot/vmlinuz-6.1.0-99-amd64"
    serials = [argv[i + 1] for i, a in enumerate(argv) if a == "-serial"]
    assert serials == [f"file:{opts.console_log}", "chardev:ctl"]
    assert f"path={opts.socket_path},server=on,wait=off" in value_of(argv, "-chardev")
    params = value_of(argv, "-append").split()
    assert params[0] == "console=ttyS0" and "noxsave" in params


def test_inner_qemu_cpu_and_params_can_be_chosen(tmp_path: Path) -> None:
    argv = qrun.qemu_argv(
        inner(tmp_path, irqchip="off", cpu="EPYC", append=["quiet"], vfio_props=["x-no-kvm-msi=on"])
    )
    assert value_of(argv, "-cpu") == "EPYC"
    assert value_of(argv, "-append").endswith(" quiet")
    assert value_of(argv, "-device") == "vfio-pci,host=0000:00:0a.0,x-no-kvm-msi=on"


def test_built_qemu_gets_debian_firmware(tmp_path: Path) -> None:
    built = tmp_path / "qemu" / "qemu-system-x86_64"
    argv = qrun.qemu_argv(inner(tmp_path, qemu=built, firmware=[Path("/fw/a"), Path("/fw/b")]))
    assert argv[:5] == [str(built), "-L", "/fw/a", "-L", "/fw/b"]
    assert qrun.default_firmware(built) == [d for d in qrun.BUILT_QEMU_FIRMWARE if d.is_dir()]
    assert qrun.default_firmware(qrun.SYSTEM_QEMU) == []


def test_userspace_apic_needs_qemu_before_8() -> None:
    assert qrun.irqchip_problem("off", (7, 2, 22)) is None
    assert qrun.irqchip_problem("on", (10, 2, 2)) is None
    assert "removed in 8.0" in str(qrun.irqchip_problem("off", (10, 2, 2)))


def test_vector_count_parse() -> None:
    line = "vector=0 count=12 nostatus=1 cpu=1 first_ns=100 last_ns=900"
    assert qrun.VectorCount.parse(line) == qrun.VectorCount(0, 12, 1, 1, 100, 900)
    assert qrun.VectorCount.parse(line.replace("cpu=1", "cpu=-1")).cpu == -1
    with pytest.raises(GuestCommandError, match="unexpected irqs line"):
        qrun.VectorCount.parse("vector=0 count=x")


def test_msi_message_parse() -> None:
    line = "enabled=1 address=0xfee01000 data=0x4031 dest=1 vector=49"
    assert qrun.MsiMessage.parse(line) == qrun.MsiMessage(True, 0xFEE01000, 0x4031, 1, 49)
    with pytest.raises(GuestCommandError, match="unexpected msi line"):
        qrun.MsiMessage.parse("enabled=1 address=zz")


def test_msi_cpus_and_cpu_lists(tmp_path: Path) -> None:
    assert qbar.parse_cpu_list("0-2,5\n") == {0, 1, 2, 5}
    interrupts = tmp_path / "interrupts"
    interrupts.write_text(
        "           CPU0       CPU1\n"
        "  24:          0         17  IR-PCI-MSI 163840-edge      vfio-msi[0](0000:00:0a.0)\n"
        "  25:          3          0  IR-PCI-MSI 165888-edge      vfio-msi[0](0000:00:0b.0)\n"
        " NMI:          0          0   Non-maskable interrupts\n"
    )
    (tmp_path / "irq" / "24").mkdir(parents=True)
    (tmp_path / "irq" / "24" / "effective_affinity_list").write_text("1\n")
    assert qbar.msi_cpus("0000:00:0a.0", interrupts, tmp_path / "irq") == {1}
    assert qbar.msi_cpus("0000:00:0b.0", interrupts, tmp_path / "irq") == set()
    assert qbar.msi_cpus("0000:00:0c.0", interrupts, tmp_path / "irq") == set()
    assert qbar.msi_irq_count("0000:00:0a.0", interrupts) == 17
    assert qbar.msi_irq_count("0000:00:0b.0", interrupts) == 3
    assert qbar.msi_irq_count("0000:00:0c.0", interrupts) == 0


# A stand-in for QEMU: listens where -chardev says, speaks the guest's side.
FAKE_QEMU = textwrap.dedent(
    """\
    import os, socket, sys
    argv = sys.argv[1:]
    chardev = argv[argv.index("-chardev") + 1]
    path = [p.split("=", 1)[1] for p in chardev.split(",") if p.startswith("path=")][0]
    if os.environ.get("FAKE_QEMU_EXIT"):
        print("qemu: cannot start", flush=True)
        sys.exit(1)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    conn, _ = srv.accept()
    f = conn.makefile("rw", newline="\\n")
    f.write("kernel noise\\nREADY uptime=12.50 dev=0000:00:01.0\\n")
    f.flush()
    count = 0
    for line in f:
        rid, cmd, *arg = line.split()
        if cmd == "irqs":
            f.write(f"{rid} vector=0 count={count} nostatus=0 cpu=0 first_ns=1 last_ns=2\\n")
            count += 1
        elif cmd == "msi":
            f.write(f"{rid} enabled=1 address=0xfee00000 data=0x4021 dest=0 vector=33\\n")
        elif cmd in ("move", "enable", "mask"):
            if arg != ["1"] and arg != ["0"]:
                f.write(f"{rid} ERR {cmd}\\n")
                f.flush()
                continue
        elif cmd == "raise":
            f.write(f"99 stale answer\\n{rid} " + " ".join(["1500"] * int(arg[0])) + "\\n")
        elif cmd == "dmesg":
            f.write(f"{rid} [    0.000000] Linux version 6.1\\n{rid} [    1.0] ok\\n")
        elif cmd == "poweroff":
            f.write(f"{rid} OK\\n")
            f.flush()
            sys.exit(0)
        else:
            f.write(f"{rid} ERR {cmd}\\n")
            f.flush()
            continue
        f.write(f"{rid} OK\\n")
        f.flush()
    """
)


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Path:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    script.chmod(0o755)
    return script


def test_inner_guest_protocol(tmp_path: Path, fake_qemu: Path) -> None:
    g = qrun.InnerGuest(inner(tmp_path, qemu=fake_qemu))
    assert g.state is qrun.Runstate.IDLE
    with pytest.raises(qrun.StateError, match="needs READY; the guest is IDLE"):
        g.irqs()
    with g:
        g.start(boot_timeout=30)
        assert g.state is qrun.Runstate.READY
        assert g.guest_uptime == 12.5 and g.guest_bdf == "0000:00:01.0"
        assert g.boot_seconds is not None
        assert g.total() == 0
        assert g.irqs() == [qrun.VectorCount(0, 1, 0, 0, 1, 2)]
        assert g.msi() == qrun.MsiMessage(True, 0xFEE00000, 0x4021, 0, 33)
        g.move(1)
        g.set_enabled(False)
        g.set_masked(True)
        with pytest.raises(GuestCommandError, match="refused move 7"):
            g.move(7)
        assert g.raise_in_guest(3) == [1500, 1500, 1500], "another id's line is skipped"
        assert g.dmesg()[0].startswith("[    0.000000] Linux")
        with pytest.raises(GuestCommandError, match="refused bogus"):
            g.command("bogus")
        assert g.poweroff(timeout=10) == 0
        assert g.state is qrun.Runstate.STOPPED
    assert "$ " in g.opts.qemu_log.read_text(), "the log starts with the command line"


def test_inner_guest_qemu_that_exits(
    tmp_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_EXIT", "1")
    g = qrun.InnerGuest(inner(tmp_path, qemu=fake_qemu))
    with pytest.raises(GuestBootError, match=r"exited with status 1.*cannot start"):
        g.start(boot_timeout=30)
    assert g.state is qrun.Runstate.STOPPED


def test_kvmlu_qemu_on_the_host_boots_the_test_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tmp_path / "linux"
    (tree / "arch/x86/boot").mkdir(parents=True)
    (tree / "arch/x86/boot/bzImage").write_bytes(b"")
    monkeypatch.setattr(vm, "find_vng", lambda: Path("/venv/bin/vng"))
    monkeypatch.setattr(qcli, "HOST_INITRD", tmp_path / "inner" / "initramfs.cpio")
    monkeypatch.delenv("KVMLU_IN_VM", raising=False)
    ko = tmp_path / "edu_count.ko"
    ko.write_bytes(FAKE_KO)
    rc = cli.main(["qemu", "--kernel", str(tree), "--module", str(ko), "--raises", "7",
                   "--irqchip", "off", "--vfio-prop", "x-no-kvm-msi=on", "--reprogram", "3",
                   "--cpus", "4", "--results", str(tmp_path / "r"), "--dry-run"])  # fmt: skip
    assert rc == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    assert (tmp_path / "inner" / "initramfs.cpio").is_file(), "built on the host"
    [qemu_opts] = [a.removeprefix("--qemu-opts=") for a in argv if a.startswith("--qemu-opts=")]
    assert qemu_opts.split().count("edu") == 1, "one edu function, for the guest"
    assert "iomem=relaxed" in shlex.split(value_of(argv, "--append"))
    words = shlex.split(value_of(argv, "--exec"))
    command = words[words.index("--") + 1 : -1]
    assert command[1:4] == ["-m", "pyctl.cli", "qemu"]
    assert value_of(command, "--initrd") == str(tmp_path / "inner" / "initramfs.cpio")
    assert value_of(command, "--raises") == "7"
    assert value_of(command, "--irqchip") == "off"
    assert value_of(command, "--module") == str(ko)
    assert value_of(command, "--vfio-prop") == "x-no-kvm-msi=on"
    assert value_of(command, "--qemu") == str(qrun.default_qemu())
    assert value_of(command, "--reprogram") == "3"
    assert value_of(command, "--cpus") == "4"
    assert value_of(command, "--accel") == "kvm"


def test_kvmlu_qemu_shares_a_qemu_the_guest_cannot_see(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KVMLU_IN_VM", raising=False)
    built = Path("/var/cache/kvmlu/qemu/current/qemu-system-x86_64")
    args = cli.build_parser().parse_args(["qemu", "--qemu", str(built)])
    argv = qcli.vm_argv(args, tmp_path / "initramfs.cpio")
    assert value_of(argv, "--rodir") == "/var/cache/kvmlu/qemu/current"
    assert value_of(argv, "--qemu") == str(built)
    args = cli.build_parser().parse_args(["qemu", "--qemu", "/usr/bin/qemu-system-x86_64"])
    assert "--rodir" not in qcli.vm_argv(args, tmp_path / "initramfs.cpio")


def test_kvmlu_qemu_loads_the_modules_for_the_kvmlu_path(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["qemu", "--irqchip", "on,kvmlu"])
    assert "--no-modules" not in qcli.vm_argv(args, tmp_path / "initramfs.cpio")
    args = cli.build_parser().parse_args(["qemu", "--irqchip", "on,off"])
    assert "--no-modules" in qcli.vm_argv(args, tmp_path / "initramfs.cpio")


def test_kvmlu_qemu_passes_cpus_and_reprogram_to_run_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[qrun.InnerOptions, int]] = []

    def fake_run_mode(opts: qrun.InnerOptions, *a: object, **kw: Any) -> qcheck.ModeReport:
        seen.append((opts, kw["reprogram_raises"]))
        return qcheck.ModeReport(mode=opts.mode, qemu=str(opts.qemu), bdf=opts.bdf)

    ko = tmp_path / "edu_count.ko"
    ko.write_bytes(FAKE_KO)
    monkeypatch.setenv("KVMLU_IN_VM", "1")
    monkeypatch.setenv("KVMLU_EDU", "0000:00:0a.0")
    monkeypatch.setenv("KVMLU_RESULTS", str(tmp_path / "r"))
    monkeypatch.setattr(qrun, "check_host", lambda qemu, bdf: None)
    monkeypatch.setattr(qrun, "find_kernel_image", lambda release: tmp_path / "vmlinuz")
    monkeypatch.setattr(qrun, "mode_settings", lambda mode, qemu: ("on", False, False, None))
    monkeypatch.setattr(qcheck, "run_mode", fake_run_mode)
    monkeypatch.setattr(qguest, "build_initramfs", lambda out, module: out)
    cli.main(["qemu", "--module", str(ko), "--irqchip", "on", "--cpus", "3", "--reprogram", "5",
              "--accel", "tcg"])  # fmt: skip
    [(opts, reprogram)] = seen
    assert (opts.cpus, reprogram, opts.accel) == (3, 5, "tcg")


def test_kvmlu_qemu_rejects_bad_counts() -> None:
    assert cli.main(["qemu", "--guest-raises", "300"]) == 2
    assert cli.main(["qemu", "--cpus", "1"]) == 2, "--reprogram needs two CPUs"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["qemu", "--irqchip", "on,maybe"])


def _kvmlu_report(absent: str | None, bindings: int, signals: int) -> qcheck.ModeReport:
    """A kvmlu-path report of 10 raises all counted, with kvmlu's counts."""
    rep = qcheck.ModeReport(mode="kvmlu", qemu="qemu", bdf="0000:00:0a.0", absent_device=absent)
    rep.host_raises = RaiseResult(raised=10, counted=10)
    rep.kvmlu = {"bindings": bindings, "signals": signals, "posted": signals, "coalesced": 0,
                 "notified": signals}  # fmt: skip
    return rep


def test_kvmlu_report_without_the_device_wants_no_posting() -> None:
    # The fallback boot (object given a device node that does not exist) is
    # right when kvmlu posted nothing, wrong when it posted; the posting
    # path is the reverse.
    assert _kvmlu_report("/dev/kvmlu-absent", 0, 0).ok
    assert not _kvmlu_report("/dev/kvmlu-absent", 1, 10).ok
    assert _kvmlu_report(None, 1, 10).ok
    assert not _kvmlu_report(None, 0, 0).ok
    assert "without /dev/kvmlu-absent" in _kvmlu_report("/dev/kvmlu-absent", 0, 0).text()
