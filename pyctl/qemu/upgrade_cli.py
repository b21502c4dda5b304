"""``kvmlu qemu-upgrade``: live-upgrade the nested guest's QEMU again and again.

For each path (``kvmlu``: kernel-irqchip=off with the MSIs posted by kvmlu,
the table and bindings handed over with cpr-transfer; ``stock``:
kernel-irqchip=on, QEMU 10.2's own cpr-transfer with KVM's irqfds) it boots
the inner guest ready for cpr-transfer (:mod:`pyctl.qemu.cpr`), raises a
few MSIs between upgrades (each counted before the next), upgrades it N
times, each time to a new QEMU process, raising an MSI inside every pause
(verified to have landed there), and prints per upgrade the pause (QMP
``RESUME`` minus ``STOP``) and the verdict from the guest's own count; then
a summary. ``--faults`` adds three upgrades that go wrong on purpose (the
new QEMU does not start; it dies while loading; the old one dies after its
save). On the build machine it boots the test VM first, with itself as the
command; exit status 1 unless every upgrade was right.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyctl import vm
from pyctl.qemu import QemuError
from pyctl.qemu import check as qcheck
from pyctl.qemu import cli as qcli
from pyctl.qemu import cpr as qcpr
from pyctl.qemu import guest as qguest
from pyctl.qemu import run as qrun
from pyctl.qemu.bar import SysfsBar, msi_cpus, pinned
from pyctl.qemu.qmp import Qmp

CHECKOUT = Path(__file__).resolve().parents[2]
HOST_INITRD = CHECKOUT / "build" / "inner-guest" / "initramfs.cpio"
DEFAULT_RESULTS = CHECKOUT / "results" / "qemu-upgrade"
#: The paths, and the interrupt path of :mod:`pyctl.qemu.run` each boots.
PATHS: dict[str, qrun.Mode] = {"kvmlu": "kvmlu", "stock": "on"}
FAULT_ORDER: tuple[qcpr.Fault, ...] = ("new-fails", "new-dies", "old-dies")
#: The first QEMU release whose cpr-transfer preserves VFIO devices.
CPR_VFIO_SINCE = (10, 1)


@dataclass(frozen=True)
class Plan:
    """What to do on each path."""

    upgrades: int
    #: MSIs raised between upgrades, each counted before the next.
    between: int = 3
    #: Hold each pause open and raise inside it (see :mod:`pyctl.qemu.cpr`).
    hold: bool = True
    #: Then the three failing upgrades.
    faults: bool = False
    #: Busy loops the guest runs from its boot on (a guest under CPU load).
    spin: int = 0
    #: Print a line per upgrade as it happens.
    verbose: bool = True


@dataclass
class PathReport:
    """One path: a guest boot and its upgrades."""

    path: str
    skipped: str | None = None
    error: str | None = None
    boot_seconds: float | None = None
    #: MSIs raised between upgrades, and what the guest counted of them.
    between_raised: int = 0
    between_counted: int = 0
    upgrades: list[qcpr.Upgrade] = field(default_factory=list)
    faults: list[qcpr.Upgrade] = field(default_factory=list)
    #: kvmlu's tables and bindings before the boot and after the poweroff.
    kvmlu_before: dict[str, int] | None = None
    kvmlu_after: dict[str, int] | None = None

    @property
    def ok(self) -> bool:
        return (
            self.skipped is None
            and self.error is None
            and self.between_counted == self.between_raised
            and all(u.ok for u in self.upgrades + self.faults)
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ok"] = self.ok
        doc["summary"] = qcpr.summary(self.upgrades)
        return doc

    def text(self) -> str:
        if self.skipped:
            return f"{self.path}: SKIPPED: {self.skipped}"
        s = qcpr.summary(self.upgrades)
        p = s["pause_ms"]
        pauses = (
            f"pause p50 {p['p50']:.1f} ms, p90 {p['p90']:.1f} ms, max {p['max']:.1f} ms "
            f"(n={p['n']})"
            if p["n"]
            else "no pause measured"
        )
        out = [
            f"{self.path}: {'OK' if self.ok else 'FAIL'}: {s['ok']} of {s['upgrades']} "
            f"upgrades right; {s['window_raises']} MSIs raised inside the pauses, "
            f"{s['counted']} counted by the guest; {self.between_counted} of "
            f"{self.between_raised} between; {pauses}"
        ]
        if self.error:
            out.append(f"  error: {self.error}")
        return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``kvmlu qemu-upgrade``."""
    p.add_argument(
        "--paths",
        default="kvmlu,stock",
        metavar="kvmlu,stock",
        help="paths to upgrade, one guest boot each (default: %(default)s)",
    )
    p.add_argument("--upgrades", type=int, default=5, metavar="N", help="upgrades per path")
    p.add_argument(
        "--between",
        type=int,
        default=3,
        metavar="K",
        help="MSIs raised between upgrades, each counted before the next (default: 3)",
    )
    p.add_argument(
        "--no-hold",
        dest="hold",
        action="store_false",
        help="let the new QEMU run the guest as soon as it has loaded it: the pause is the "
        "hand-over alone, and no MSI is raised inside it",
    )
    p.add_argument(
        "--faults",
        action="store_true",
        help="then three failing upgrades per path: the new QEMU does not start, dies "
        "while loading, or the old one dies after its save",
    )
    qcli.add_inner_host_arguments(p, cpus=1)
    p.add_argument("--initrd", type=Path, metavar="PATH", help="inner initramfs")
    qcli.add_output_arguments(p, markdown=False)
    vm_group = p.add_argument_group("the test VM (when run on the build machine)")
    vm_group.add_argument("--kernel", metavar="VERSION", help="test VM kernel")
    vm_group.add_argument(
        "--results",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"results folder (default: the test VM's, else {DEFAULT_RESULTS})",
    )
    vm_group.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS")
    vm_group.add_argument("--dry-run", action="store_true", help="print the vng command")
    p.set_defaults(func=main)


