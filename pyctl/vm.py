"""Host side of the VM harness: boot a test VM with virtme-ng and run a command in it.

Kernel code never runs on the build machine.  ``kvmlu vm -- COMMAND`` boots an
installed Debian kernel under QEMU with virtme-ng (TCG by default), on a q35
machine with an emulated Intel IOMMU (interrupt remapping on) and N QEMU
``edu`` PCI functions, and runs :mod:`pyctl.guest` in it.  The CPU model is
``max`` unless ``--cpu`` says otherwise: under TCG it is AMD-vendor with SVM,
so the guest runner loads ``kvm_amd`` and the test VM is a nested-KVM host.
The guest kernel gets ``iomem=relaxed``, so that a BAR vfio-pci has claimed
can still be mapped through sysfs (see :data:`RELAXED_IOMEM`).  The guest
loads the modules, binds the edu functions to vfio-pci, runs COMMAND, unloads
the modules and scans the kernel log; it writes ``status.json`` into a results
folder that the host shares read-write with the guest.

The exit status is COMMAND's when it failed; otherwise 1 when a check failed
(kernel-log finding, module that would not unload, setup error), 124 when the
VM timed out and was killed, 125 when the guest wrote no status at all (kernel
panic, crash, boot failure, or a CPU stuck for :data:`LOCKUP_FATAL_S`); before
booting, 2 for options that do not fit and 3 when the machine lacks what the VM
needs (the kernel, a module built for it). The results folder (default
``results/vm`` in the checkout) keeps ``status.json``, ``guest.log`` (what the
guest printed), ``kmsg.log`` (the kernel log of the run) and ``console.log``
(the kernel console, which is where a panic ends up).

virtme-ng details this relies on (1.42):

* its helper ``virtme-run`` must be on PATH: the folder of ``vng`` goes first;
* ``--qemu-opts`` needs the ``=`` form, as its value starts with ``-``;
* ``--disable-microvm`` selects ``-machine q35``, which intel-iommu needs;
* ``--force-9p`` skips a failing virtiofsd start (about 6 s of retries here);
* QEMU writes guest output by opening ``/proc/self/fd/1`` and ``/proc/self/fd/2``,
  which rewinds a regular file given as stdout: the output goes through pipes;
* with ``--verbose`` the kernel console goes to vng's stderr (and ``quiet`` is
  not added); the guest runner's stderr is merged into its stdout so that the
  console can be kept apart in ``console.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from pyctl import guest, klog
from pyctl.errors import KvmluError, UsageError

CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_MODULES = ("kmod/kvmlu.ko", "kmod/kvmlu_vapic_v1.ko", "kmod/kvmlu_vapic_v2.ko")
DEFAULT_RESULTS = CHECKOUT / "results" / "vm"
DEFAULT_TIMEOUT = 1800.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_CPUS = 2
DEFAULT_EDU = 2
# TCG's "max" CPU is AMD-vendor with SVM, so the test VM can be a nested-KVM
# host (kvm_amd refuses any other vendor); vng picks the same under TCG.
DEFAULT_CPU_MODEL = "max"
# Kernel messages of level WARNING and worse reach the console (console.log).
CONSOLE_LOGLEVEL = 5

EXIT_CHECK_FAILED = 1
#: Before any boot: options that do not fit (2), or a machine that lacks what
#: the VM needs, such as the kernel or a module built for it (3).
EXIT_USAGE = 2
EXIT_SETUP = 3
EXIT_TIMEOUT = 124
EXIT_NO_STATUS = 125
EXIT_INTERRUPTED = 130

Accel = Literal["tcg", "kvm"]
TcgThreads = Literal["single", "multi"]
# Under TCG the vCPUs take turns on one host thread unless told otherwise:
# with a thread per vCPU (MTTCG), QEMU 7.2 let a vCPU run code another vCPU
# had just live-patched (static branches: int3, then the new jump) as it was
# before the patch, which Debian's kernels met with "Oops: int3" and, once
# in CI, with both vCPUs stuck in a soft lockup for the rest of the run.
DEFAULT_TCG_THREADS: TcgThreads = "single"


class VmError(KvmluError):
    """The VM cannot be set up as asked (no kernel, missing module, no vng...)."""


class VmUsageError(VmError, UsageError):
    """Options of ``kvmlu vm`` that cannot work whatever the machine has."""


@dataclass(frozen=True)
class KernelInfo:
    """A kernel the test VM can boot, and where modules for it are built.

    ``tree`` is True for a kernel build tree (``--kernel /path/to/linux``): vng
    is then given the tree, so that it uses the tree's modules.
    """

    version: str
    vmlinuz: Path
    build_dir: Path
    tree: bool = False

    @property
    def run_target(self) -> Path:
        """What to pass to ``vng --run``."""
        return self.build_dir if self.tree else self.vmlinuz


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders 6.1.0-9 before 6.1.0-10."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part)
        for part in re.split(r"(\d+)", version)
        if part
    )


def _kernel_tree(path: Path) -> KernelInfo:
    image = path / "arch" / "x86" / "boot" / "bzImage"
    if not image.is_file():
        raise VmError(f"{path}: not a built kernel tree (no {image})")
    release = path / "include" / "config" / "kernel.release"
    version = release.read_text().strip() if release.is_file() else path.name
    return KernelInfo(version=version, vmlinuz=image, build_dir=path, tree=True)


def find_kernel(
    version: str | None = None,
    *,
    prefer: str | None = None,
    boot_dir: Path = Path("/boot"),
    modules_dir: Path = Path("/lib/modules"),
) -> KernelInfo:
    """Find the kernel to boot.

    *version* is a release (``6.1.0-56-amd64``), a path to a kernel build tree,
    or None for the release *prefer* if it is installed with its build
    directory, else the newest ``/boot/vmlinuz-*`` that has ``/lib/modules/V/build``.
    A release named explicitly may also keep its image in its modules
    folder (``/lib/modules/V/vmlinuz``, as Debian 13's packages do, and as
    ``tools/newest-kernel.sh`` leaves the newest Debian kernel); only the
    ``/boot`` images are candidates when no release is named.
    """
    if version is not None and os.sep in version:
        return _kernel_tree(Path(version))
    if version is not None:
        image = boot_dir / f"vmlinuz-{version}"
        build = modules_dir / version / "build"
        if not image.is_file() and (modules_dir / version / "vmlinuz").is_file():
            image = modules_dir / version / "vmlinuz"
        if not image.is_file():
            known = ", ".join(sorted(p.name for p in boot_dir.glob("vmlinuz-*"))) or "none"
            raise VmError(f"no kernel image {image} (installed: {known})")
        if not build.is_dir():
            raise VmError(f"kernel {version} has no {build}: install linux-headers-{version}")
        return KernelInfo(version=version, vmlinuz=image, build_dir=build)
    found = []
    for image in boot_dir.glob("vmlinuz-*"):
        ver = image.name.removeprefix("vmlinuz-")
        if image.is_file() and (modules_dir / ver / "build").is_dir():
            found.append(
                KernelInfo(version=ver, vmlinuz=image, build_dir=modules_dir / ver / "build")
            )
    if not found:
        raise VmError(
            f"no {boot_dir}/vmlinuz-V with {modules_dir}/V/build: "
            "apt-get install linux-image-amd64 linux-headers-amd64"
        )
    for k in found:
        if k.version == prefer:
            return k
    return max(found, key=lambda k: _version_key(k.version))


def find_vng() -> Path:
    """The ``vng`` next to this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "vng"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    which = shutil.which("vng")
    if which is None:
        raise VmError("vng not found: pip install virtme-ng (into the project venv)")
    return Path(which)


