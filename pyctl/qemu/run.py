"""Start the inner guest's QEMU under KVM and talk to the guest.

``qemu_argv()`` builds the command line: ``-accel kvm -cpu host``, a q35
machine with the chosen ``kernel-irqchip`` (``on``: MSIs go from vfio-pci's
eventfd to KVM's irqfd; ``off``: QEMU reads the eventfd and its userspace
APIC injects), Debian's kernel with the initramfs of :mod:`pyctl.qemu.guest`,
one edu function as ``-device vfio-pci,host=<bdf>``, the kernel console on
the first serial port (a file) and the guest's control loop on the second (a
UNIX socket QEMU listens on), ``-nographic -nodefaults -no-reboot``.

:class:`InnerGuest` runs that QEMU, connects to the socket, waits for the
guest's ``READY`` line and then sends commands: ``<id> <command> [<arg>]``,
answered by ``<id> <text>`` lines and a final ``<id> OK`` (or ``ERR``).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import re
import select
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Concatenate, Literal, ParamSpec, TypeVar

from pyctl.closing import Closing
from pyctl.qemu import GuestBootError, GuestCommandError, QemuError

#: ``make qemu`` builds QEMU 10.2.2 here; it has no firmware blobs of its own.
#: ``make qemu`` copies its build here, into the checkout, which the test VM sees.
BUILT_QEMU = Path(__file__).resolve().parents[2] / "build" / "qemu" / "qemu-system-x86_64"
BUILT_QEMU_FIRMWARE = (Path("/usr/share/seabios"), Path("/usr/share/qemu"))
#: Debian's QEMU (7.2 on Debian 12), the fallback.
SYSTEM_QEMU = Path("/usr/bin/qemu-system-x86_64")

Irqchip = Literal["on", "off", "split"]
IRQCHIPS: tuple[Irqchip, ...] = ("on", "off", "split")
#: The interrupt paths a guest boot can take: a kernel-irqchip mode, or
#: ``kvmlu``: kernel-irqchip=off with the MSIs posted by kvmlu (a QEMU from
#: ``make qemu``, whose patches add the kvmlu object and bring back the
#: userspace local APIC under KVM as ``-accel kvm,x-userspace-lapic=on``).
Mode = Literal["on", "off", "split", "kvmlu"]
MODES: tuple[Mode, ...] = ("on", "off", "split", "kvmlu")
#: How the inner guest's CPU runs (see :attr:`InnerOptions.accel`).
Accel = Literal["kvm", "tcg"]

DEFAULT_MEMORY_MB = 256
DEFAULT_BOOT_TIMEOUT = 600.0
DEFAULT_COMMAND_TIMEOUT = 60.0

GUEST_PARAMS = (
    "console=ttyS0",
    # WARNING and worse reach the console file; the rest is read with dmesg.
    "loglevel=5",
    "panic=-1",
    # Under KVM on TCG's max CPU, CPUID leaf 0xd gives an XSAVE size that
    # does not match the features the guest enables, and 6.1 WARNs at boot
    # ("XSAVE consistency problem"). MSIs do not care how FPU state is saved.
    "noxsave",
)

#: QEMU 8.0 removed the userspace local APIC under KVM: kernel-irqchip=off is
#: then refused ("KVM does not support userspace APIC").
USERSPACE_APIC_REMOVED = (8, 0)


#: The kvmlu object's id on the inner QEMU's command line.
KVMLU_ID = "pi0"


def default_qemu() -> Path:
    """The QEMU that ``make qemu`` built if it is there, else Debian's."""
    return BUILT_QEMU if BUILT_QEMU.is_file() else SYSTEM_QEMU


def default_firmware(qemu: Path) -> list[Path]:
    """``-L`` folders: Debian's firmware for a QEMU built without blobs."""
    if qemu.resolve().parent == SYSTEM_QEMU.parent:
        return []
    return [d for d in BUILT_QEMU_FIRMWARE if d.is_dir()]


