"""A real guest counts the MSIs of a passed-through edu function.

The test VM is the guest's host (nested KVM: ``-cpu max``, kvm_amd; or
TCG). For each
interrupt path, one boot of Debian's kernel with ``edu_count.ko``
(``pyctl.qemu``) takes the last edu function through vfio-pci; the test VM
raises MSIs through the function's sysfs BAR, each once the guest has
counted the previous one, and the guest must count exactly as many. ``on``
takes KVM's irqfd path; ``off`` QEMU's own eventfd handler and userspace
APIC; ``kvmlu`` the same APIC with the MSIs posted by kvmlu's binding at
interrupt time, where kvmlu's own counters must also show every MSI posted.

``KVMLU_QEMU`` picks the QEMU (default: ``make qemu``'s build in the
checkout, which has the kvmlu backend and runs ``off`` under KVM with
``x-userspace-lapic``; else Debian's 7.2, which skips ``kvmlu``);
``KVMLU_QEMU_PATHS`` the paths, each under the test VM's KVM or under TCG
(default ``off@tcg,kvmlu@tcg``, see :data:`PATHS`). With the kvmlu path, one more
boot (under TCG) points the kvmlu object at a device node that does not
exist. The inner guest's logs and a JSON report per path go to the results
folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyctl.qemu import guest as qguest
from pyctl.qemu import reprogram
from pyctl.qemu import run as qrun
from pyctl.qemu.check import ModeReport, run_mode, workdir

RAISES = 100
GUEST_RAISES = 50
#: MSIs raised after each of the guest's changes to its MSI (pyctl.qemu.reprogram).
REPROGRAM_RAISES = 10
#: The notification vector patch 0004's kvmlu object writes into NV.
QEMU_NOTIFY_VECTOR = 0xF2
#: The kvmlu object's device node in the boot that checks the fallback.
ABSENT_DEVICE = "/dev/kvmlu-absent"
FALLBACK_RAISES = 20
#: QEMU's warnings that are expected: x-userspace-lapic brings back what
#: QEMU deprecates (two lines). Nothing of kvmlu's: when the guest turns its
#: MSI off and on (--reprogram), Linux first writes an all-zero message,
#: a memory write that patch 0005 leaves to QEMU without a warning.
EXPECTED_WARNINGS = (
    "Userspace local APIC is deprecated for KVM",
    "Do not use kernel-irqchip except for the -M isapc machine type",
)
BOOT_TIMEOUT = 600.0

QEMU = Path(os.environ.get("KVMLU_QEMU") or qrun.default_qemu())
#: The paths to boot, each ``MODE`` or ``MODE@tcg``: a kernel-irqchip mode
#: or ``kvmlu``, with the inner guest under the test VM's KVM (nested) or,
#: with ``@tcg``, under TCG. KVM nested in TCG lost guests here: with QEMU's
#: own APIC (``off``) it once brought the whole test VM down, two-vCPU
#: guests were reset or did not boot, and in one suite run a one-vCPU ``on``
#: guest stopped answering right after it booted (docs/qemu-notes.md).
#: Under TCG the inner guest has no nested SVM to trip over and boots two
#: vCPUs in about 85 s. So the kernel suite boots ``off`` (QEMU's own
#: eventfd handler and APIC) and ``kvmlu`` under TCG with two vCPUs, where
#: the guest also moves its MSI between them; ``make test-qemu`` boots on,
#: off and kvmlu under nested KVM (two vCPUs, ``off`` one) and kvmlu@tcg.
PATHS = [p for p in os.environ.get("KVMLU_QEMU_PATHS", "off@tcg,kvmlu@tcg").split(",") if p]
#: vCPUs under KVM: ``KVMLU_QEMU_CPUS`` (default 1); ``off`` keeps one (with
#: two it did not finish booting within BOOT_TIMEOUT, twice here).
_KVM_CPUS = int(os.environ.get("KVMLU_QEMU_CPUS", "1"))
#: vCPUs under TCG.
TCG_CPUS = 2


def _path(param: str) -> tuple[qrun.Mode, qrun.Accel, int]:
    """``MODE[@tcg]`` -> (mode, accel, vCPUs)."""
    mode, _, accel = param.partition("@")
    if accel == "tcg":
        return mode, "tcg", TCG_CPUS  # type: ignore[return-value]
    return mode, "kvm", 1 if mode == "off" else _KVM_CPUS  # type: ignore[return-value]


def _skip_reason() -> str | None:
    if not Path("/dev/kvm").exists():
        return "no /dev/kvm in the test VM (a CPU without SVM/VMX? see kvmlu vm --cpu)"
    if not qguest.EDU_COUNT_KO.is_file():
        return f"{qguest.EDU_COUNT_KO} is not built (make guest-module)"
    if not os.access(QEMU, os.X_OK):
        return f"no QEMU at {QEMU}"
    if not os.environ.get("KVMLU_EDU"):
        return "no edu function on vfio-pci"
    return None


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    return qguest.build_initramfs(tmp_path_factory.mktemp("inner") / "initramfs.cpio")


@pytest.fixture(scope="module", params=PATHS)
def booted(request: pytest.FixtureRequest, initrd: Path) -> Iterator[ModeReport]:
    """One inner guest boot on one interrupt path, with every step done."""
    mode, accel, cpus = _path(request.param)
    irqchip, kvmlu, userspace_lapic, problem = qrun.mode_settings(mode, QEMU)
    if problem:
        pytest.skip(problem)
    release = qguest.module_release(qguest.EDU_COUNT_KO)
    results = Path(os.environ.get("KVMLU_RESULTS") or workdir())
    opts = qrun.InnerOptions(
        bdf=os.environ["KVMLU_EDU"].split(",")[-1],
        kernel=qrun.find_kernel_image(release),
        initrd=initrd,
        workdir=workdir() / request.param.replace("@", "-"),
        irqchip=irqchip,
        kvmlu=kvmlu,
        userspace_lapic=userspace_lapic,
        qemu=QEMU,
        cpus=cpus,
        accel=accel,
    )
    rep = run_mode(
        opts,
        RAISES,
        GUEST_RAISES,
        boot_timeout=BOOT_TIMEOUT,
        keep_logs=results,
        reprogram_raises=REPROGRAM_RAISES,
    )
    name = request.param.replace("@", "-")
    (results / f"qemu-guest-{name}.json").write_text(json.dumps(rep.to_json(), indent=2))
    print(f"\n{rep.text()}")
    yield rep


def test_inner_guest_boots_and_binds_edu(booted: ModeReport) -> None:
    # Verifies: QEMU starts under nested KVM, the guest's control loop answers
    # and edu_count bound the passed-through function.
    assert booted.error is None, booted.text()
    assert booted.guest_bdf, booted.text()


@pytest.fixture(scope="module")
def fallback(initrd: Path) -> ModeReport:
    """A boot with the kvmlu object whose device node does not exist."""
    if not any(p.startswith("kvmlu") for p in PATHS):
        pytest.skip("the kvmlu path is not among KVMLU_QEMU_PATHS")
    irqchip, kvmlu, userspace_lapic, problem = qrun.mode_settings("kvmlu", QEMU)
    if problem:
        pytest.skip(problem)
    results = Path(os.environ.get("KVMLU_RESULTS") or workdir())
    opts = qrun.InnerOptions(
        bdf=os.environ["KVMLU_EDU"].split(",")[-1],
        kernel=qrun.find_kernel_image(qguest.module_release(qguest.EDU_COUNT_KO)),
        initrd=initrd,
        workdir=workdir() / "kvmlu-nodev",
        irqchip=irqchip,
        kvmlu=kvmlu,
        kvmlu_path=ABSENT_DEVICE,
        userspace_lapic=userspace_lapic,
        qemu=QEMU,
        # QEMU's own delivery, as off: under TCG (see PATHS).
        accel="tcg",
    )
    rep = run_mode(opts, FALLBACK_RAISES, 0, boot_timeout=BOOT_TIMEOUT, keep_logs=results)
    print(f"\n{rep.text()}")
    return rep


def test_qemu_holds_kvmlu_descriptors_only_on_the_kvmlu_path(booted: ModeReport) -> None:
    # Verifies: without the kvmlu object QEMU opens nothing of kvmlu's (no
    # /dev/kvmlu, no table, no binding); with it, one device, one table and
    # a binding; QEMU warns of nothing but EXPECTED_WARNINGS.
    fds = booted.qemu_kvmlu_fds
    assert fds is not None, booted.text()
    if booted.mode == "kvmlu":
        assert fds["device"] == fds["table"] == 1 and fds["binding"] >= 1, booted.text()
    else:
        assert fds == {"device": 0, "table": 0, "binding": 0}, booted.text()
    unexpected = [w for w in booted.qemu_warnings if not any(x in w for x in EXPECTED_WARNINGS)]
    assert unexpected == [], booted.text()


def test_without_the_kvmlu_device_qemu_delivers_itself(fallback: ModeReport) -> None:
    # Verifies: with the kvmlu object but no device node, QEMU says once
    # that the vector is delivered by QEMU, holds no kvmlu descriptor, kvmlu
    # sees no signal, and the guest still counts every MSI exactly once.
    r = fallback.host_raises
    assert fallback.error is None and r is not None, fallback.text()
    assert r.counted == r.raised == FALLBACK_RAISES and r.timeouts == 0, fallback.text()
    assert fallback.qemu_kvmlu_fds == {"device": 0, "table": 0, "binding": 0}, fallback.text()
    assert fallback.kvmlu is not None and fallback.kvmlu["signals"] == 0, fallback.text()
    said = [w for w in fallback.qemu_warnings if "is delivered by QEMU" in w]
    assert len(said) == 1 and ABSENT_DEVICE in said[0], fallback.text()
    assert fallback.klog_findings == [], fallback.text()
    assert fallback.absent_device == ABSENT_DEVICE and fallback.ok, fallback.text()


def test_kvmlu_descriptors_agree_with_what_the_guest_counted(booted: ModeReport) -> None:
    # Verifies: on the kvmlu path QEMU holds one table with a descriptor per
    # vCPU, read through the table's mapping after the guest counted every
    # MSI: nothing is left pending (PIR empty, ON clear: each MSI the
    # binding posted was taken into the APIC), SN clear, and each descriptor
    # notifies QEMU's vector (NV) at its vCPU's APIC ID (NDST, the index here).
    if booted.mode != "kvmlu":
        assert booted.descriptors is None
        pytest.skip("kvmlu keeps no descriptors on this path")
    assert booted.descriptors is not None and len(booted.descriptors) == 1, booted.text()
    [table] = booted.descriptors
    assert [d["vcpu"] for d in table] == list(range(booted.cpus)), table
    for d in table:
        assert d["pir"] == [] and not d["on"] and not d["sn"], table
        assert d["nv"] == QEMU_NOTIFY_VECTOR and d["ndst"] == d["vcpu"], table


def test_guest_counts_every_msi_raised_through_the_bar(booted: ModeReport) -> None:
    # Verifies: N MSIs raised by the nested host, spaced so none coalesce, are
    # counted exactly N times by the guest: none lost, none extra.
    r = booted.host_raises
    assert r is not None, booted.text()
    assert r.timeouts == 0, booted.text()
    assert r.counted == r.raised == RAISES, booted.text()


def test_guest_moves_masks_and_turns_off_its_msi(booted: ModeReport) -> None:
    # Verifies: the guest points its MSI at CPU 1 and back, disables the IRQ
    # and turns MSI off and on; after each change every MSI raised by the
    # nested host is counted exactly once, on the CPU the guest chose. An MSI
    # raised while the IRQ is disabled does not run the handler until it is
    # enabled, then runs it once. On the kvmlu path QEMU's one active binding
    # posts exactly the vector and vCPU the guest programmed, none is active
    # while MSI is off, and kvmlu consumed one signal per raise.
    cpus = booted.cpus
    names = [name for name, _ in reprogram.phases_for(cpus)]
    assert [ph.name for ph in booted.phases] == names, booted.text()
    assert all(ph.ok for ph in booted.phases), booted.text()
    by_name = {ph.name: ph for ph in booted.phases}
    if cpus > 1:
        moved = by_name["moved to CPU 1"]
        assert moved.handler_cpu == 1 and moved.counted == REPROGRAM_RAISES, booted.text()
    masked = by_name["raised while masked"]
    assert masked.held and masked.counted == 1, booted.text()
    if booted.mode == "kvmlu":
        assert all(ph.bindings for ph in booted.phases), booted.text()
        assert by_name["MSI off, then on"].off_bindings is not None, booted.text()


def test_guest_raised_msis_all_arrive(booted: ModeReport) -> None:
    # Verifies: each MSI the guest raises itself reaches its handler, timed.
    assert len(booted.guest_raise_ns) == GUEST_RAISES, booted.text()
    assert all(ns > 0 for ns in booted.guest_raise_ns), booted.guest_raise_ns


def test_inner_guest_kernel_log_is_clean(booted: ModeReport) -> None:
    # Verifies: the guest's kernel log (dmesg, and the console) shows no BUG,
    # WARNING, Oops or other report.
    assert booted.klog_lines > 0, booted.text()
    assert booted.klog_findings == [], booted.text()


def test_kvmlu_posted_every_msi_the_guest_counted(booted: ModeReport) -> None:
    # Verifies: on the kvmlu path the function's vector is bound in the kernel
    # and kvmlu's binding consumed one eventfd signal per MSI the guest
    # counted, each a PIR rise or coalesced with one (no QEMU thread read the
    # eventfd); on the other paths kvmlu is not involved.
    if booted.mode != "kvmlu":
        assert booted.kvmlu is None
        return
    assert booted.kvmlu is not None, booted.text()
    assert booted.kvmlu["bindings"] >= 1, booted.text()
    r = booted.host_raises
    assert r is not None, booted.text()
    assert booted.kvmlu["signals"] == r.counted == RAISES, booted.text()
    assert booted.kvmlu["posted"] + booted.kvmlu["coalesced"] == RAISES, booted.text()