@dataclass
class VmOptions:
    """Everything that decides how the test VM is booted and what it runs."""

    kernel: KernelInfo
    command: list[str] = field(default_factory=list)
    accel: Accel = "tcg"
    tcg_threads: TcgThreads = DEFAULT_TCG_THREADS
    edu: int = DEFAULT_EDU
    memory_mb: int = DEFAULT_MEMORY_MB
    cpus: int = DEFAULT_CPUS
    cpu_model: str = DEFAULT_CPU_MODEL
    modules: list[Path] = field(default_factory=list)
    results_dir: Path = DEFAULT_RESULTS
    timeout: float = DEFAULT_TIMEOUT
    kernel_append: list[str] = field(default_factory=list)
    #: Host folders the guest sees read-only (vng --rodir: PATH or GUEST=HOST).
    rodirs: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    console: bool = False
    scratch_mb: int = 0
    require_kmemleak: bool = False
    checkout: Path = CHECKOUT
    python: Path = field(default_factory=lambda: Path(sys.executable))
    vng: Path = Path("vng")

    @property
    def status_file(self) -> Path:
        """Where the guest writes status.json."""
        return self.results_dir / "status.json"

    @property
    def scratch_file(self) -> Path:
        """The backing file of the scratch disk (sparse, made anew every boot)."""
        return self.results_dir / "scratch.img"


