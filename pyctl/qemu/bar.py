"""A PCI BAR mapped through sysfs: MSIs raised from the nested host.

While QEMU owns an edu function through vfio-pci, the test VM can still
write its registers through ``/sys/bus/pci/devices/<bdf>/resource0``: a
write of 1 to 0x60 makes the device send an MSI, which reaches the guest
through vfio-pci, the eventfd and KVM (or QEMU's userspace APIC), with none
of the guest's vCPUs involved.

vfio-pci claims the BAR's region (``/proc/iomem`` shows ``vfio-pci``) when
QEMU maps it. Debian's kernel has ``CONFIG_IO_STRICT_DEVMEM``: a claimed
region cannot be mapped through sysfs (``mmap`` fails with EINVAL; seen in
the test VM), and a mapping made before the claim is revoked. The test VM's
kernel is booted with ``iomem=relaxed`` (:data:`pyctl.vm.RELAXED_IOMEM`),
which lifts that; nothing else about the device changes.

On the TCG test VM, a store to the BAR from user space is sometimes carried
out twice by the device when the MSI it raises goes to another vCPU than
the one that stores: 121 of 200 raises through the VFIO mapping, 44 of 200
through sysfs, measured with the raiser on the other vCPU; 0 of 200 each
with the raiser on the MSI's vCPU, and 0 of 400 through ``pwrite()`` on the
VFIO device fd (a store by the kernel). That is the emulator's doing, not
the device's or the guest's, so :func:`msi_cpus` finds the vCPUs that take
the function's MSI (QEMU's ``vfio-msi`` interrupts in /proc/interrupts) and
:func:`pinned` keeps the raiser on them.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyctl.closing import Closing
from pyctl.qemu import BarMapError
from pyctl.uapi import ffi

PCI_DEVICES = Path("/sys/bus/pci/devices")
PROC_INTERRUPTS = Path("/proc/interrupts")
PROC_IRQ = Path("/proc/irq")
PAGE = mmap.PAGESIZE


def parse_cpu_list(text: str) -> set[int]:
    """``0-2,5`` -> {0, 1, 2, 5}."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def msi_cpus(bdf: str, interrupts: Path = PROC_INTERRUPTS, proc_irq: Path = PROC_IRQ) -> set[int]:
    """The CPUs that take the MSIs vfio-pci receives for *bdf* (empty if none yet)."""
    cpus: set[int] = set()
    for line in interrupts.read_text().splitlines():
        irq, _, rest = line.partition(":")
        if "vfio-msi" not in rest or bdf not in rest or not irq.strip().isdigit():
            continue
        path = proc_irq / irq.strip() / "effective_affinity_list"
        with contextlib.suppress(OSError, ValueError):
            cpus |= parse_cpu_list(path.read_text())
    return cpus


def msi_irq_count(bdf: str, interrupts: Path = PROC_INTERRUPTS) -> int:
    """How many of *bdf*'s MSIs this kernel's vfio-pci has taken, over all CPUs."""
    total = 0
    ncpus = 0
    for i, line in enumerate(interrupts.read_text().splitlines()):
        if i == 0:
            ncpus = len(line.split())
            continue
        irq, _, rest = line.partition(":")
        if "vfio-msi" in rest and bdf in rest and irq.strip().isdigit():
            total += sum(int(c) for c in rest.split()[:ncpus])
    return total


@contextlib.contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """Run the calling thread on *cpus* (no change if empty), then restore."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class SysfsBar(Closing):
    """The first *size* bytes of BAR *index* of *bdf*, mapped read/write."""

    def __init__(self, bdf: str, index: int = 0, size: int = PAGE) -> None:
        self.bdf = bdf
        self.path = PCI_DEVICES / bdf / f"resource{index}"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise BarMapError(f"{self.path}: {e.strerror}") from e
        try:
            self._map: mmap.mmap | None = mmap.mmap(
                fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as e:
            hint = ""
            if e.errno == errno.EINVAL:
                hint = (
                    ": the region is claimed (vfio-pci) and the kernel has strict iomem; "
                    "boot the test VM with iomem=relaxed"
                )
            raise BarMapError(f"mmap {self.path}: {e.strerror}{hint}") from e
        finally:
            os.close(fd)
        # A uint32_t view: each access is one 32-bit load or store, the only
        # width edu accepts below 0x80.
        self._regs: Any = ffi.from_buffer("uint32_t[]", self._map)

    def _words(self) -> Any:
        if self._regs is None:
            raise BarMapError(f"{self.path} is closed")
        return self._regs

    def read32(self, offset: int) -> int:
        """One 32-bit load at *offset* (a multiple of 4)."""
        return int(self._words()[offset // 4])

    def write32(self, offset: int, value: int) -> None:
        """One 32-bit store at *offset* (a multiple of 4)."""
        self._words()[offset // 4] = value

    def close(self) -> None:
        if getattr(self, "_regs", None) is not None:
            ffi.release(self._regs)
            self._regs = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def __repr__(self) -> str:
        return f"<SysfsBar {self.path}>"
