"""Guest side of the VM harness: set up, run the suite, tear down, check the kernel log.

``python -m pyctl.guest --status-file DIR/status.json [--module M.ko ...] -- COMMAND``
runs as root inside the virtme-ng guest that :mod:`pyctl.vm` boots:

1. starts reading ``/dev/kmsg`` and writes a start marker into it, so that only
   what the kernel logs from then on is checked;
2. loads each ``--module`` in order (a failure stops the run), and waits for
   ``/dev/kvmlu`` once ``kvmlu.ko`` is in;
3. loads vfio-pci and binds every QEMU ``edu`` function (1234:11e8) to it, then
   waits until each one has an IOMMU group and its ``/dev/vfio/<group>`` node;
   loads ``kvm_amd`` when the CPU has ``svm`` (``kvm_intel`` for ``vmx``), so
   that ``/dev/kvm`` runs nested guests (a kernel without them is noted, not
   a failure: tests that need ``/dev/kvm`` skip), and holds one KVM VM open
   until the end (:func:`hold_kvm_vm`);
4. runs COMMAND with the environment passed through plus ``KVMLU_IN_VM=1``,
   ``KVMLU_EDU`` (comma-separated BDFs) and ``KVMLU_RESULTS`` (the writable
   results folder shared with the host);
5. unloads the modules in reverse order; a module that will not unload means
   leaked objects and fails the run;
6. scans the kernel log written since the marker with :func:`pyctl.klog.scan`,
   and kmemleak's report when the kernel has kmemleak (debugfs is mounted if
   it is not; ``--require-kmemleak`` makes a kernel without it a failure);
7. writes ``status.json`` next to ``kmsg.log`` and exits non-zero if COMMAND
   failed or any check did.

``status.json`` holds ``command_status`` (COMMAND's exit status, 128+N when
killed by signal N, null when it was not run), ``klog_findings``,
``rmmod_errors``, ``setup_errors``, ``edu`` (one ``{"bdf", "group", "vfio"}``
per function), ``kvm`` (the KVM module loaded, whether ``/dev/kvm``
appeared and whether the runner holds a VM: :func:`hold_kvm_vm`),
``kmemleak_reports`` (objects kmemleak's final scan reported, null when it
did not scan) and ``ok``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyctl import klog

_DESCRIPTION = "Guest side of the kvmlu VM harness."

#: The runner's first line (after say()'s prefix): kvmlu vm looks for it to
#: tell a boot that ran nothing of kvmlu's.
STARTED = "started"
MARKER_START = "kvmlu-guest: suite start"
MARKER_END = "kvmlu-guest: suite end"

EDU_VENDOR = 0x1234
EDU_DEVICE = 0x11E8

PCI_DEVICES = Path("/sys/bus/pci/devices")
VFIO_PCI_DRIVER = Path("/sys/bus/pci/drivers/vfio-pci")
DEV_KVMLU = Path("/dev/kvmlu")
DEV_KVM = Path("/dev/kvm")
CPUINFO = Path("/proc/cpuinfo")
# The KVM module for each CPU flag that offers hardware virtualisation.
KVM_MODULES = {"svm": "kvm_amd", "vmx": "kvm_intel"}
# _IO(KVMIO, 0x01): a new VM, returned as an fd (close-on-exec).
KVM_CREATE_VM = 0xAE01
DEBUGFS = Path("/sys/kernel/debug")
KMEMLEAK = DEBUGFS / "kmemleak"
# kmemleak reports an object only once it is this old (MSECS_MIN_AGE).
KMEMLEAK_MIN_AGE = 5.0

DEFAULT_WAIT = 30.0
POLL_INTERVAL = 0.05


def say(msg: str) -> None:
    """Print one progress line of the guest runner."""
    print(f"kvmlu-guest: {msg}", flush=True)


def uptime() -> float:
    """Seconds since the guest kernel booted."""
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    """Poll *pred* until it is true or *timeout* seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)


def kmsg_write(text: str, level: int = 5) -> None:
    """Write one line into the kernel log."""
    with open("/dev/kmsg", "w", encoding="utf-8") as f:
        f.write(f"<{level}>{text}\n")