def guest_command(opts: VmOptions) -> str:
    """The shell command vng runs in the guest: the guest runner, then COMMAND."""
    argv = [str(opts.python), "-m", "pyctl.guest", "--status-file", str(opts.status_file)]
    argv += ["--expect-edu", str(opts.edu)]
    for module in opts.modules:
        argv += ["--module", str(module)]
    for item in [f"KVMLU_ACCEL={opts.accel}", *opts.env]:
        argv += ["--env", item]
    if opts.require_kmemleak:
        argv.append("--require-kmemleak")
    argv += ["--", *opts.command]
    return f"PYTHONPATH={shlex.quote(str(opts.checkout))} exec {shlex.join(argv)} 2>&1"


# virtme-ng (1.42) mounts a tmpfs on these in the guest: what the host keeps
# there (make qemu's build, under /var/cache) needs --rodir to be seen.
GUEST_HIDDEN = tuple(
    Path(p) for p in ("/var/cache", "/var/log", "/var/tmp", "/var/lib/apt", "/var/lib/private")
)


def hidden_in_guest(path: Path) -> bool:
    """True if the guest cannot see *path* without a --rodir."""
    return any(path == h or h in path.parents for h in GUEST_HIDDEN)


def kernel_rodirs(kernel: KernelInfo, modules_dir: Path = Path("/lib/modules")) -> list[str]:
    """The folder to share for *kernel*'s modules, if the guest hides it.

    ``tools/newest-kernel.sh`` makes ``/lib/modules/<release>`` a link into
    its cache under /var/cache, which the guest covers with a tmpfs: without
    the share, the guest could not load that kernel's 9p, KVM or VFIO modules.
    """
    if kernel.tree:
        return []
    target = (modules_dir / kernel.version).resolve()
    return [str(target)] if hidden_in_guest(target) else []


SCRATCH_SERIAL = "kvmlu-scratch"


def qemu_options(opts: VmOptions) -> list[str]:
    """Extra QEMU options: CPU model, emulated IOMMU, edu functions, scratch disk.

    The CPU model comes after vng's own ``-cpu`` and so replaces it.  The
    scratch disk is a virtio-blk disk whose serial is ``kvmlu-scratch`` (the
    guest finds it by /sys/block/*/serial), for workloads that write.
    """
    out = ["-cpu", opts.cpu_model, "-device", "intel-iommu,intremap=on"]
    if opts.accel == "tcg":
        # vng names no accelerator when KVM is off, so this is the only one.
        out += ["-accel", f"tcg,thread={opts.tcg_threads}"]
    out += ["-device", "edu"] * opts.edu
    if opts.scratch_mb:
        out += [
            "-drive",
            f"file={opts.scratch_file},if=none,id=scratch,format=raw,cache=unsafe",
            "-device",
            f"virtio-blk-pci,drive=scratch,serial={SCRATCH_SERIAL}",
        ]
    return out


# Under TCG on a loaded host the boot-time check that the timer ticks through
# the interrupt-remapped IO-APIC can see too few ticks, and with interrupt
# remapping on the kernel panics ("timer doesn't work through
# Interrupt-remapped IO-APIC", seen here with two busy loops beside the VM)
# instead of falling back. The timer works; skip the check.
NO_TIMER_CHECK = "no_timer_check"

