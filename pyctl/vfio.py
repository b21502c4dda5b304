"""A small VFIO layer: container, group and device fds of a vfio-pci function.

Everything goes through the ioctls of the system's ``<linux/vfio.h>`` as
compiled into the cffi extension::

    with VfioPciDevice.open("0000:00:0a.0") as d:
        bar0 = d.map_region(lib.VFIO_PCI_BAR0_REGION_INDEX)
        d.enable_bus_master()
        d.set_irq_eventfds(lib.VFIO_PCI_MSI_IRQ_INDEX, [efd])
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyctl.closing import Closing
from pyctl.errors import KvmluError
from pyctl.uapi import ffi, ioctl, lib

PCI_DEVICES = Path("/sys/bus/pci/devices")
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4


class VfioError(KvmluError):
    """A VFIO object cannot be used as asked (not viable, no such region...)."""


@dataclass(frozen=True)
class Region:
    """One region of a VFIO device (a BAR, config space...)."""

    index: int
    flags: int
    size: int
    offset: int

    @property
    def mappable(self) -> bool:
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_MMAP)


def iommu_group(bdf: str) -> int:
    """The IOMMU group number of PCI function ``bdf``."""
    link = PCI_DEVICES / bdf / "iommu_group"
    try:
        return int(os.readlink(link).rsplit("/", 1)[1])
    except OSError as e:
        raise VfioError(e.errno or 0, f"{bdf} has no IOMMU group ({link})") from e


def driver_of(bdf: str) -> str | None:
    link = PCI_DEVICES / bdf / "driver"
    try:
        return os.readlink(link).rsplit("/", 1)[1]
    except OSError:
        return None


def _argsz(struct_name: str) -> Any:
    arg = ffi.new(f"struct {struct_name} *")
    arg.argsz = ffi.sizeof(f"struct {struct_name}")
    return arg


class VfioPciDevice(Closing):
    """A vfio-pci function with its own container and group fds.

    The three fds are O_CLOEXEC and closed together, device first.
    """

    def __init__(self, bdf: str, container: int | None, group: int | None, device: int) -> None:
        self.bdf = bdf
        self.container_fd: int | None = container
        self.group_fd: int | None = group
        self.device_fd: int | None = device
        self._maps: list[mmap.mmap] = []
        self._config_offset: int | None = None

    @classmethod
    def open(cls, bdf: str) -> VfioPciDevice:
        """Open ``bdf`` (bound to vfio-pci) through a new type1 container."""
        group_no = iommu_group(bdf)
        container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
        group = device = -1
        try:
            if ioctl(container, lib.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION") != (
                lib.VFIO_API_VERSION
            ):
                raise VfioError(0, "unknown VFIO API version")
            if not ioctl(container, lib.VFIO_CHECK_EXTENSION, lib.VFIO_TYPE1_IOMMU, "CHECK_EXT"):
                raise VfioError(0, "the type1 IOMMU is not supported")
            group = os.open(f"/dev/vfio/{group_no}", os.O_RDWR | os.O_CLOEXEC)
            status = _argsz("vfio_group_status")
            ioctl(group, lib.VFIO_GROUP_GET_STATUS, status, "VFIO_GROUP_GET_STATUS")
            if not status.flags & lib.VFIO_GROUP_FLAGS_VIABLE:
                raise VfioError(0, f"IOMMU group {group_no} of {bdf} is not viable")
            cfd = ffi.new("int *", container)
            ioctl(group, lib.VFIO_GROUP_SET_CONTAINER, cfd, "VFIO_GROUP_SET_CONTAINER")
            ioctl(container, lib.VFIO_SET_IOMMU, lib.VFIO_TYPE1_IOMMU, "VFIO_SET_IOMMU")
            name = ffi.new("char[]", bdf.encode())
            device = ioctl(group, lib.VFIO_GROUP_GET_DEVICE_FD, name, "VFIO_GROUP_GET_DEVICE_FD")
        except BaseException:
            for fd in (device, group, container):
                if fd >= 0:
                    os.close(fd)
            raise
        return cls(bdf, container, group, device)

    @classmethod
    def from_device_fd(cls, bdf: str, device_fd: int) -> VfioPciDevice:
        """Adopt a device fd received or retrieved from elsewhere.

        The container and group stay with whoever holds them (a session, or
        the process that opened them); this object closes only ``device_fd``.
        """
        return cls(bdf, None, None, device_fd)

    @property
    def fd(self) -> int:
        if self.device_fd is None:
            raise VfioError(0, f"{self.bdf} is closed")
        return self.device_fd

    def region(self, index: int) -> Region:
        info = _argsz("vfio_region_info")
        info.index = index
        ioctl(self.fd, lib.VFIO_DEVICE_GET_REGION_INFO, info, "VFIO_DEVICE_GET_REGION_INFO")
        return Region(index, int(info.flags), int(info.size), int(info.offset))

    def irq_count(self, index: int) -> int:
        info = _argsz("vfio_irq_info")
        info.index = index
        ioctl(self.fd, lib.VFIO_DEVICE_GET_IRQ_INFO, info, "VFIO_DEVICE_GET_IRQ_INFO")
        return int(info.count)

    def _config(self) -> int:
        """Where config space is in the device fd (asked once)."""
        if self._config_offset is None:
            self._config_offset = self.region(lib.VFIO_PCI_CONFIG_REGION_INDEX).offset
        return self._config_offset

    def read_config_bytes(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, self._config() + offset)

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.read_config_bytes(offset, size), "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        os.pwrite(self.fd, value.to_bytes(size, "little"), self._config() + offset)

    def enable_bus_master(self) -> None:
        """Set memory decoding and bus mastering: a device sends no MSI without them."""
        cmd = self.read_config(PCI_COMMAND, 2)
        self.write_config(PCI_COMMAND, 2, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def map_region(self, index: int) -> mmap.mmap:
        """Map a region read/write; it is unmapped when the device closes."""
        reg = self.region(index)
        if not reg.mappable:
            raise VfioError(0, f"region {index} of {self.bdf} cannot be mapped")
        m = mmap.mmap(
            self.fd,
            reg.size,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=reg.offset,
        )
        self._maps.append(m)
        return m

    def set_irq_eventfds(self, index: int, eventfds: list[int], start: int = 0) -> None:
        """Trigger ``eventfds`` for vectors ``start..`` of IRQ ``index`` (-1 unsets one)."""
        n = len(eventfds)
        size = ffi.sizeof("struct vfio_irq_set") + 4 * n
        buf = bytearray(size)
        hdr = ffi.from_buffer("struct vfio_irq_set *", buf)
        hdr.argsz = size
        hdr.flags = lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_TRIGGER
        hdr.index = index
        hdr.start = start
        hdr.count = n
        struct.pack_into(f"<{n}i", buf, ffi.sizeof("struct vfio_irq_set"), *eventfds)
        ffi.release(hdr)
        ioctl(self.fd, lib.VFIO_DEVICE_SET_IRQS, buf, "VFIO_DEVICE_SET_IRQS")

    def disable_irqs(self, index: int) -> None:
        """Tear down every trigger of IRQ ``index`` (MSI is disabled in the device)."""
        arg = _argsz("vfio_irq_set")
        arg.flags = lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_TRIGGER
        arg.index = index
        arg.count = 0
        ioctl(self.fd, lib.VFIO_DEVICE_SET_IRQS, arg, "VFIO_DEVICE_SET_IRQS")

    def close(self) -> None:
        for m in self._maps:
            m.close()
        self._maps.clear()
        for attr in ("device_fd", "group_fd", "container_fd"):
            fd = getattr(self, attr, None)
            if fd is not None:
                setattr(self, attr, None)
                os.close(fd)

    def __repr__(self) -> str:
        return f"<VfioPciDevice {self.bdf} fd={self.device_fd}>"