class KmsgReader:
    """Collect every /dev/kmsg record logged from construction on, in a thread.

    Reading as the records come keeps them even if the suite logs more than the
    kernel's ring buffer holds; records lost anyway show up as a gap in the
    sequence numbers and are counted in :attr:`lost`.
    """

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self.records: list[klog.KmsgRecord] = []
        self.lost = 0
        self._last_seq: int | None = None
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self._fd, 0, os.SEEK_END)
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kmsg-reader", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 16384)
            except BlockingIOError:
                return
            except BrokenPipeError:
                # Our next record was overwritten; the next read resumes at the
                # oldest one left, and the sequence gap counts what was lost.
                continue
            if not data:
                return
            rec = klog.parse_kmsg_record(data.decode("utf-8", errors="replace"))
            if rec is None:
                continue
            if self._last_seq is not None and rec.seq > self._last_seq + 1:
                self.lost += rec.seq - self._last_seq - 1
            self._last_seq = rec.seq
            self.records.append(rec)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLPRI)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            poller.poll()
            self._drain()
        self._drain()

    def stop(self, timeout: float = 10.0) -> bool:
        """Read what is left and stop; False if the thread did not finish in time."""
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)
        return True

    def lines(self) -> list[str]:
        """The collected records, formatted like dmesg."""
        return [rec.format() for rec in self.records]


def module_name(path: Path) -> str:
    """Kernel name of the module file *path* (``kvmlu-x.ko`` -> ``kvmlu_x``)."""
    name = path.name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def _run_tool(argv: Sequence[str]) -> str | None:
    """Run a system tool; None on success, else its error message."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError as e:
        return f"{' '.join(argv)}: {e}"
    if res.returncode == 0:
        return None
    detail = (res.stderr or res.stdout).strip() or f"exit status {res.returncode}"
    return f"{' '.join(argv)}: {detail}"


def _read_hex(path: Path) -> int | None:
    try:
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def find_edu() -> list[str]:
    """BDFs of the QEMU edu functions, sorted."""
    found = []
    for dev in sorted(PCI_DEVICES.iterdir()) if PCI_DEVICES.is_dir() else []:
        if _read_hex(dev / "vendor") == EDU_VENDOR and _read_hex(dev / "device") == EDU_DEVICE:
            found.append(dev.name)
    return found


def _link_name(path: Path) -> str | None:
    try:
        return Path(os.readlink(path)).name
    except OSError:
        return None


def driver_of(bdf: str) -> str | None:
    """Name of the driver *bdf* is bound to, or None."""
    return _link_name(PCI_DEVICES / bdf / "driver")


def iommu_group_of(bdf: str) -> int | None:
    """IOMMU group number of *bdf*, or None."""
    name = _link_name(PCI_DEVICES / bdf / "iommu_group")
    return int(name) if name is not None and name.isdigit() else None


def _vfio_ready(bdf: str) -> bool:
    group = iommu_group_of(bdf)
    return (
        driver_of(bdf) == "vfio-pci" and group is not None and Path(f"/dev/vfio/{group}").exists()
    )


def bind_edu(bdfs: Sequence[str], timeout: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Bind every edu function to vfio-pci; return (devices, errors)."""
    errors: list[str] = []
    if not bdfs:
        return [], errors
    # Built into a debug kernel, vfio-pci is there without modprobe (which
    # would find no module tree for such a kernel).
    err = None if VFIO_PCI_DRIVER.is_dir() else _run_tool(["modprobe", "vfio-pci"])
    if err is not None:
        return [], [err]
    try:
        (VFIO_PCI_DRIVER / "new_id").write_text(f"{EDU_VENDOR:04x} {EDU_DEVICE:04x}\n")
    except FileExistsError:
        pass  # the ID is there already: the devices got probed when it was added
    except OSError as e:
        errors.append(f"vfio-pci new_id: {e}")
    # A function left without a driver (ID added before it appeared, or new_id
    # refused) is bound explicitly.
    for bdf in bdfs:
        if driver_of(bdf) is None:
            try:
                (PCI_DEVICES / bdf / "driver_override").write_text("vfio-pci\n")
                Path("/sys/bus/pci/drivers_probe").write_text(f"{bdf}\n")
            except OSError as e:
                errors.append(f"{bdf}: binding to vfio-pci: {e}")
    wait_for(lambda: all(_vfio_ready(b) for b in bdfs), timeout)
    devices: list[dict[str, Any]] = []
    for bdf in bdfs:
        group = iommu_group_of(bdf)
        node = f"/dev/vfio/{group}" if group is not None else None
        devices.append({"bdf": bdf, "group": group, "vfio": node, "driver": driver_of(bdf)})
        if not _vfio_ready(bdf):
            errors.append(
                f"edu {bdf} not ready after {timeout:g} s: driver {driver_of(bdf)}, "
                f"iommu group {group}, {node} "
                f"{'exists' if node and Path(node).exists() else 'missing'}"
            )
    return devices, errors