# Debian's kernel has CONFIG_IO_STRICT_DEVMEM: a BAR that vfio-pci has claimed
# cannot be mapped through sysfs resourceN (EINVAL). The nested-guest tests
# raise MSIs through that mapping while QEMU owns the function
# (pyctl.qemu.bar); iomem=relaxed lifts the restriction and nothing else.
RELAXED_IOMEM = "iomem=relaxed"


def kernel_params(opts: VmOptions) -> list[str]:
    """Extra guest kernel command line parameters."""
    return [
        "intel_iommu=on",
        RELAXED_IOMEM,
        NO_TIMER_CHECK,
        f"loglevel={CONSOLE_LOGLEVEL}",
        *opts.kernel_append,
    ]


def build_command(opts: VmOptions) -> list[str]:
    """The ``vng`` argv that boots the test VM and runs the guest runner."""
    argv = [str(opts.vng), "--run", str(opts.kernel.run_target)]
    argv += ["--verbose", "--force-9p", "--disable-microvm"]
    if opts.accel == "tcg":
        argv.append("--disable-kvm")
    argv += ["--cpus", str(opts.cpus), "--memory", f"{opts.memory_mb}M"]
    argv += ["--append", shlex.join(kernel_params(opts))]
    argv.append("--qemu-opts=" + " ".join(qemu_options(opts)))
    argv += ["--rwdir", str(opts.results_dir)]
    argv += [f"--rodir={d}" for d in opts.rodirs]
    argv += ["--exec", guest_command(opts)]
    return argv


#: A soft lockup report of a CPU stuck this long means the guest kernel will
#: not recover (a loaded host starves a TCG vCPU for tens of seconds, not
#: minutes): kvmlu vm stops QEMU instead of waiting for --timeout.
LOCKUP_FATAL_S = 300
_SOFT_LOCKUP = re.compile(rb"soft lockup - CPU#\d+ stuck for (\d+)s!")


class LockupWatch:
    """A console sink that notices a guest CPU stuck for good.

    It takes the console's bytes as they arrive (any chunking) and sets
    :attr:`line` to the first soft lockup report whose CPU has been stuck
    for at least *fatal_s* seconds.
    """

    def __init__(self, fatal_s: float = LOCKUP_FATAL_S) -> None:
        self.fatal_s = fatal_s
        self.line: str | None = None
        self._partial = b""

    def write(self, chunk: bytes) -> int:
        """Take console output; return its length (a file's write())."""
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()[-4096:]
        for raw in lines:
            match = _SOFT_LOCKUP.search(raw)
            if self.line is None and match and int(match.group(1)) >= self.fatal_s:
                self.line = raw.decode(errors="replace").strip()
        return len(chunk)

    def flush(self) -> None:
        """Nothing is buffered but a partial line."""


def _pump(src: IO[bytes], sinks: Sequence[Any]) -> None:
    """Copy *src* to every sink as data arrives."""
    fd = src.fileno()
    while chunk := os.read(fd, 65536):
        for sink in sinks:
            with contextlib.suppress(OSError, ValueError):
                sink.write(chunk)
                sink.flush()


def _group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the processes in process group *pgid*."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append((int(entry.name), comm))
    return members