def _note(msg: str) -> None:
    print(f"kvmlu qemu-upgrade: {msg}", file=sys.stderr, flush=True)


def run_path(path: str, plan: Plan, base: qrun.InnerOptions, workdir: Path) -> PathReport:
    """Boot the guest on *path*, upgrade it ``plan.upgrades`` times (and the faults)."""
    rep = PathReport(path)
    # Under TCG there is no KVM irqchip: stock delivers through QEMU's own
    # eventfd handler and APIC.
    mode: qrun.Mode = "off" if base.accel == "tcg" and path == "stock" else PATHS[path]
    irqchip, kvmlu, userspace_lapic, problem = qrun.mode_settings(mode, base.qemu)
    if problem:
        rep.skipped = problem
        return rep
    version = qrun.qemu_version(base.qemu)
    if version[:2] < CPR_VFIO_SINCE:
        rep.skipped = (
            f"QEMU {'.'.join(map(str, version))} cannot cpr-transfer a VFIO device "
            "(10.1 and later can): build it with make qemu"
        )
        return rep
    opts = qrun.InnerOptions(
        **{
            **asdict(base),
            "workdir": workdir / path / "gen-0",
            "irqchip": irqchip,
            "kvmlu": kvmlu,
            "userspace_lapic": userspace_lapic,
            "cpr": True,
        }
    )
    guest = qrun.InnerGuest(opts)
    up: qcpr.Upgrader | None = None
    rep.kvmlu_before = qcpr.kvmlu_counts()
    try:
        guest.start()
        rep.boot_seconds = guest.boot_seconds
        if plan.spin:
            guest.command("spin", str(plan.spin))
        qmp = Qmp.connect(opts.qmp_path)
        with SysfsBar(opts.bdf) as bar, pinned(msi_cpus(opts.bdf)):
            up = qcpr.Upgrader(guest, qmp, bar, workdir / path, hold=plan.hold)
            for _ in range(plan.upgrades):
                r, c = qcpr.spaced_raises(up.guest, bar, plan.between)
                rep.between_raised += r
                rep.between_counted += c
                u = up.upgrade()
                rep.upgrades.append(u)
                if plan.verbose:
                    print(f"  {path} {u.text()}", flush=True)
            for fault in FAULT_ORDER if plan.faults else ():
                u = up.upgrade(fault)
                rep.faults.append(u)
                print(f"  {path} {u.text()}", flush=True)
            r, c = qcpr.spaced_raises(up.guest, bar, plan.between)
            rep.between_raised += r
            rep.between_counted += c
        up.guest.poweroff()
    except (QemuError, OSError) as e:
        rep.error = f"{type(e).__name__}: {e}"
    finally:
        current = up.guest if up is not None else guest
        current.close()
        if up is not None:
            up.qmp.close()
        rep.kvmlu_after = qcpr.kvmlu_counts()
    return rep


