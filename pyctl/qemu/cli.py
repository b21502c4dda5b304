"""``kvmlu qemu``: the inner guest under nested KVM, counting a passed-through edu's MSIs.

On the build machine it builds the initramfs into ``build/inner-guest/`` and
boots the test VM (``kvmlu vm --edu 1``; its kernel has ``iomem=relaxed``,
see :mod:`pyctl.qemu.bar` for why) with itself as the command. Inside the test VM
(``KVMLU_IN_VM=1``) it runs :func:`pyctl.qemu.check.run_mode` once per
``--irqchip`` mode, prints what each found, writes JSON and the inner guest's
logs into the results folder, and exits 1 unless every mode counted exactly
the MSIs raised and the guest's kernel log is clean.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyctl import vm
from pyctl.qemu import QemuError
from pyctl.qemu import check as qcheck
from pyctl.qemu import guest as qguest
from pyctl.qemu import run as qrun

CHECKOUT = Path(__file__).resolve().parents[2]
HOST_INITRD = CHECKOUT / "build" / "inner-guest" / "initramfs.cpio"
DEFAULT_RESULTS = CHECKOUT / "results" / "qemu"
DEFAULT_RAISES = 100
DEFAULT_GUEST_RAISES = 50
DEFAULT_REPROGRAM_RAISES = 10
DEFAULT_CPUS = 2
# The test VM boots the inner guest once per mode; each boot takes about a minute.
DEFAULT_VM_TIMEOUT = 1800.0


def _irqchips(text: str) -> list[qrun.Mode]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in qrun.MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a comma-separated list of {', '.join(qrun.MODES)}"
        )
    return modes  # type: ignore[return-value]


def add_inner_host_arguments(
    p: argparse.ArgumentParser,
    *,
    accel: bool = True,
    cpus: int | None = None,
    cpus_help: str = "inner guest vCPUs",
) -> None:
    """The options that say which QEMU runs the inner guest, how, and on which edu.

    ``--qemu`` and ``--device`` always; ``--accel`` (default kvm) if *accel*;
    ``--cpus`` with default *cpus* unless it is None.
    """
    p.add_argument(
        "--qemu",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"QEMU for the inner guest (default: {qrun.BUILT_QEMU} if it exists, "
        f"else {qrun.SYSTEM_QEMU})",
    )
    p.add_argument("--device", metavar="BDF", help="edu function in the test VM (default: last)")
    if accel:
        p.add_argument(
            "--accel",
            choices=("kvm", "tcg"),
            default="kvm",
            help="run the inner guest under the test VM's KVM (nested) or under TCG "
            "(default: %(default)s)",
        )
    if cpus is not None:
        p.add_argument(
            "--cpus",
            type=int,
            default=cpus,
            metavar="N",
            help=f"{cpus_help} (default: %(default)s)",
        )


def inner_options(
    args: argparse.Namespace, *, qemu: Path, bdf: str, kernel: Path, initrd: Path, work: Path
) -> qrun.InnerOptions:
    """The inner guest's options from :func:`add_inner_host_arguments`' ``--accel``
    and ``--cpus`` and what :func:`inner_host` found."""
    return qrun.InnerOptions(
        bdf=bdf,
        kernel=kernel,
        initrd=initrd,
        workdir=work,
        qemu=qemu,
        accel=args.accel,
        cpus=args.cpus,
    )


def add_output_arguments(p: argparse.ArgumentParser, *, markdown: bool) -> None:
    """``--json`` and, for a benchmark, ``--markdown``."""
    p.add_argument("--json", type=Path, metavar="PATH", help="write the results here as JSON")
    if markdown:
        p.add_argument("--markdown", type=Path, metavar="PATH", help="write the table here")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``kvmlu qemu``."""
    add_inner_host_arguments(
        p, cpus=DEFAULT_CPUS, cpus_help="inner guest vCPUs; --reprogram needs 2 or more"
    )
    p.add_argument(
        "--irqchip",
        type=_irqchips,
        default=["on", "off"],
        metavar="on,off",
        help="interrupt paths to run, one guest boot each: kernel-irqchip modes, or kvmlu "
        "(irqchip off, MSIs posted by kvmlu; needs make qemu's build) (default: on,off)",
    )
    p.add_argument(
        "--raises",
        type=int,
        default=DEFAULT_RAISES,
        metavar="N",
        help="MSIs raised from the test VM through the BAR (default: %(default)s)",
    )
    p.add_argument(
        "--guest-raises",
        type=int,
        default=DEFAULT_GUEST_RAISES,
        metavar="M",
        help="MSIs raised by the guest itself, timed (default: %(default)s, at most 256)",
    )
    p.add_argument(
        "--reprogram",
        type=int,
        default=DEFAULT_REPROGRAM_RAISES,
        metavar="K",
        help="then the guest moves its MSI to another CPU, masks it, turns it off and on, "
        "and K MSIs are raised after each change; 0 skips this (default: %(default)s)",
    )
    p.add_argument(
        "--initrd", type=Path, metavar="PATH", help="inner initramfs (default: build one)"
    )
    p.add_argument(
        "--module",
        type=Path,
        default=qguest.EDU_COUNT_KO,
        metavar="PATH.ko",
        help="edu_count.ko; the inner guest boots /boot/vmlinuz-<its release>",
    )
    p.add_argument(
        "--cpu",
        metavar="MODEL",
        help="inner -cpu (default: host; host,kvm=off with kernel-irqchip=off)",
    )
    p.add_argument(
        "--append",
        action="append",
        default=[],
        metavar="PARAM",
        help="extra inner guest kernel parameter (repeatable)",
    )
    p.add_argument(
        "--vfio-prop",
        dest="vfio_props",
        action="append",
        default=[],
        metavar="PROP=VALUE",
        help="extra -device vfio-pci property (repeatable); x-no-kvm-msi=on makes QEMU "
        "read the MSI eventfd and inject it itself instead of KVM's irqfd",
    )
    p.add_argument(
        "--memory",
        type=int,
        default=qrun.DEFAULT_MEMORY_MB,
        metavar="MB",
        help="inner guest memory (default: %(default)s)",
    )
    p.add_argument(
        "--boot-timeout",
        type=float,
        default=qrun.DEFAULT_BOOT_TIMEOUT,
        metavar="SECONDS",
        help="give up on an inner guest that is not READY by then (default: %(default)s)",
    )
    add_output_arguments(p, markdown=False)
    vm_group = p.add_argument_group("the test VM (when run on the build machine)")
    vm_group.add_argument("--kernel", metavar="VERSION", help="test VM kernel (default: newest)")
    vm_group.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        metavar="DIR",
        help="results folder (default: %(default)s)",
    )
    vm_group.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_VM_TIMEOUT,
        metavar="SECONDS",
        help="kill the test VM after this long (default: %(default)s)",
    )
    vm_group.add_argument("--dry-run", action="store_true", help="print the vng command and exit")
    p.set_defaults(func=main)


