"""The ``kvmlu`` command line: one parser, a subcommand per job.

An error is one line on stderr; the exit status says what kind (:data:`EPILOG`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from pyctl import bench_irq, bench_sessions, bench_upgrade, check, demo, livevmm, upgrade, vm
from pyctl import swap as swap_mod
from pyctl.argtypes import int_range, positive_float
from pyctl.edu import Edu, find_vfio_edu
from pyctl.errors import SetupError, UsageError
from pyctl.kvmlu import DEVICE_PATH, Device
from pyctl.qemu import bench as qbench
from pyctl.qemu import bench_cpr as qbench_cpr
from pyctl.qemu import cli as qemu_cli
from pyctl.qemu import upgrade_cli as qemu_upgrade
from pyctl.status import print_status, status_dict
from pyctl.uapi import lib
from pyctl.vapic import VapicDevice

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3
EPILOG = (
    "exit status: 0 done; 1 a check failed (interrupts lost, spurious or duplicated, "
    "a guest miscounted); 2 usage error; 3 environment or runtime error (kvmlu.ko not "
    "loaded, no edu device, a failed ioctl, a VMM or guest that went wrong)"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each option's default, unless it has none or its help names it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The parser of ``kvmlu`` and of each subcommand: defaults in the help, a
    usage error in one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def version() -> str:
    """The installed package's version (pyproject.toml), or ``unknown`` if not installed."""
    try:
        return importlib.metadata.version("kvmlu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def open_device() -> Device:
    """``/dev/kvmlu``, or a SetupError that says the module is not loaded."""
    try:
        return Device()
    except FileNotFoundError:
        raise SetupError(f"kvmlu.ko is not loaded ({DEVICE_PATH} is missing)") from None


def cmd_status(args: argparse.Namespace) -> int:
    with open_device() as dev:
        if args.json:
            print(json.dumps(status_dict(dev), indent=2))
        else:
            print_status(dev)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    with open_device() as dev:
        return demo.run(dev)


def cmd_sessions(args: argparse.Namespace) -> int:
    with open_device() as dev:
        entries = dev.list_sessions()
    if args.json:
        print(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
        return 0
    if not entries:
        print("no sessions")
    for e in entries:
        state = "held" if e.held else "preserved"
        print(f"{e.name}: {e.nr_objects} objects, {state}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    raises, fetches, switch = check.load_log(args.log)
    report = check.check(raises, fetches, switch)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.text())
    return 0 if report.ok else 1


def _edu_bdf(requested: str | None) -> str:
    bdfs = find_vfio_edu()
    if requested:
        if requested not in bdfs:
            raise SetupError(f"{requested} is not an edu device on vfio-pci ({bdfs})")
        return requested
    if not bdfs:
        raise SetupError("no edu device bound to vfio-pci (run inside `kvmlu vm`)")
    return bdfs[0]


def cmd_bind(args: argparse.Namespace) -> int:
    """Bind an edu device's MSI to a new table, raise, and show what arrived."""
    if args.vcpu >= args.vcpus:
        raise UsageError(f"--vcpu {args.vcpu}: the table has vCPUs 0..{args.vcpus - 1}")
    bdf = _edu_bdf(args.device)
    with open_device() as dev, Edu(bdf) as edu, dev.create_table(args.vcpus) as table:
        notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        msi = edu.enable_msi()
        try:
            table.set_notify(args.vcpu, notify, nv=0xF2, ndst=args.vcpu)
            with table.bind(msi, args.vcpu, args.vector) as b:
                print(f"{bdf}: MSI eventfd bound to vCPU {args.vcpu}, vector 0x{args.vector:02x}")
                for _ in range(args.raise_count):
                    before = b.info().stats.signals
                    edu.raise_irq()
                    deadline = time.monotonic() + 5.0
                    while b.info().stats.signals == before and time.monotonic() < deadline:
                        time.sleep(0.001)
                info = b.info()
                print(f"binding: active={info.active} hup={info.hup} {info.stats}")
                print(f"vCPU {args.vcpu}: {table.view(args.vcpu)}")
        finally:
            edu.disable_msi()
            os.close(msi)
            os.close(notify)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    out = args.json
    if out is None and os.environ.get("KVMLU_RESULTS"):
        out = os.path.join(os.environ["KVMLU_RESULTS"], "bench-irq.json")
    bench_irq.main(_edu_bdf(args.device), args.samples, args.seconds, out, args.rate)
    return 0


def cmd_swap(args: argparse.Namespace) -> int:
    """Build a VM's worth of tables with vAPIC state on --from, swap it to --to."""
    with (
        open_device() as dev,
        VapicDevice(args.from_version) as src,
        VapicDevice(args.to_version) as dst,
    ):
        tables = [dev.create_table(args.vcpus) for _ in range(args.tables)]
        pairs = [(t, src.create(t)) for t in tables]
        for t, v in pairs:
            for vcpu in range(t.nr_vcpus):
                for vec in (0x30 + vcpu % 16, 0x80 + vcpu % 64, 0xE0):
                    t.post(vcpu, vec)
                v.sync(vcpu)
                v.ack(vcpu)
                t.post(vcpu, 0x50)  # left pending in PIR across the swap
        fmt = args.to_version if args.to_version < args.from_version else 0
        new, rep = swap_mod.swap(pairs, dst, format=fmt, unload_old=args.unload)
        pending = all(0x50 in t.pir(i) for t in tables for i in range(t.nr_vcpus))
        print(f"v{args.from_version} -> v{args.to_version}: {rep.text()}")
        print(f"PIR left pending through the swap: {'yes' if pending else 'NO'}")
        for n in new:
            n.close()
        for t in tables:
            t.close()
    return 0 if rep.ok and pending else 1


def _vapic_version(text: str) -> int:
    if text not in ("1", "2", "v1", "v2"):
        raise argparse.ArgumentTypeError(f"{text!r}: the vAPIC versions are v1 and v2")
    return int(text.removeprefix("v"))


def _add_bench(sub: Any) -> None:
    """``kvmlu bench`` and its benchmarks."""
    p = sub.add_parser("bench", help="benchmarks (inside the test VM)")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bsub.add_parser(
        "irq",
        help="edu MSIs through a kvmlu binding versus a userspace interrupt thread",
    )
    b.add_argument("--device", metavar="BDF", help="edu PCI function (default: the first)")
    b.add_argument("--samples", type=int_range(1), default=2000, help="latency samples per path")
    b.add_argument(
        "--seconds",
        type=positive_float,
        default=4.0,
        help="time per path of each throughput phase, full speed and paced (default: %(default)g)",
    )
    b.add_argument(
        "--rate",
        type=positive_float,
        default=bench_irq.DEFAULT_RATE,
        metavar="N",
        help="raises a second of the paced stream both paths get (default: %(default)g)",
    )
    b.add_argument("--json", metavar="PATH", help="write the results here")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser(
        "upgrade",
        help="live-upgrade downtime: vCPU counts x workloads x strategies x optimisations",
        description="For each configuration, upgrade a test VMM N times under a stream of "
        "edu MSIs and record the vCPU downtime, its phases and the checker's verdict; "
        "write JSON after each run. Inside the test VM.",
    )
    bench_upgrade.add_arguments(b)
    b.set_defaults(func=bench_upgrade.bench)
    b = bsub.add_parser(
        "qemu",
        help="the nested guest's own MSI latency and host CPU per MSI on each interrupt path",
        description=qbench.__doc__.split("\n\n")[0] if qbench.__doc__ else None,
    )
    qbench.add_arguments(b)
    b = bsub.add_parser(
        "qemu-upgrade",
        help="the pause of the nested guest's cpr-transfer: kvmlu rows against stock",
        description=(qbench_cpr.__doc__ or "").split("\n\n")[1].replace("\n", " "),
    )
    qbench_cpr.add_arguments(b)
    b = bsub.add_parser(
        "sessions",
        help="CREATE_SESSION's time as sessions of many owners pile up",
        description=(bench_sessions.__doc__ or "").split("\n\n")[1].replace("\n", " "),
    )
    bench_sessions.add_arguments(b)
    b = bsub.add_parser(
        "report",
        help="the upgrade benchmark's JSON as a Markdown table and a PNG plot (host)",
    )
    bench_upgrade.add_report_arguments(b)
    b.set_defaults(func=bench_upgrade.report)

    # Internal: the upgrade starts it. No help= keeps it out of the listing.
    p = sub.add_parser(
        "vmm",
        description="The test VMM of a live upgrade, driven over a control socket (internal: "
        "kvmlu upgrade starts it). Own a descriptor table for V vCPUs, a vAPIC, VFIO "
        "devices with their MSI bindings, and V vCPU threads that sync, ack and EOI; "
        "answer the upgrade's commands on the control socket (see pyctl.livevmm).",
    )
    livevmm.add_arguments(p)
    p.set_defaults(func=livevmm.main)

    p = sub.add_parser(
        "upgrade",
        help="live-upgrade a test VMM N times under real MSIs (in the VM)",
        description="Start a test VMM with V vCPU threads over the edu devices, raise "
        "MSIs the whole time, upgrade it N times in the chosen strategy, and print the "
        "vCPU downtime (with its phases) and the checker's verdict. Exits 1 if any "
        "interrupt was lost, spurious or duplicated.",
    )
    upgrade.add_arguments(p)
    p.set_defaults(func=upgrade.main)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kvmlu",
        description="Control kvmlu: posted-interrupt descriptors that survive a VMM upgrade.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    p = sub.add_parser("status", help="what kvmlu.ko reports")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sessions", help="the sessions you may retrieve")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser(
        "check",
        help="the PIR preservation checker: lost, spurious, duplicated",
        description="Read a handoff log (raises and fetches with times, and the switch "
        "window) and report per vCPU and vector what was lost, spurious or duplicated. "
        "Exits 1 if anything was.",
    )
    p.add_argument("log", help="a JSON log, as the handoff tests write")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "swap",
        help="swap vAPIC state between module versions and time it (in the VM)",
        description="Create tables with vAPIC state on one module version, leave a "
        "vector pending in PIR, move every table's vAPIC to the other version, check "
        "that IRR, ISR and PIR arrived intact, and print how long each step took.",
    )
    p.add_argument(
        "--from",
        dest="from_version",
        type=_vapic_version,
        default=1,
        metavar="v1|v2",
        help="module version the state starts on",
    )
    p.add_argument(
        "--to",
        dest="to_version",
        type=_vapic_version,
        default=2,
        metavar="v1|v2",
        help="module version it moves to",
    )
    p.add_argument("--tables", type=int_range(1), default=1, help="tables")
    p.add_argument(
        "--vcpus", type=int_range(1, lib.KVMLU_MAX_VCPUS), default=8, help="vCPUs per table"
    )
    p.add_argument("--unload", action="store_true", help="rmmod the old module afterwards")
    p.set_defaults(func=cmd_swap)

    p = sub.add_parser("demo", help="post vectors into an 8-vCPU table and show it")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bind",
        help="bind an edu device's MSI to a descriptor and raise interrupts",
        description="Create a table, bind the MSI eventfd of an edu device (through "
        "vfio-pci) to one vCPU and vector, raise N interrupts, and show the binding's "
        "counters and the descriptor. Inside the test VM.",
    )
    p.add_argument("--device", metavar="BDF", help="edu PCI function (default: the first)")
    p.add_argument("--vcpus", type=int_range(1, lib.KVMLU_MAX_VCPUS), default=8, help="table size")
    p.add_argument("--vcpu", type=int_range(0), default=0, help="vCPU to post to")
    p.add_argument(
        "--vector",
        type=int_range(lib.KVMLU_VECTOR_MIN, lib.KVMLU_VECTOR_MAX),
        default=0x51,
        help="vector (default: 0x51)",
    )
    p.add_argument(
        "--raise",
        dest="raise_count",
        type=int_range(0),
        default=3,
        metavar="N",
        help="MSIs to raise",
    )
    p.set_defaults(func=cmd_bind)

    _add_bench(sub)

    p = sub.add_parser(
        "vm",
        help="boot the test VM, load the modules, run COMMAND inside",
        description="Boot Debian's kernel under QEMU with virtme-ng, with an intel-iommu "
        "and edu devices bound to vfio-pci, load the freshly built modules, run COMMAND, "
        "and fail if it fails or if the kernel log shows a problem.",
    )
    vm.add_arguments(p)
    p.set_defaults(func=vm.main)

    p = sub.add_parser(
        "qemu",
        help="a guest under nested KVM counts the MSIs of a passed-through edu (test VM)",
        description="Boot a Debian kernel with edu_count.ko under QEMU -accel kvm inside "
        "the test VM, pass one edu function through with vfio-pci, raise N MSIs from "
        "the test VM through its BAR, and check that the guest counted exactly N, once "
        "per kernel-irqchip mode; also time MSIs the guest raises itself. On the build "
        "machine it boots the test VM first.",
    )
    qemu_cli.add_arguments(p)

    p = sub.add_parser(
        "qemu-upgrade",
        help="live-upgrade the nested guest's QEMU with cpr-transfer, kvmlu against stock",
        description=(qemu_upgrade.__doc__ or "").split("\n\n")[1].replace("\n", " "),
    )
    qemu_upgrade.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kvmlu``; the exit status is one of :data:`EPILOG`'s."""
    args = build_parser().parse_args(argv)
    prog = " ".join(["kvmlu", args.subcommand, *([args.bench] if "bench" in args else [])])
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"{prog}: {_one_line(e)} (see {prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # KvmluError and every OS failure
        print(f"{prog}: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or repr(e)


if __name__ == "__main__":
    sys.exit(main())