def in_vm(args: argparse.Namespace) -> int:
    """Inside the test VM: each path, its upgrades."""
    results = args.results or Path(os.environ.get("KVMLU_RESULTS") or DEFAULT_RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    qemu, bdf, kernel = qcli.inner_host(args.qemu, args.device)
    work = qcheck.workdir()
    reports = []
    try:
        initrd = args.initrd or qguest.build_initramfs(work / "initramfs.cpio")
        base = qcli.inner_options(args, qemu=qemu, bdf=bdf, kernel=kernel, initrd=initrd, work=work)
        plan = Plan(args.upgrades, args.between, args.hold, args.faults)
        for path in args.paths.split(","):
            _note(f"{path}: booting the guest, then {args.upgrades} upgrades")
            rep = run_path(path, plan, base, work)
            print(rep.text(), flush=True)
            reports.append(rep)
            for log in sorted((work / path).glob("gen-*/qemu.log")):
                (results / f"{path}-{log.parent.name}-qemu.log").write_bytes(log.read_bytes())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return qcli.write_reports(args.json or results / "qemu-upgrade.json", reports)


def vm_argv(args: argparse.Namespace, initrd: Path) -> list[str]:
    """``kvmlu vm`` arguments that run this command inside the test VM."""
    qemu = (args.qemu or qrun.default_qemu()).absolute()
    inner = [sys.executable, "-m", "pyctl.cli", "qemu-upgrade", "--initrd", str(initrd)]
    inner += ["--paths", args.paths, "--upgrades", str(args.upgrades)]
    inner += ["--between", str(args.between), "--cpus", str(args.cpus), "--qemu", str(qemu)]
    inner += ["--accel", args.accel]
    if not args.hold:
        inner.append("--no-hold")
    if args.faults:
        inner.append("--faults")
    if args.device:
        inner += ["--device", args.device]
    if args.json:
        inner += ["--json", str(args.json.resolve())]
    if args.results:
        inner += ["--results", str(args.results.resolve())]
    argv = qcli.vm_options(args, qemu, args.results or DEFAULT_RESULTS, modules=True)
    return [*argv, "--", *inner]


def main(args: argparse.Namespace) -> int:
    """``kvmlu qemu-upgrade``."""
    paths = [p for p in args.paths.split(",") if p]
    if not paths or any(p not in PATHS for p in paths) or args.upgrades < 0 or args.between < 0:
        _note(f"--paths takes {','.join(PATHS)}; --upgrades and --between must be >= 0")
        return 2
    try:
        if os.environ.get("KVMLU_IN_VM") == "1":
            return in_vm(args)
        initrd = qguest.build_initramfs(HOST_INITRD)
        parser = argparse.ArgumentParser(prog="kvmlu vm")
        vm.add_arguments(parser)
        return vm.main(parser.parse_args(vm_argv(args, initrd)))
    except (QemuError, FileNotFoundError, ValueError) as e:
        _note(f"error: {e}")
        return 2