def _note(msg: str) -> None:
    print(f"kvmlu qemu: {msg}", file=sys.stderr, flush=True)


def _pick_bdf(requested: str | None) -> str:
    bdfs = [b for b in os.environ.get("KVMLU_EDU", "").split(",") if b]
    if requested:
        return requested
    if not bdfs:
        raise QemuError("no edu function on vfio-pci (KVMLU_EDU is empty)")
    return bdfs[-1]


def inner_host(
    qemu: Path | None, device: str | None, module: Path = qguest.EDU_COUNT_KO
) -> tuple[Path, str, Path]:
    """Inside the test VM: (the QEMU, the edu function, the inner kernel image).

    QemuError if the QEMU, /dev/kvm or the function on vfio-pci is missing.
    """
    qemu = qemu or qrun.default_qemu()
    bdf = _pick_bdf(device)
    qrun.check_host(qemu, bdf)
    return qemu, bdf, qrun.find_kernel_image(qguest.module_release(module))


def write_reports(out: Path, reports: Sequence[Any]) -> int:
    """Write the reports' JSON to *out*; 0 if some ran and every one that ran is ok."""
    out.write_text(json.dumps([r.to_json() for r in reports], indent=2) + "\n")
    ran = [r for r in reports if r.skipped is None]
    return 0 if ran and all(r.ok for r in ran) else 1