def cpu_flags(cpuinfo: Path | None = None) -> set[str]:
    """The flags of the first CPU in /proc/cpuinfo."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def kvm_module_for(flags: set[str]) -> str | None:
    """The KVM module this CPU needs, or None when it offers no SVM or VMX."""
    for flag, module in KVM_MODULES.items():
        if flag in flags:
            return module
    return None


def load_kvm(timeout: float) -> dict[str, Any]:
    """Load the KVM module the CPU calls for and wait for /dev/kvm.

    Returns ``{"module", "dev", "error"}``; a missing module or CPU feature is
    reported there, as the suite runs without KVM too.
    """
    module = kvm_module_for(cpu_flags())
    info: dict[str, Any] = {"module": module, "dev": None, "error": None}
    if not DEV_KVM.exists():
        if module is None:
            info["error"] = "the CPU has neither svm nor vmx"
            return info
        info["error"] = _run_tool(["modprobe", module])
        if info["error"] is None and not wait_for(DEV_KVM.exists, timeout):
            info["error"] = f"{DEV_KVM} did not appear within {timeout:g} s"
    if DEV_KVM.exists():
        info["dev"] = str(DEV_KVM)
    return info


def hold_kvm_vm() -> tuple[int | None, str | None]:
    """Create one KVM VM and return its fd (or None and why not).

    KVM turns the scheduler's preempt-notifier static key on when it creates
    its first VM and off when it destroys its last, and each switch patches
    ``__schedule()`` with an int3 breakpoint while every CPU runs through it.
    The test VM's vCPUs run under TCG, which does not always see the
    breakpoint go away again: a Debian 6.12 kernel died of ``Oops: int3`` at
    that jump (``__schedule+0x428``, key ``preempt_notifier_key``) while the
    suite created and closed VMs.  A VM held for the whole run keeps the key
    on, so it is patched once, here, and never again.
    """
    try:
        kvm = os.open(DEV_KVM, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return None, f"cannot open {DEV_KVM}: {e}"
    try:
        return fcntl.ioctl(kvm, KVM_CREATE_VM, 0), None
    except OSError as e:
        return None, f"KVM_CREATE_VM: {e}"
    finally:
        os.close(kvm)


class Kmemleak:
    """kmemleak's debugfs file: cleared when the run starts, scanned when it ends."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or KMEMLEAK
        self.enabled = False

    def start(self) -> str | None:
        """Forget every object allocated so far; why kmemleak is unusable, or None."""
        if not self.path.exists():
            return (
                f"{self.path} is missing: a kernel without CONFIG_DEBUG_KMEMLEAK, "
                "or debugfs is not mounted"
            )
        try:
            self.path.write_text("clear")
            # No scans of its own: reports come from the one at the end (and
            # "scan=off" is refused when kmemleak has turned itself off).
            self.path.write_text("scan=off")
        except OSError as e:
            return (
                f"kmemleak is off ({e.strerror}): booted with kmemleak=off, "
                "or it ran out of its object pool"
            )
        self.enabled = True
        return None

    def scan(self) -> list[str]:
        """Scan now; the report (one block per suspected leak)."""
        self.path.write_text("scan")
        return self.path.read_text().splitlines()


def count_leaks(report: Sequence[str]) -> int:
    """How many objects a kmemleak report lists."""
    return sum(1 for line in report if line.startswith("unreferenced object 0x"))


def mount_debugfs() -> str | None:
    """Mount debugfs where kmemleak expects it unless it is; an error, or None."""
    if os.path.ismount(DEBUGFS):
        return None
    return _run_tool(["mount", "-t", "debugfs", "debugfs", str(DEBUGFS)])