@dataclass
class InnerOptions:
    """How the inner guest's QEMU is started."""

    bdf: str
    kernel: Path
    initrd: Path
    workdir: Path
    irqchip: Irqchip = "on"
    #: ``kvm`` (nested: the test VM is the KVM host) or ``tcg`` (QEMU
    #: emulates the guest's CPU; its APIC is QEMU's own, irqchip is moot).
    accel: Accel = "kvm"
    qemu: Path = field(default_factory=default_qemu)
    #: None: ``host``, plus ``kvm=off`` with kernel-irqchip=off (see cpu_model()).
    cpu: str | None = None
    firmware: list[Path] | None = None
    memory_mb: int = DEFAULT_MEMORY_MB
    cpus: int = 1
    append: list[str] = field(default_factory=list)
    #: Extra ``-device vfio-pci`` properties, e.g. ``x-no-kvm-msi=on``.
    vfio_props: list[str] = field(default_factory=list)
    #: Post the function's MSIs through a kvmlu object (with irqchip off).
    kvmlu: bool = False
    #: The kvmlu object's ``path`` (its device node), None for the default.
    kvmlu_path: str | None = None
    #: ``-accel kvm,x-userspace-lapic=on``: a patched QEMU newer than 8.0
    #: with irqchip off (see :func:`mode_settings`).
    userspace_lapic: bool = False
    #: Ready for cpr-transfer: guest RAM in a memfd (``memory-backend-memfd``
    #: with ``aux-ram-share=on``) and a QMP monitor at :attr:`qmp_path`.
    cpr: bool = False
    #: ``-incoming`` arguments: this QEMU takes over from another.
    incoming: list[str] = field(default_factory=list)
    #: ``-S``: do not start the vCPUs on its own (after an incoming
    #: migration: the driver sends ``cont``).
    paused: bool = False
    #: Extra ``-object kvmlu`` properties, e.g. ``x-eager=off``.
    kvmlu_props: list[str] = field(default_factory=list)

    @property
    def mode(self) -> str:
        """The path's name: the irqchip mode, or ``kvmlu``."""
        return "kvmlu" if self.kvmlu else self.irqchip

    @property
    def socket_path(self) -> Path:
        """The UNIX socket of the guest's control serial port."""
        return self.workdir / "ctl.sock"

    @property
    def qmp_path(self) -> Path:
        """The QMP monitor's UNIX socket (with :attr:`cpr`)."""
        return self.workdir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        """The guest's kernel console (first serial port)."""
        return self.workdir / "console.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own stdout and stderr."""
        return self.workdir / "qemu.log"


def kernel_cmdline(opts: InnerOptions) -> str:
    """The inner guest's kernel command line."""
    return " ".join([*GUEST_PARAMS, *opts.append])


def cpu_model(opts: InnerOptions) -> str:
    """The inner guest's ``-cpu``.

    ``host``; with kernel-irqchip=off also ``kvm=off``: QEMU 7.2 with a
    userspace APIC aborts at the first vCPU reset on this nested host
    ("failed to set MSR 0x4b564d06", MSR_KVM_POLL_CONTROL, even with
    ``kvm-poll-control=off``); without the KVM paravirtual interface it boots.
    """
    if opts.cpu is not None:
        return opts.cpu
    if opts.accel == "tcg":
        return "max"
    return "host,kvm=off" if opts.irqchip == "off" else "host"