def vm_options(args: argparse.Namespace, qemu: Path, results: Path, modules: bool) -> list[str]:
    """``kvmlu vm`` options for one edu function and *qemu* (shared read-only if the
    guest cannot see it), from the command's test-VM options."""
    argv = ["--edu", "1"] if modules else ["--edu", "1", "--no-modules"]
    if vm.hidden_in_guest(qemu):
        argv += ["--rodir", str(qemu.parent)]
    argv += ["--results", str(results), "--timeout", str(args.timeout)]
    if args.kernel:
        argv += ["--kernel", args.kernel]
    if args.dry_run:
        argv.append("--dry-run")
    return argv


def in_vm(args: argparse.Namespace) -> int:
    """Inside the test VM: one inner guest boot per mode."""
    results = Path(os.environ.get("KVMLU_RESULTS") or args.results)
    results.mkdir(parents=True, exist_ok=True)
    qemu, bdf, kernel = inner_host(args.qemu, args.device, args.module)
    work = qcheck.workdir()
    try:
        initrd = args.initrd or qguest.build_initramfs(work / "initramfs.cpio", args.module)
        reports = []
        for mode in args.irqchip:
            irqchip, kvmlu, userspace_lapic, _ = qrun.mode_settings(mode, qemu)
            opts = qrun.InnerOptions(
                bdf=bdf,
                kernel=kernel,
                initrd=initrd,
                workdir=work / mode,
                irqchip=irqchip,
                kvmlu=kvmlu,
                userspace_lapic=userspace_lapic,
                qemu=qemu,
                cpu=args.cpu,
                memory_mb=args.memory,
                cpus=args.cpus,
                accel=args.accel,
                append=args.append,
                vfio_props=args.vfio_props,
            )
            _note(f"{mode}: booting {kernel.name} under {qemu}")
            rep = qcheck.run_mode(
                opts,
                args.raises,
                args.guest_raises,
                boot_timeout=args.boot_timeout,
                keep_logs=results,
                reprogram_raises=args.reprogram,
            )
            print(rep.text(), flush=True)
            reports.append(rep)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_reports(args.json or results / "qemu.json", reports)


def vm_argv(args: argparse.Namespace, initrd: Path) -> list[str]:
    """``kvmlu vm`` arguments that run this command inside the test VM."""
    inner = [sys.executable, "-m", "pyctl.cli", "qemu", "--initrd", str(initrd)]
    inner += ["--irqchip", ",".join(args.irqchip), "--raises", str(args.raises)]
    inner += ["--guest-raises", str(args.guest_raises), "--memory", str(args.memory)]
    inner += ["--reprogram", str(args.reprogram), "--cpus", str(args.cpus)]
    inner += ["--accel", args.accel]
    inner += ["--boot-timeout", str(args.boot_timeout), "--module", str(args.module.resolve())]
    # Chosen here: the guest does not see /var/cache, where make qemu builds.
    qemu = (args.qemu or qrun.default_qemu()).absolute()
    inner += ["--qemu", str(qemu)]
    if args.device:
        inner += ["--device", args.device]
    if args.cpu:
        inner += ["--cpu", args.cpu]
    for param in args.append:
        inner += ["--append", param]
    for prop in args.vfio_props:
        inner += ["--vfio-prop", prop]
    if args.json:
        inner += ["--json", str(args.json.resolve())]
    # kvmlu.ko only where a path posts through it.
    argv = vm_options(args, qemu, args.results, modules="kvmlu" in args.irqchip)
    return [*argv, "--", *inner]


def on_host(args: argparse.Namespace) -> int:
    """On the build machine: build the initramfs, boot the test VM, run inside."""
    initrd = qguest.build_initramfs(HOST_INITRD, args.module)
    parser = argparse.ArgumentParser(prog="kvmlu vm")
    vm.add_arguments(parser)
    return vm.main(parser.parse_args(vm_argv(args, initrd)))


def main(args: argparse.Namespace) -> int:
    """``kvmlu qemu``."""
    if args.raises < 0 or not 0 <= args.guest_raises <= 256:
        _note("--raises must be >= 0 and --guest-raises within 0..256")
        return 2
    if args.cpus < 1 or args.reprogram < 0 or (args.reprogram and args.cpus < 2):
        _note("--cpus must be >= 1, --reprogram >= 0, and --reprogram needs --cpus 2 or more")
        return 2
    try:
        if os.environ.get("KVMLU_IN_VM") == "1":
            return in_vm(args)
        return on_host(args)
    except (QemuError, FileNotFoundError, ValueError) as e:
        _note(f"error: {e}")
        return 2