def run_command(command: Sequence[str], env: dict[str, str]) -> int:
    """Run COMMAND; its exit status, 128+N if killed by signal N."""
    say(f"running: {' '.join(command)}")
    try:
        res = subprocess.run(list(command), env=env, check=False)
    except FileNotFoundError as e:
        say(f"cannot run {command[0]}: {e}")
        return 127
    except PermissionError as e:
        say(f"cannot run {command[0]}: {e}")
        return 126
    if res.returncode < 0:
        sig = -res.returncode
        say(f"command killed by signal {signal.Signals(sig).name}")
        return 128 + sig
    return res.returncode


@dataclass
class Outcome:
    """What one guest run found; serialised into status.json."""

    command: list[str]
    modules: list[str]
    command_status: int | None = None
    setup_errors: list[str] = field(default_factory=list)
    rmmod_errors: list[str] = field(default_factory=list)
    klog_findings: list[str] = field(default_factory=list)
    edu: list[dict[str, Any]] = field(default_factory=list)
    kvm: dict[str, Any] = field(default_factory=dict)
    kmsg_lost: int = 0
    kmemleak_reports: int | None = None

    @property
    def ok(self) -> bool:
        """True if COMMAND ran and passed and no check failed."""
        return (
            self.command_status == 0
            and not self.setup_errors
            and not self.rmmod_errors
            and not self.klog_findings
        )

    def exit_status(self) -> int:
        """COMMAND's status if it failed, else 1 if a check failed, else 0."""
        if self.command_status:
            return self.command_status
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        """The status.json document."""
        return {
            "ok": self.ok,
            "command": self.command,
            "command_status": self.command_status,
            "modules": self.modules,
            "setup_errors": self.setup_errors,
            "rmmod_errors": self.rmmod_errors,
            "klog_findings": self.klog_findings,
            "kmsg_lost": self.kmsg_lost,
            "kmemleak_reports": self.kmemleak_reports,
            "edu": self.edu,
            "kvm": self.kvm,
        }


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write *doc* to *path* so that a reader sees all of it or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _command_env(
    edu: Sequence[dict[str, Any]],
    results: Path,
    extra: Sequence[str],
    modules: Sequence[Path] = (),
) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join([bindir, path]) if path else bindir
    env["KVMLU_IN_VM"] = "1"
    env["KVMLU_EDU"] = ",".join(str(d["bdf"]) for d in edu)
    env["KVMLU_RESULTS"] = str(results)
    # The modules this run loaded, for tests that unload and load one again:
    # they must load the same build (the debug kernel's are elsewhere).
    env["KVMLU_MODULES"] = ":".join(str(Path(m).resolve()) for m in modules)
    for item in extra:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def _setup(args: argparse.Namespace, out: Outcome, loaded: list[str]) -> int | None:
    """Load the modules, bind the edu functions, load KVM; errors go to out.setup_errors.

    Returns the fd of the KVM VM held for the run (:func:`hold_kvm_vm`), if any.
    """
    for path in args.module:
        say(f"insmod {path}")
        err = _run_tool(["insmod", str(path)])
        if err is not None:
            out.setup_errors.append(err)
            return None
        loaded.append(module_name(path))
        if module_name(path) == "kvmlu" and not wait_for(DEV_KVMLU.exists, args.wait):
            out.setup_errors.append(f"{DEV_KVMLU} did not appear within {args.wait:g} s")
            return None
    bdfs = find_edu()
    if args.expect_edu is not None and len(bdfs) != args.expect_edu:
        out.setup_errors.append(f"expected {args.expect_edu} edu devices, found {len(bdfs)}")
        return None
    out.edu, errors = bind_edu(bdfs, args.wait)
    out.setup_errors += errors
    for dev in out.edu:
        say(f"edu {dev['bdf']} vfio-pci, iommu group {dev['group']}, {dev['vfio']}")
    out.kvm = load_kvm(args.wait)
    if out.kvm["dev"] is None:
        say(f"no /dev/kvm: {out.kvm['error']}")
        return None
    say(f"{out.kvm['dev']} ready ({out.kvm['module'] or 'built in'})")
    vm_fd, problem = hold_kvm_vm()
    out.kvm["held_vm"] = vm_fd is not None
    if problem is not None:
        out.kvm["error"] = problem
        say(f"no KVM VM held for the run: {problem}")
    return vm_fd


def _start_kmemleak(required: bool, out: Outcome) -> Kmemleak:
    leak = Kmemleak()
    problem = mount_debugfs() or leak.start()
    if problem is not None:
        say(f"kmemleak not used: {problem}")
        if required:
            out.setup_errors.append(f"kmemleak is required: {problem}")
    return leak


