"""The ``kvmlu`` command line: one parser, a subcommand per job."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from pyctl import bench_irq, bench_upgrade, check, demo, livevmm, upgrade, vm
from pyctl import swap as swap_mod
from pyctl.edu import Edu, find_vfio_edu
from pyctl.errors import KvmluError
from pyctl.kvmlu import DEVICE_PATH, Device
from pyctl.qemu import bench as qbench
from pyctl.qemu import cli as qemu_cli
from pyctl.qemu import upgrade_cli as qemu_upgrade
from pyctl.status import print_status, status_dict
from pyctl.vapic import VapicDevice


def cmd_status(args: argparse.Namespace) -> int:
    try:
        dev = Device()
    except FileNotFoundError:
        print(f"kvmlu.ko is not loaded ({DEVICE_PATH} is missing)", file=sys.stderr)
        return 1
    with dev:
        if args.json:
            print(json.dumps(status_dict(dev), indent=2))
        else:
            print_status(dev)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    with Device() as dev:
        return demo.run(dev)


def cmd_sessions(args: argparse.Namespace) -> int:
    with Device() as dev:
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
            raise SystemExit(f"kvmlu: {requested} is not an edu device on vfio-pci ({bdfs})")
        return requested
    if not bdfs:
        raise SystemExit("kvmlu: no edu device bound to vfio-pci (run inside `kvmlu vm`)")
    return bdfs[0]


def cmd_bind(args: argparse.Namespace) -> int:
    """Bind an edu device's MSI to a new table, raise, and show what arrived."""
    bdf = _edu_bdf(args.device)
    notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    with Device() as dev, Edu(bdf) as edu, dev.create_table(args.vcpus) as table:
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
    bench_irq.main(_edu_bdf(args.device), args.samples, args.seconds, out)
    return 0


def cmd_swap(args: argparse.Namespace) -> int:
    """Build a VM's worth of tables with vAPIC state on --from, swap it to --to."""
    with (
        Device() as dev,
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


def _vector(text: str) -> int:
    return int(text, 0)


def _add_bench(sub: Any) -> None:
    """``kvmlu bench`` and its benchmarks."""
    p = sub.add_parser("bench", help="benchmarks (inside the test VM)")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bsub.add_parser(
        "irq",
        help="edu MSIs through a kvmlu binding versus a userspace interrupt thread",
    )
    b.add_argument("--device", metavar="BDF", help="edu PCI function (default: the first)")
    b.add_argument("--samples", type=int, default=2000, help="latency samples per path")
    b.add_argument("--seconds", type=float, default=4.0, help="throughput time per path")
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
        "report",
        help="the upgrade benchmark's JSON as a Markdown table and a PNG plot (host)",
    )
    bench_upgrade.add_report_arguments(b)
    b.set_defaults(func=bench_upgrade.report)

    p = sub.add_parser(
        "vmm",
        help="the test VMM of a live upgrade, driven over a control socket",
        description="Own a descriptor table for V vCPUs, a vAPIC, VFIO devices with "
        "their MSI bindings, and V vCPU threads that sync, ack and EOI; answer the "
        "upgrade's commands on the control socket (see pyctl.livevmm).",
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
    parser = argparse.ArgumentParser(
        prog="kvmlu",
        description="Control kvmlu: posted-interrupt descriptors that survive a VMM upgrade.",
    )
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    p = sub.add_parser("status", help="what kvmlu.ko reports")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sessions", help="the sessions that exist")
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
    p.add_argument("--from", dest="from_version", type=_vapic_version, default=1, metavar="v1|v2")
    p.add_argument("--to", dest="to_version", type=_vapic_version, default=2, metavar="v1|v2")
    p.add_argument("--tables", type=int, default=1, help="tables (default: 1)")
    p.add_argument("--vcpus", type=int, default=8, help="vCPUs per table (default: 8)")
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
    p.add_argument("--vcpus", type=int, default=8, help="table size (default: 8)")
    p.add_argument("--vcpu", type=int, default=0, help="vCPU to post to (default: 0)")
    p.add_argument("--vector", type=_vector, default=0x51, help="vector (default: 0x51)")
    p.add_argument(
        "--raise", dest="raise_count", type=int, default=3, metavar="N", help="MSIs to raise"
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
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KvmluError as e:
        print(f"kvmlu: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
