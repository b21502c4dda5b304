"""The demo run by ``make demo`` inside the test VM.

It builds an 8-vCPU descriptor table, gives each vCPU a notification eventfd,
posts a pattern of vectors (with one vCPU suppressed and some vectors posted
twice), binds the MSI of an edu device (through vfio-pci) to vCPU 6 and
raises it, prints every descriptor as read through the read-only mapping,
then takes one vCPU's vectors with a fetch.
"""

from __future__ import annotations

import os
import time

from pyctl.edu import Edu, find_vfio_edu
from pyctl.kvmlu import Device, PostResult, Table
from pyctl.metrics import drain_eventfd
from pyctl.status import print_status

NR_VCPUS = 8
NOTIFY_VECTOR = 0xF2
MSI_VCPU, MSI_VECTOR = 6, 0x66


def print_table(table: Table, signals: list[int]) -> None:
    """One line per descriptor, read through the mmap view."""
    print(f"{'vCPU':>4}  {'ON':>2} {'SN':>2} {'NV':>4} {'NDST':>10}  {'signals':>7}  PIR")
    for v in range(table.nr_vcpus):
        d = table.view(v)
        vecs = " ".join(f"0x{x:02x}" for x in sorted(d.pir)) or "-"
        print(
            f"{v:>4}  {int(d.on):>2} {int(d.sn):>2} 0x{d.nv:02x} 0x{d.ndst:08x}  "
            f"{signals[v]:>7}  {vecs}"
        )


def raise_msi(table: Table) -> bool:
    """Bind the first edu device's MSI to (MSI_VCPU, MSI_VECTOR) and raise it once."""
    bdfs = find_vfio_edu()
    if not bdfs:
        print("no edu device on vfio-pci: skipping the MSI")
        return False
    with Edu(bdfs[0]) as edu:
        msi = edu.enable_msi()
        try:
            with table.bind(msi, MSI_VCPU, MSI_VECTOR) as b:
                edu.raise_irq()
                deadline = time.monotonic() + 10
                while not b.info().stats.signals and time.monotonic() < deadline:
                    time.sleep(0.001)
                print(f"edu {bdfs[0]}: one MSI raised -> binding {b.info().stats}")
                return b.info().stats.signals == 1
        finally:
            edu.disable_msi()
            os.close(msi)


def run(dev: Device) -> int:
    """Run the demo on ``dev``; returns 0 if every descriptor matched what was posted."""
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(NR_VCPUS)]
    try:
        with dev.create_table(NR_VCPUS) as table:
            for v, fd in enumerate(efds):
                table.set_notify(v, fd, nv=NOTIFY_VECTOR, ndst=v)
            table.set_sn(7, True)
            expected: list[set[int]] = [set() for _ in range(NR_VCPUS)]
            counts = {flag: 0 for flag in PostResult}
            for v in range(NR_VCPUS):
                for vec in (0x20 + v, 0x41 + 3 * v, 0xEC, 0x20 + v):
                    r = table.post(v, vec)
                    expected[v].add(vec)
                    for flag in PostResult:
                        counts[flag] += bool(r & flag)
            msi = raise_msi(table)
            if msi:
                expected[MSI_VCPU].add(MSI_VECTOR)
            signals = [drain_eventfd(fd) for fd in efds]
            print(f"8-vCPU table, fd {table.fd}, mapped read-only ({table.map_size} bytes)")
            print("posts:", ", ".join(f"{str(f.name).lower()} {n}" for f, n in counts.items()))
            print_table(table, signals)
            ok = all(table.pir(v) == expected[v] for v in range(NR_VCPUS))
            ok &= signals == [1] * 7 + [0]
            taken = table.fetch(0)
            print(
                f"fetch vCPU 0 -> {{{', '.join(f'0x{x:02x}' for x in sorted(taken))}}};"
                f" now {table.view(0)}"
            )
            ok &= taken == expected[0] and not table.pir(0) and not table.on(0)
            print("descriptors match the posts:", "yes" if ok else "NO")
            print()
            print_status(dev)
            return 0 if ok else 1
    finally:
        for fd in efds:
            os.close(fd)
