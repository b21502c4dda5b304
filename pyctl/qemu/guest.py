"""The inner guest's initramfs: busybox, an init script, ``edu_count.ko``.

:func:`build_initramfs` writes an uncompressed ``newc`` cpio archive (the
format the kernel unpacks, see ``Documentation/driver-api/early-userspace/
buffer-format.rst``) holding:

* ``/bin/busybox`` (Debian's ``busybox-static``) and links for the applets
  the scripts use;
* ``/edu_count.ko``, built from ``guest/edu_count/`` for the kernel the guest
  boots (``make guest-module``);
* ``/init``: mounts proc, sysfs and devtmpfs, loads the driver, and becomes
  the control loop ``/ctl.sh``;
* ``/dev/console``, so that init has a console before devtmpfs is mounted.

The control loop serves the guest's second serial port, ``ttyS1``, in raw
mode (the kernel console is ``ttyS0``). It first prints
``READY uptime=<s> dev=<bdf>``; then, for each request line
``<id> <command> [<arg>]``, it prints zero or more ``<id> <text>`` lines and
ends with ``<id> OK`` or ``<id> ERR <command> <arg>``:

===========  ============================================================
``ping``     ``pong``
``irqs``     edu_count's ``irqs``: one ``vector=I count=N nostatus=Z
             cpu=C first_ns=F last_ns=L`` line per vector
``raise N``  N guest-initiated MSIs, each waited for; then the raise to
             handler times in ns (edu_count's ``latency_ns``)
``msi``      edu_count's ``msi``: ``enabled=E address=0xA data=0xD dest=I
             vector=V``, the message the function is programmed with
``move C``   point every IRQ of the function at CPU C (``smp_affinity_list``)
``enable B`` edu_count's ``msi_on``: 0 turns MSI off, 1 on again
``mask B``   edu_count's ``irq_mask``: 1 disables the IRQs, 0 enables them
``spin N``   start N busy loops in the background (a guest under CPU load)
``dmesg``    the kernel log
``uptime``   ``/proc/uptime``
``poweroff`` ``OK``, then the guest powers off
===========  ============================================================

Lines without a known id (a shell's error, the guest's READY) are for
humans; :class:`pyctl.qemu.run.InnerGuest` skips them.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyctl import vm

CHECKOUT = Path(__file__).resolve().parents[2]
EDU_COUNT_KO = CHECKOUT / "guest" / "edu_count" / "edu_count.ko"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "dmesg", "echo", "head", "insmod", "ls", "mount", "poweroff", "stty")

INIT = """\
#!/bin/sh
# kvmlu's inner guest (pyctl/qemu/guest.py): mount, load edu_count, serve ttyS1.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
read -r up _ </proc/uptime
echo "kvmlu-inner: init at $up s"
insmod /edu_count.ko || echo "kvmlu-inner: insmod /edu_count.ko failed"
exec sh /ctl.sh
"""

CTL = """\
# The control loop on ttyS1; the protocol is in pyctl/qemu/guest.py.
exec </dev/ttyS1 >/dev/ttyS1 2>/dev/console
stty raw -echo
dev=$(ls -d /sys/bus/pci/drivers/edu_count/0000:* 2>/dev/null | head -n 1)
read -r up _ </proc/uptime
echo "READY uptime=$up dev=${dev##*/}"

# Copy stdin to stdout, each line prefixed with the request id $1.
tag() {
	while IFS= read -r line; do echo "$1 $line"; done
}

while read -r id cmd arg; do
	case "$cmd" in
	ping) echo "$id pong" ;;
	irqs) tag "$id" <"$dev/irqs" ;;
	raise) echo "$arg" >"$dev/raise" && tag "$id" <"$dev/latency_ns" ;;
	msi) tag "$id" <"$dev/msi" ;;
	move)
		for irq in "$dev"/msi_irqs/*; do
			echo "$arg" >"/proc/irq/${irq##*/}/smp_affinity_list" || break
		done ;;
	enable) echo "$arg" >"$dev/msi_on" ;;
	mask) echo "$arg" >"$dev/irq_mask" ;;
	spin)
		i=0
		while [ "$i" -lt "$arg" ]; do
			sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 &
			i=$((i + 1))
		done ;;
	dmesg) dmesg | tag "$id" ;;
	uptime) tag "$id" </proc/uptime ;;
	poweroff) echo "$id OK"; poweroff -f ;;
	*) false ;;
	esac && echo "$id OK" || echo "$id ERR $cmd $arg"
done
poweroff -f
"""

# The console device, as the kernel's own default initramfs has it.
CONSOLE_MAJOR, CONSOLE_MINOR = 5, 1


@dataclass(frozen=True)
class Entry:
    """One file of a cpio archive."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _newc_member(ino: int, entry: Entry) -> bytes:
    """One ``newc`` header, name and data, each padded to 4 bytes."""
    name = entry.name.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,
        0,  # mtime: archives built twice are equal
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,  # check
    )
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + name
    out += b"\0" * (-len(out) % 4)
    out += entry.data
    out += b"\0" * (-len(out) % 4)
    return out


def newc_archive(entries: Iterable[Entry]) -> bytes:
    """An uncompressed ``newc`` cpio archive of *entries*, with its trailer."""
    members = [_newc_member(ino, e) for ino, e in enumerate(entries, start=1)]
    members.append(_newc_member(0, Entry("TRAILER!!!", 0)))
    return b"".join(members)


def module_release(module: Path) -> str:
    """The kernel release a module was built for (first word of its vermagic)."""
    try:
        magic = vm.module_vermagic(module)
    except OSError as e:
        raise FileNotFoundError(f"{module}: {e.strerror} (make guest-module builds it)") from e
    if not magic:
        raise ValueError(f"{module} has no vermagic: not a kernel module")
    return magic.split()[0]


def initramfs_entries(module: Path, busybox: Path = BUSYBOX) -> list[Entry]:
    """What the initramfs holds (see the module docstring)."""
    dirs = ["bin", "dev", "proc", "sys", "tmp"]
    entries = [Entry(d, stat.S_IFDIR | 0o755) for d in dirs]
    entries.append(Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(CONSOLE_MAJOR, CONSOLE_MINOR)))
    entries.append(Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    entries += [Entry(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox") for a in APPLETS]
    entries.append(Entry("init", stat.S_IFREG | 0o755, INIT.encode()))
    entries.append(Entry("ctl.sh", stat.S_IFREG | 0o644, CTL.encode()))
    entries.append(Entry("edu_count.ko", stat.S_IFREG | 0o644, module.read_bytes()))
    return entries


def build_initramfs(out: Path, module: Path = EDU_COUNT_KO, busybox: Path = BUSYBOX) -> Path:
    """Write the inner guest's initramfs to *out* (its folder is created); return *out*."""
    if not module.is_file():
        raise FileNotFoundError(f"{module} is missing: make guest-module builds it")
    if not busybox.is_file():
        raise FileNotFoundError(f"{busybox} is missing: apt-get install busybox-static")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(newc_archive(initramfs_entries(module, busybox)))
    tmp.replace(out)
    return out