def qemu_version(qemu: Path) -> tuple[int, int, int]:
    """``qemu --version`` as (major, minor, micro)."""
    try:
        out = subprocess.run(
            [str(qemu), "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise QemuError(f"{qemu} --version: {e}") from e
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if m is None:
        raise QemuError(f"{qemu} --version printed no version: {out.strip()!r}")
    return int(m[1]), int(m[2]), int(m[3])


def irqchip_problem(
    irqchip: Irqchip, version: tuple[int, ...], userspace_lapic: bool = False
) -> str | None:
    """Why a QEMU of *version* cannot run *irqchip* under KVM, or None; with
    *userspace_lapic* (``x-userspace-lapic``, a ``make qemu`` build) it can."""
    if irqchip == "off" and version[:2] >= USERSPACE_APIC_REMOVED and not userspace_lapic:
        return (
            f"QEMU {'.'.join(map(str, version))} has no userspace local APIC under KVM "
            "(removed in 8.0): kernel-irqchip=off needs an older QEMU such as Debian 12's 7.2"
        )
    return None


def qemu_has_kvmlu(qemu: Path) -> bool:
    """Whether *qemu* has the kvmlu object (and so x-userspace-lapic): a ``make qemu`` build."""
    try:
        out = subprocess.run(
            [str(qemu), "-object", "kvmlu,help"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "kvmlu options" in out


def mode_settings(mode: Mode, qemu: Path) -> tuple[Irqchip, bool, bool, str | None]:
    """(irqchip, kvmlu, userspace_lapic, why this QEMU cannot do *mode* or None)."""
    irqchip: Irqchip = "off" if mode == "kvmlu" else mode
    kvmlu_build = qemu_has_kvmlu(qemu)
    if mode == "kvmlu" and not kvmlu_build:
        return irqchip, True, False, f"{qemu} has no kvmlu object: build it with make qemu"
    version = qemu_version(qemu)
    userspace_lapic = irqchip == "off" and kvmlu_build and version[:2] >= USERSPACE_APIC_REMOVED
    problem = irqchip_problem(irqchip, version, userspace_lapic)
    return irqchip, mode == "kvmlu", userspace_lapic, problem


def qemu_argv(opts: InnerOptions) -> list[str]:
    """The inner QEMU's argv (see the module docstring)."""
    firmware = default_firmware(opts.qemu) if opts.firmware is None else opts.firmware
    argv = [str(opts.qemu)]
    for d in firmware:
        argv += ["-L", str(d)]
    if opts.accel == "tcg":
        accel = "tcg"
    else:
        accel = "kvm,x-userspace-lapic=on" if opts.userspace_lapic else "kvm"
    argv += ["-accel", accel, "-cpu", cpu_model(opts)]
    machine = f"q35,kernel-irqchip={opts.irqchip}"
    if opts.cpr:
        machine += ",memory-backend=ram0,aux-ram-share=on"
        argv += ["-object", f"memory-backend-memfd,id=ram0,size={opts.memory_mb}M"]
    argv += ["-machine", machine]
    argv += ["-m", f"{opts.memory_mb}M", "-smp", str(opts.cpus)]
    argv += ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]
    argv += ["-kernel", str(opts.kernel), "-initrd", str(opts.initrd)]
    argv += ["-append", kernel_cmdline(opts)]
    argv += ["-serial", f"file:{opts.console_log}"]
    argv += ["-chardev", f"socket,id=ctl,path={opts.socket_path},server=on,wait=off"]
    argv += ["-serial", "chardev:ctl"]
    if opts.cpr:
        argv += ["-qmp", f"unix:{opts.qmp_path},server=on,wait=off"]
    for inc in opts.incoming:
        argv += ["-incoming", inc]
    if opts.paused:
        argv.append("-S")
    vfio = [f"vfio-pci,host={opts.bdf}", *opts.vfio_props]
    if opts.kvmlu:
        props = [f"id={KVMLU_ID}", *opts.kvmlu_props]
        if opts.kvmlu_path is not None:
            props.append(f"path={opts.kvmlu_path}")
        argv += ["-object", "kvmlu," + ",".join(props)]
        vfio.append(f"kvmlu={KVMLU_ID}")
    argv += ["-device", ",".join(vfio)]
    return argv


class Runstate(enum.Enum):
    """Where an :class:`InnerGuest` is."""

    #: Created; QEMU not started.
    IDLE = "idle"
    #: QEMU runs; the guest has not announced its control loop yet.
    BOOTING = "booting"
    #: The guest's control loop answers commands.
    READY = "ready"
    #: QEMU has exited or was stopped.
    STOPPED = "stopped"


class StateError(QemuError):
    """A method was called in a run state that does not allow it."""


P = ParamSpec("P")
R = TypeVar("R")


def require(
    *states: Runstate,
) -> Callable[[Callable[Concatenate[InnerGuest, P], R]], Callable[Concatenate[InnerGuest, P], R]]:
    """Refuse calls of the decorated method unless the guest is in one of *states*."""

    def decorator(
        fn: Callable[Concatenate[InnerGuest, P], R],
    ) -> Callable[Concatenate[InnerGuest, P], R]:
        @functools.wraps(fn)
        def wrapper(self: InnerGuest, /, *args: P.args, **kwargs: P.kwargs) -> R:
            if self.state not in states:
                allowed = " or ".join(s.name for s in states)
                raise StateError(f"{fn.__name__}() needs {allowed}; the guest is {self.state.name}")
            return fn(self, *args, **kwargs)

        return wrapper

    return decorator


@dataclass(frozen=True)
class VectorCount:
    """One line of edu_count's ``irqs``."""

    vector: int
    count: int
    nostatus: int
    #: The guest CPU of the last handler run, -1 before the first.
    cpu: int
    first_ns: int
    last_ns: int

    @classmethod
    def parse(cls, line: str) -> VectorCount:
        """Parse ``vector=I count=N nostatus=Z cpu=C first_ns=F last_ns=L``."""
        try:
            kv = dict(item.split("=", 1) for item in line.split())
            return cls(**{k: int(kv[k]) for k in cls.__dataclass_fields__})
        except (KeyError, ValueError, TypeError) as e:
            raise GuestCommandError(f"unexpected irqs line {line!r}") from e


@dataclass(frozen=True)
class MsiMessage:
    """edu_count's ``msi``: the MSI message the guest programmed into the function."""

    enabled: bool
    address: int
    data: int
    #: Destination APIC ID (compatibility format).
    dest: int
    vector: int

    @classmethod
    def parse(cls, line: str) -> MsiMessage:
        """Parse ``enabled=E address=0xA data=0xD dest=I vector=V``."""
        try:
            kv = {k: int(v, 0) for k, v in (item.split("=", 1) for item in line.split())}
            return cls(
                enabled=bool(kv["enabled"]),
                address=kv["address"],
                data=kv["data"],
                dest=kv["dest"],
                vector=kv["vector"],
            )
        except (KeyError, ValueError) as e:
            raise GuestCommandError(f"unexpected msi line {line!r}") from e


_READY_RE = re.compile(r"READY uptime=(?P<uptime>[\d.]+) dev=(?P<dev>\S*)")


class InnerGuest(Closing):
    """The inner guest's QEMU and the guest's control loop on its second serial port."""

    def __init__(self, opts: InnerOptions) -> None:
        self.opts = opts
        self.state = Runstate.IDLE
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 1
        #: Wall seconds from QEMU's start to the guest's READY line.
        self.boot_seconds: float | None = None
        #: The guest's own uptime when it printed READY.
        self.guest_uptime: float | None = None
        #: The edu function's address as the guest sees it ("" if unbound).
        self.guest_bdf: str | None = None

    def __repr__(self) -> str:
        return f"<InnerGuest {self.opts.bdf} {self.opts.mode} {self.state.name}>"

    # -- starting ---------------------------------------------------------

    @require(Runstate.IDLE)
    def start(self, boot_timeout: float = DEFAULT_BOOT_TIMEOUT) -> None:
        """Start QEMU, connect to the control socket and wait for READY."""
        started = time.monotonic()
        self._launch(())
        deadline = started + boot_timeout
        try:
            self.sock = self._connect(deadline)
            line = self._read_until(lambda ln: _READY_RE.search(ln) is not None, deadline)
        except BaseException:
            self.close()
            raise
        match = _READY_RE.search(line)
        assert match is not None
        self.boot_seconds = time.monotonic() - started
        self.guest_uptime = float(match["uptime"])
        self.guest_bdf = match["dev"]
        self.state = Runstate.READY

    def _launch(self, pass_fds: Sequence[int]) -> None:
        opts = self.opts
        opts.workdir.mkdir(parents=True, exist_ok=True)
        for path in (opts.socket_path, opts.console_log, opts.qmp_path):
            path.unlink(missing_ok=True)
        argv = qemu_argv(opts)
        with open(opts.qemu_log, "wb") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=tuple(pass_fds),
            )
        self.state = Runstate.BOOTING

    @require(Runstate.IDLE)
    def start_incoming(self, pass_fds: Sequence[int] = ()) -> None:
        """Start a QEMU that takes the guest over (``opts.incoming``); see :meth:`adopt`."""
        if not self.opts.incoming:
            raise StateError("start_incoming() needs opts.incoming")
        self._launch(pass_fds)

    @require(Runstate.BOOTING)
    def adopt(self, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        """Once this QEMU runs the guest it took over, talk to the guest through it."""
        deadline = time.monotonic() + timeout
        try:
            self.sock = self._connect(deadline)
        except BaseException:
            self.close()
            raise
        self.state = Runstate.READY
        self.command("ping", timeout=timeout)

    def detach(self) -> None:
        """Forget the control connection (the guest moved to another QEMU)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._buf = b""

    def _check_alive(self) -> None:
        assert self.proc is not None
        status = self.proc.poll()
        if status is not None:
            self.state = Runstate.STOPPED
            raise GuestBootError(
                f"QEMU exited with status {status}: {self.tail(self.opts.qemu_log)}"
            )

    def _connect(self, deadline: float) -> socket.socket:
        """Connect to QEMU's control socket once QEMU has created it."""
        while True:
            self._check_alive()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(self.opts.socket_path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            if time.monotonic() > deadline:
                raise GuestBootError(f"QEMU did not create {self.opts.socket_path}")
            time.sleep(0.05)

    # -- the line protocol ------------------------------------------------

    def _read_line(self, deadline: float) -> str:
        """The next line from the guest; GuestBootError if QEMU exits, or on timeout."""
        assert self.sock is not None
        while b"\n" not in self._buf:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.sock], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                # QEMU closes the socket as it exits: give it a moment so the
                # error says how it ended (a signal is a negative status).
                assert self.proc is not None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)
                self._check_alive()
                raise GuestBootError("QEMU closed the control socket and is still running")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", errors="replace").rstrip("\r")

    def _read_until(self, pred: Callable[[str], bool], deadline: float) -> str:
        try:
            while True:
                line = self._read_line(deadline)
                if pred(line):
                    return line
        except TimeoutError:
            state = "booting" if self.state is Runstate.BOOTING else "answering"
            raise GuestBootError(
                f"no answer from the guest while {state}; console: "
                f"{self.tail(self.opts.console_log)}"
            ) from None

    @require(Runstate.READY)
    def command(
        self, cmd: str, arg: str = "", timeout: float = DEFAULT_COMMAND_TIMEOUT
    ) -> list[str]:
        """Send one command; return the lines of its answer (without id and OK)."""
        assert self.sock is not None
        rid = str(self._next_id)
        self._next_id += 1
        self.sock.sendall(f"{rid} {cmd} {arg}".rstrip().encode() + b"\n")
        deadline = time.monotonic() + timeout
        out: list[str] = []
        try:
            while True:
                line = self._read_line(deadline)
                head, _, rest = line.partition(" ")
                if head != rid:
                    continue
                if rest == "OK":
                    return out
                if rest.startswith("ERR"):
                    raise GuestCommandError(f"the guest refused {cmd} {arg}: {rest}")
                out.append(rest)
        except TimeoutError:
            raise GuestCommandError(f"no answer to {cmd} {arg} within {timeout:g} s") from None

    # -- commands -----------------------------------------------------------

    def irqs(self) -> list[VectorCount]:
        """edu_count's counters, one per MSI vector."""
        return [VectorCount.parse(line) for line in self.command("irqs")]

    def total(self) -> int:
        """MSIs counted over every vector."""
        return sum(v.count for v in self.irqs())

    def raise_in_guest(self, n: int, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> list[int]:
        """Raise *n* MSIs from the guest, each waited for; their raise->handler ns."""
        lines = self.command("raise", str(n), timeout=timeout)
        return [int(x) for line in lines for x in line.split()]

    def msi(self) -> MsiMessage:
        """The MSI message the guest has programmed into the function."""
        return MsiMessage.parse(self.command("msi")[0])

    def move(self, cpu: int) -> None:
        """Point the function's IRQs at guest CPU *cpu*; the guest reprograms the MSI."""
        self.command("move", str(cpu))

    def set_enabled(self, on: bool) -> None:
        """Turn the function's MSI off (IRQs freed) or on again (new message)."""
        self.command("enable", "1" if on else "0")

    def set_masked(self, masked: bool) -> None:
        """disable_irq() (True) or enable_irq() (False) every IRQ of the function."""
        self.command("mask", "1" if masked else "0")

    def dmesg(self) -> list[str]:
        """The guest's kernel log."""
        return self.command("dmesg", timeout=120.0)

    def uptime(self) -> float:
        """The guest's uptime in seconds."""
        return float(self.command("uptime")[0].split()[0])

    # -- stopping ---------------------------------------------------------

    def poweroff(self, timeout: float = 60.0) -> int | None:
        """Ask the guest to power off and wait for QEMU; its exit status, None if killed."""
        if self.state is Runstate.READY:
            with contextlib.suppress(QemuError, OSError):
                self.command("poweroff", timeout=timeout)
        return self._stop(timeout)

    def _stop(self, timeout: float) -> int | None:
        status = None
        if self.proc is not None:
            try:
                status = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10.0)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.state is not Runstate.IDLE:
            self.state = Runstate.STOPPED
        return status

    def close(self) -> None:
        """Stop QEMU now if it still runs (no poweroff)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        self._stop(10.0)

    @staticmethod
    def tail(path: Path, lines: int = 15) -> str:
        """The last lines of a log file, for error messages."""
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"({path} unreadable)"
        return " | ".join(text.strip().splitlines()[-lines:]) or f"({path} empty)"


def find_kernel_image(release: str, boot: Path = Path("/boot")) -> Path:
    """``/boot/vmlinuz-<release>``, the kernel the inner guest boots."""
    image = boot / f"vmlinuz-{release}"
    if not image.is_file():
        raise QemuError(f"no {image}: edu_count.ko was built for {release}")
    return image


def check_host(qemu: Path, bdf: str, kvm: Path = Path("/dev/kvm")) -> None:
    """Raise QemuError unless QEMU, /dev/kvm and the vfio-pci function are there."""
    problems: Sequence[str] = [
        p
        for p, bad in (
            (f"{qemu} is not an executable", not os.access(qemu, os.X_OK)),
            (f"{kvm} is missing (run inside the test VM: kvm_amd)", not kvm.exists()),
            (
                f"{bdf} is not bound to vfio-pci",
                Path(f"/sys/bus/pci/devices/{bdf}/driver").resolve().name != "vfio-pci",
            ),
        )
        if bad
    ]
    if problems:
        raise QemuError("; ".join(problems))
