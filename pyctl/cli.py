"""The ``kvmlu`` command line: one parser, a subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pyctl import demo, vm
from pyctl.errors import KvmluError
from pyctl.kvmlu import DEVICE_PATH, Device
from pyctl.status import print_status, status_dict


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmlu",
        description="Control kvmlu: posted-interrupt descriptors that survive a VMM upgrade.",
    )
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    p = sub.add_parser("status", help="what kvmlu.ko reports")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="post vectors into an 8-vCPU table and show it")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "vm",
        help="boot the test VM, load the modules, run COMMAND inside",
        description="Boot Debian's kernel under QEMU with virtme-ng, with an intel-iommu "
        "and edu devices bound to vfio-pci, load the freshly built modules, run COMMAND, "
        "and fail if it fails or if the kernel log shows a problem.",
    )
    vm.add_arguments(p)
    p.set_defaults(func=vm.main)
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