def _stop_vm(proc: subprocess.Popen[bytes]) -> None:
    """Stop QEMU, so that vng and virtme-run reap it and exit; then anything left.

    vng runs in its own process group.  Signalling QEMU first lets its parents
    exit normally instead of leaving zombies behind.
    """
    for pid, comm in _group_members(proc.pid):
        if comm.startswith("qemu-system"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            proc.wait(10.0)
            break
        except subprocess.TimeoutExpired:
            continue
    if _group_members(proc.pid):  # whatever vng left behind holds our pipes
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _note(msg: str) -> None:
    print(f"kvmlu vm: {msg}", file=sys.stderr, flush=True)


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _explain_missing_status(opts: VmOptions, console: Path) -> None:
    try:
        lines = console.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    if lines:
        _note(f"last lines of {console}:")
        for line in lines[-40:]:
            print(f"  {line}", file=sys.stderr)
    for finding in klog.scan(lines):
        _note(f"console: {finding}")


def evaluate(status: dict[str, Any], vng_status: int) -> int:
    """Exit status of a run whose guest wrote *status*; explain any failure."""
    command_status = status.get("command_status")
    problems = 0
    for key, what in (
        ("setup_errors", "setup error"),
        ("rmmod_errors", "module did not unload (leaked objects?)"),
        ("klog_findings", "kernel log"),
    ):
        for item in status.get(key) or []:
            _note(f"{what}: {item}")
            problems += 1
    if command_status is None:
        _note("COMMAND was not run")
    elif command_status != 0:
        _note(f"COMMAND failed with exit status {command_status}")
        return int(command_status)
    if problems or command_status is None:
        return EXIT_CHECK_FAILED
    if vng_status != 0:
        _note(f"guest reported success but vng exited {vng_status}")
        return EXIT_CHECK_FAILED
    return 0


#: The guest runner's first line: once it is in guest.log, kvmlu's own
#: code runs in the guest.
RUNNER_STARTED = f"kvmlu-guest: {guest.STARTED} ".encode()
#: Boots again when the kernel panicked before the runner started.
EARLY_PANIC_RETRIES = 1


def died_before_runner(console: Path, guest_log: Path, end: BootEnd) -> bool:
    """True if the kernel panicked or locked up before the guest runner said a word.

    Such a boot ran none of kvmlu's code: the modules were not loaded and
    no test had started. Under TCG it happens now and then while the
    kernel live-patches its own code at boot (an ``Oops: int3`` at a
    static-branch site, seen with Debian's 7.3 on QEMU 7.2's TCG).
    """
    try:
        said = RUNNER_STARTED in guest_log.read_bytes()
        text = console.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return not said and (end == "lockup" or "Kernel panic" in text)


#: How a boot ended: vng exited, --timeout passed, or the guest locked up.
BootEnd = Literal["exit", "timeout", "lockup"]


def _boot(opts: VmOptions, argv: list[str], env: dict[str, str]) -> tuple[int, BootEnd]:
    """One boot: stream its output into the results folder; (vng's status,
    how it ended). QEMU is stopped after --timeout, or as soon as the console
    shows a CPU stuck for good (:class:`LockupWatch`). Raises KeyboardInterrupt after
    stopping QEMU."""
    results = opts.results_dir
    for name in ("status.json", "status.json.tmp", "kmsg.log", "console.log", "guest.log"):
        (results / name).unlink(missing_ok=True)
    end: BootEnd = "exit"
    watch = LockupWatch()
    with (
        open(results / "guest.log", "wb") as guest_log,
        open(results / "console.log", "wb") as console_log,
    ):
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        err_sinks: list[Any] = [console_log, watch]
        if opts.console:
            err_sinks.append(sys.stderr.buffer)
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, [sys.stdout.buffer, guest_log])),
            threading.Thread(target=_pump, args=(proc.stderr, err_sinks)),
        ]
        for t in pumps:
            t.start()
        deadline = time.monotonic() + opts.timeout
        try:
            while True:
                try:
                    vng_status = proc.wait(max(0.0, min(1.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    pass
                if watch.line is not None:
                    end = "lockup"
                    _note(f"the guest locked up ({watch.line}): stopping QEMU")
                elif time.monotonic() >= deadline:
                    end = "timeout"
                    _note(f"timed out after {opts.timeout:g} s: stopping QEMU")
                else:
                    continue
                _stop_vm(proc)
                vng_status = proc.returncode
                break
        except KeyboardInterrupt:
            _note("interrupted: stopping QEMU")
            _stop_vm(proc)
            for t in pumps:
                t.join()
            raise
        for t in pumps:
            t.join()
    return vng_status, end


def run(opts: VmOptions) -> int:
    """Boot the VM, stream its output, return COMMAND's exit status (see module doc).

    A boot whose kernel panicked or locked up before the guest runner
    started (nothing of kvmlu's ran) is booted again, at most
    :data:`EARLY_PANIC_RETRIES` times; its console is kept as
    ``console-panic-N.log``.
    """
    results = opts.results_dir
    results.mkdir(parents=True, exist_ok=True)
    opts.scratch_file.unlink(missing_ok=True)
    if opts.scratch_mb:
        with open(opts.scratch_file, "wb") as f:
            f.truncate(opts.scratch_mb << 20)
    console = results / "console.log"
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(opts.vng.parent), env.get("PATH", "")])
    argv = build_command(opts)
    started = time.monotonic()
    for attempt in range(EARLY_PANIC_RETRIES + 1):
        try:
            vng_status, end = _boot(opts, argv, env)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        status = _read_status(opts.status_file)
        if status is not None or end == "timeout" or attempt == EARLY_PANIC_RETRIES:
            break
        if not died_before_runner(console, results / "guest.log", end):
            break
        kept = results / f"console-panic-{attempt + 1}.log"
        console.replace(kept)
        for finding in klog.scan(kept.read_text(encoding="utf-8", errors="replace").splitlines()):
            _note(f"console: {finding}")
        what = "locked up" if end == "lockup" else "panicked"
        _note(f"the kernel {what} before the guest runner started ({kept}): booting again")
    if status is None:
        if end == "timeout":
            _note(f"the VM timed out after {opts.timeout:g} s; no status from the guest")
        elif end == "lockup":
            _note(f"a guest CPU was stuck for {LOCKUP_FATAL_S} s or more; no status from the guest")
        else:
            _note(
                f"the guest wrote no {opts.status_file} (kernel panic, crash or boot "
                f"failure?); vng exited {vng_status}"
            )
        _explain_missing_status(opts, console)
        _note(f"kernel console: {console}")
        return EXIT_TIMEOUT if end == "timeout" else EXIT_NO_STATUS
    rc = evaluate(status, vng_status)
    _note(
        f"{'PASS' if rc == 0 else 'FAIL'} (exit status {rc}) after "
        f"{time.monotonic() - started:.0f} s; results in {results}"
    )
    return rc


def module_vermagic(path: Path) -> str | None:
    """The vermagic string of a module file, or None if it has none."""
    match = re.search(rb"vermagic=([^\0]*)\0", path.read_bytes())
    return match.group(1).decode(errors="replace") if match else None


def check_modules(modules: Sequence[Path], kernel: KernelInfo) -> None:
    """Raise VmError unless every module exists and was built for *kernel*."""
    for module in modules:
        if not module.is_file():
            raise VmError(f"module {module} not found (build it with make -C kmod)")
        built_for = (module_vermagic(module) or "").split()[:1]
        if built_for and built_for[0] != kernel.version:
            raise VmError(f"{module} was built for {built_for[0]}, the VM boots {kernel.version}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``kvmlu vm`` to *parser*; COMMAND lands in ``args.command``."""
    parser.add_argument(
        "--kernel",
        metavar="VERSION",
        help="kernel release or kernel build tree (default: the one the modules were "
        "built for, else the newest installed)",
    )
    parser.add_argument(
        "--accel",
        choices=["tcg", "kvm"],
        default="tcg",
        help="QEMU accelerator (default: %(default)s)",
    )
    parser.add_argument(
        "--tcg-threads",
        choices=["single", "multi"],
        default=DEFAULT_TCG_THREADS,
        help="under TCG, all vCPUs on one host thread or one thread each "
        "(default: %(default)s; see pyctl.vm.DEFAULT_TCG_THREADS)",
    )
    parser.add_argument(
        "--edu",
        type=int,
        default=DEFAULT_EDU,
        metavar="N",
        help="number of edu PCI functions (default: %(default)s)",
    )
    parser.add_argument(
        "--memory",
        type=int,
        default=DEFAULT_MEMORY_MB,
        metavar="MB",
        help="guest memory in MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        default=DEFAULT_CPUS,
        metavar="N",
        help="guest vCPUs (default: %(default)s)",
    )
    parser.add_argument(
        "--cpu",
        dest="cpu_model",
        default=DEFAULT_CPU_MODEL,
        metavar="MODEL",
        help="QEMU CPU model; max is AMD-vendor with SVM under TCG, so /dev/kvm "
        "works inside (default: %(default)s)",
    )
    parser.add_argument(
        "--module",
        dest="modules",
        type=Path,
        action="append",
        metavar="PATH.ko",
        help="module to load, in order (repeatable; default: the built kvmlu modules)",
    )
    parser.add_argument("--no-modules", action="store_true", help="load no module")
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        metavar="DIR",
        help="results folder shared with the guest (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="kill the VM after this long (default: %(default)s)",
    )
    parser.add_argument(
        "--append",
        dest="kernel_append",
        action="append",
        default=[],
        metavar="PARAM",
        help="extra guest kernel parameter (repeatable)",
    )
    parser.add_argument(
        "--rodir",
        dest="rodirs",
        action="append",
        default=[],
        metavar="PATH|GUEST=HOST",
        help="share a host folder read-only, e.g. one the guest hides under a tmpfs "
        "such as /var/cache (repeatable)",
    )
    parser.add_argument(
        "--require-kmemleak",
        action="store_true",
        help="fail unless the guest kernel's kmemleak is on and scans after the run",
    )
    parser.add_argument(
        "--env",
        dest="vm_env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for COMMAND in the guest (repeatable)",
    )
    parser.add_argument(
        "--console",
        action="store_true",
        help="also show the kernel console (always kept in console.log)",
    )
    parser.add_argument(
        "--scratch-disk",
        dest="scratch_mb",
        type=int,
        default=0,
        metavar="MB",
        help="attach a scratch virtio disk of this size (serial kvmlu-scratch)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the vng command and exit")
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="command to run in the guest",
    )