def _finish_kmemleak(leak: Kmemleak, out: Outcome) -> list[str]:
    """kmemleak's report after the modules are gone (empty if it is not used)."""
    if not leak.enabled:
        return []
    # What the last test leaked must be old enough to be reported.
    time.sleep(KMEMLEAK_MIN_AGE + 1)
    try:
        report = leak.scan()
    except OSError as e:
        out.setup_errors.append(f"kmemleak scan failed: {e}")
        return []
    out.kmemleak_reports = count_leaks(report)
    say(f"kmemleak: scanned, {out.kmemleak_reports} suspected leaks")
    return report


def _unload(loaded: Sequence[str], out: Outcome) -> None:
    """Unload the modules in reverse order; failures go to out.rmmod_errors."""
    for name in reversed(loaded):
        say(f"rmmod {name}")
        err = _run_tool(["rmmod", name])
        if err is not None:
            out.rmmod_errors.append(err)
            say(f"RMMOD FAILED (leaked objects?): {err}")


def run(args: argparse.Namespace) -> Outcome:
    """Do one guest run as described in the module docstring."""
    status_file: Path = args.status_file
    out = Outcome(command=list(args.command), modules=[str(m) for m in args.module])
    say(f"{STARTED} {uptime():.1f} s after boot")
    reader = KmsgReader()
    kmsg_write(MARKER_START)
    leak = _start_kmemleak(args.require_kmemleak, out)
    loaded: list[str] = []
    held_vm: int | None = None
    try:
        if not out.setup_errors:
            held_vm = _setup(args, out, loaded)
        if out.setup_errors:
            for problem in out.setup_errors:
                say(f"SETUP FAILED: {problem}")
        elif out.command:
            env = _command_env(out.edu, status_file.parent, args.env, args.module)
            started = time.monotonic()
            out.command_status = run_command(out.command, env)
            say(
                f"command exit status {out.command_status} after {time.monotonic() - started:.1f} s"
            )
        else:
            out.command_status = 0
    finally:
        if held_vm is not None:
            os.close(held_vm)
        _unload(loaded, out)
        leaks = _finish_kmemleak(leak, out)
        kmsg_write(MARKER_END)
        if not reader.stop():
            out.setup_errors.append("kernel log reader did not stop")
    lines = klog.lines_after_marker(reader.lines(), MARKER_START)
    lines = [line for line in lines if MARKER_END not in line]
    out.klog_findings = klog.scan(lines) + klog.scan(leaks)
    out.kmsg_lost = reader.lost
    if reader.lost:
        out.klog_findings.append(f"kvmlu-guest: {reader.lost} kernel log records lost")
    try:
        (status_file.parent / "kmsg.log").write_text(
            "".join(line + "\n" for line in lines), encoding="utf-8"
        )
    except OSError as e:
        say(f"cannot write kmsg.log: {e}")
    for finding in out.klog_findings:
        say(f"KERNEL LOG: {finding}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the guest runner's command line."""
    p = argparse.ArgumentParser(prog="python -m pyctl.guest", description=_DESCRIPTION)
    p.add_argument("--status-file", type=Path, required=True, help="where to write status.json")
    p.add_argument("--module", type=Path, action="append", default=[], help="module to insmod")
    p.add_argument("--expect-edu", type=int, default=None, help="number of edu functions")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment variable for COMMAND",
    )
    p.add_argument(
        "--require-kmemleak",
        action="store_true",
        help="fail the run unless kmemleak is on and scans at the end",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT,
        help="seconds to wait for device nodes (default %(default)s)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pyctl.guest``."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        say("must run as root inside the test VM")
        return 2
    try:
        out = run(args)
    except Exception as e:  # report any failure of the runner itself to the host
        traceback.print_exc()
        out = Outcome(command=list(args.command), modules=[str(m) for m in args.module])
        out.setup_errors.append(f"guest runner failed: {e!r}")
    write_json_atomic(args.status_file, out.to_json())
    say(
        f"done {uptime():.1f} s after boot: command status {out.command_status}, "
        f"{len(out.klog_findings)} kernel log findings, {len(out.rmmod_errors)} rmmod errors, "
        f"{len(out.setup_errors)} setup errors"
    )
    return out.exit_status()


if __name__ == "__main__":
    sys.exit(main())
