"""A driver for QEMU's ``edu`` PCI device, used as a real interrupt source.

Through vfio-pci: BAR0 is mapped, bus mastering enabled, and MSI routed to an
eventfd with VFIO_DEVICE_SET_IRQS. Each write to the raise register makes the
device send an MSI, which the host kernel delivers through interrupt
remapping to VFIO's handler, which signals the eventfd.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import pyudev

from pyctl.closing import Closing
from pyctl.uapi import ffi, lib
from pyctl.vfio import VfioPciDevice, driver_of

EDU_VENDOR = 0x1234
EDU_DEVICE = 0x11E8

REG_ID = 0x00
REG_LIVENESS = 0x04
REG_IRQ_STATUS = 0x24
REG_IRQ_RAISE = 0x60
REG_IRQ_ACK = 0x64

#: The low 16 bits of the identification register.
EDU_ID_LOW = 0x00ED


def find_edu() -> list[str]:
    """PCI addresses of every edu function, sorted, found with pyudev."""
    ctx = pyudev.Context()
    found = []
    for dev in ctx.list_devices(subsystem="pci"):
        attrs = dev.attributes
        try:
            vendor = int(attrs.asstring("vendor"), 16)
            device = int(attrs.asstring("device"), 16)
        except (KeyError, ValueError):
            continue
        if (vendor, device) == (EDU_VENDOR, EDU_DEVICE):
            found.append(str(dev.sys_name))
    return sorted(found)


def find_vfio_edu() -> list[str]:
    """The edu functions bound to vfio-pci."""
    return [bdf for bdf in find_edu() if driver_of(bdf) == "vfio-pci"]


class Edu(Closing):
    """One edu function opened through VFIO, its MSI wired to an eventfd."""

    def __init__(self, bdf: str, vfio: VfioPciDevice | None = None) -> None:
        """Open ``bdf`` through VFIO, or use ``vfio`` (an adopted device fd)."""
        self.bdf = bdf
        self.vfio = VfioPciDevice.open(bdf) if vfio is None else vfio
        try:
            self._bar_offset = self.vfio.region(lib.VFIO_PCI_BAR0_REGION_INDEX).offset
            self._bar = self.vfio.map_region(lib.VFIO_PCI_BAR0_REGION_INDEX)
            self._regs: Any = ffi.from_buffer("uint32_t[]", self._bar)
            self.vfio.enable_bus_master()
            self.msi_eventfd: int | None = None
        except BaseException:
            self.vfio.close()
            raise

    def read(self, reg: int) -> int:
        return int(self._regs[reg // 4])

    def write(self, reg: int, value: int) -> None:
        """One 32-bit MMIO store (edu ignores narrower accesses)."""
        self._regs[reg // 4] = value

    @property
    def ident(self) -> int:
        return self.read(REG_ID)

    def enable_msi(self, eventfd: int | None = None) -> int:
        """Route the device's MSI to ``eventfd`` (a new one if None) and return it."""
        if eventfd is None:
            eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.vfio.set_irq_eventfds(lib.VFIO_PCI_MSI_IRQ_INDEX, [eventfd])
        self.msi_eventfd = eventfd
        return eventfd

    def disable_msi(self) -> None:
        self.vfio.disable_irqs(lib.VFIO_PCI_MSI_IRQ_INDEX)

    def write_syscall(self, reg: int, value: int) -> None:
        """The same store through pwrite() on the VFIO device fd; the GIL is released."""
        os.pwrite(self.vfio.fd, struct.pack("<I", value), self._bar_offset + reg)

    def raise_irq(self, bits: int = 1, *, syscall: bool = False) -> None:
        """Make the device send one MSI, then acknowledge its status bits.

        With ``syscall`` the stores go through pwrite() rather than the mapped
        BAR, so other Python threads run while the store traps.
        """
        write = self.write_syscall if syscall else self.write
        write(REG_IRQ_RAISE, bits)
        write(REG_IRQ_ACK, bits)

    def close(self) -> None:
        """Unmap BAR0 and close the VFIO fds; the MSI eventfd is the caller's."""
        regs = getattr(self, "_regs", None)
        if regs is not None:
            ffi.release(regs)
            self._regs = None
        self.vfio.close()

    def __repr__(self) -> str:
        return f"<Edu {self.bdf}>"
