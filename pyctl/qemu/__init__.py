"""A real guest under nested KVM that counts the MSIs of a passed-through edu function.

Inside the test VM (a nested-KVM host, see :mod:`pyctl.vm`), a QEMU with
``-accel kvm`` boots Debian's kernel with a small initramfs
(:mod:`pyctl.qemu.guest`): busybox, an init script and ``edu_count.ko``
(``guest/edu_count/``), a PCI driver that counts edu's MSIs per vector. One
edu function, bound to vfio-pci in the test VM, is passed through with
``-device vfio-pci``. :mod:`pyctl.qemu.run` starts that QEMU and talks to the
guest over its second serial port; :mod:`pyctl.qemu.bar` raises MSIs from the
test VM through the function's sysfs BAR, independently of the guest's vCPUs;
:mod:`pyctl.qemu.check` raises N and checks that the guest counted exactly N;
:mod:`pyctl.qemu.cli` is ``kvmlu qemu``.

Errors (under :class:`pyctl.errors.RunError`, so ``kvmlu`` reports them as
every other failure)::

    QemuError
     +-- GuestBootError      QEMU exited, or the guest never said READY
     +-- GuestCommandError   the guest answered ERR, or not in time
     +-- BarMapError         the BAR cannot be mapped through sysfs
"""

from __future__ import annotations

from pyctl.errors import RunError


class QemuError(RunError):
    """Root of the errors of the nested guest and its QEMU."""


class GuestBootError(QemuError):
    """QEMU exited, or the guest's control loop never announced itself."""


class GuestCommandError(QemuError):
    """The guest answered a command with ERR, or did not answer in time."""


class BarMapError(QemuError):
    """A BAR could not be mapped through sysfs (claimed region, no such BAR)."""