def options_from_args(args: argparse.Namespace) -> VmOptions:
    """Turn parsed ``kvmlu vm`` arguments into VmOptions (raises VmError)."""
    command = args.command
    if isinstance(command, str):
        raise VmError("args.command must be the COMMAND list (is the subparsers dest 'command'?)")
    command = list(command or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if not args.cpu_model or any(c.isspace() for c in args.cpu_model):
        raise VmUsageError(f"--cpu {args.cpu_model!r}: a QEMU CPU model has no spaces")
    for item in args.vm_env:
        if "=" not in item:
            raise VmUsageError(f"--env {item!r}: expected KEY=VALUE")
    if (
        args.edu < 0
        or args.memory <= 0
        or args.cpus <= 0
        or args.timeout <= 0
        or args.scratch_mb < 0
    ):
        raise VmUsageError("--edu, --memory, --cpus and --timeout must be positive")
    if args.no_modules:
        modules: list[Path] = []
    elif args.modules:
        modules = [m.resolve() for m in args.modules]
    else:
        modules = [CHECKOUT / m for m in DEFAULT_MODULES if (CHECKOUT / m).is_file()]
    # Without --kernel, the kernel the modules were built for, if installed.
    first = modules[0] if modules and modules[0].is_file() else None
    built_for = (module_vermagic(first) or "").split()[:1] if first else []
    kernel = find_kernel(args.kernel, prefer=built_for[0] if built_for else None)
    check_modules(modules, kernel)
    return VmOptions(
        kernel=kernel,
        command=command,
        accel=args.accel,
        tcg_threads=args.tcg_threads,
        edu=args.edu,
        memory_mb=args.memory,
        cpus=args.cpus,
        cpu_model=args.cpu_model,
        modules=modules,
        results_dir=args.results.resolve(),
        timeout=args.timeout,
        kernel_append=list(args.kernel_append),
        rodirs=[*args.rodirs, *kernel_rodirs(kernel)],
        env=list(args.vm_env),
        console=args.console,
        scratch_mb=args.scratch_mb,
        require_kmemleak=args.require_kmemleak,
        vng=find_vng(),
    )


def main(args: argparse.Namespace) -> int:
    """Run ``kvmlu vm`` with parsed arguments; return the exit status."""
    try:
        opts = options_from_args(args)
    except VmUsageError as e:
        _note(f"error: {e}")
        return EXIT_USAGE
    except VmError as e:
        _note(f"error: {e}")
        return EXIT_SETUP
    if args.dry_run:
        print(shlex.join(build_command(opts)))
        return 0
    if not opts.command:
        _note("no COMMAND: the guest only loads and unloads the modules")
    return run(opts)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m pyctl.vm", description="Boot the kvmlu test VM and run COMMAND in it."
    )
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
