"""The nested guest's QEMU live-upgraded with cpr-transfer while its device raises.

For each path (``KVMLU_QEMU_UPGRADE_PATHS``, default ``stock,kvmlu``: see
:data:`PATHS`), one inner guest boots ready for cpr-transfer and is upgraded
:data:`UPGRADES` times, each time to a new QEMU process
(:mod:`pyctl.qemu.cpr`): a few MSIs are raised between upgrades, each
counted before the next, and one inside every pause, held open until the
nested host has taken it, so the stream is quiet around it and coalescing
cannot hide a loss. Then, on the kvmlu path, three upgrades fail on
purpose. The guest's own count is the verdict. Reports go to the results folder as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pyctl.qemu import guest as qguest
from pyctl.qemu import run as qrun
from pyctl.qemu.check import workdir
from pyctl.qemu.upgrade_cli import PathReport, Plan, run_path

UPGRADES = int(os.environ.get("KVMLU_QEMU_UPGRADES", "20"))
#: How the inner guest runs: ``tcg`` (the default; under TCG stock
#: delivers through QEMU's own eventfd handler) or ``kvm`` (nested, stock
#: through KVM's irqfds; ``make test-qemu``). KVM nested in TCG lost guests
#: here (docs/qemu-notes.md), so the kernel suite does not depend on it.
ACCEL: qrun.Accel = "kvm" if os.environ.get("KVMLU_QEMU_ACCEL") == "kvm" else "tcg"
QEMU = Path(os.environ.get("KVMLU_QEMU") or qrun.default_qemu())
#: ``stock``: QEMU's own cpr-transfer (under KVM: kernel-irqchip=on and
#: KVM's irqfds); ``kvmlu``: QEMU's own APIC with the table and the bindings
#: handed over (docs/qemu-upgrade.md).
PATHS = [p for p in os.environ.get("KVMLU_QEMU_UPGRADE_PATHS", "stock,kvmlu").split(",") if p]


@pytest.fixture(scope="module", params=PATHS)
def upgraded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> PathReport:
    """One guest boot on one path, its upgrades and its faults."""
    if ACCEL == "kvm" and not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm in the test VM")
    if not os.environ.get("KVMLU_EDU"):
        pytest.skip("no edu function on vfio-pci")
    if not os.access(QEMU, os.X_OK):
        pytest.skip(f"no QEMU at {QEMU}")
    path: str = request.param
    work = workdir()
    initrd = qguest.build_initramfs(tmp_path_factory.mktemp("upg") / "initramfs.cpio")
    base = qrun.InnerOptions(
        bdf=os.environ["KVMLU_EDU"].split(",")[-1],
        kernel=qrun.find_kernel_image(qguest.module_release(qguest.EDU_COUNT_KO)),
        initrd=initrd,
        workdir=work,
        qemu=QEMU,
        accel=ACCEL,
    )
    # The faults run on the kvmlu path: what stock QEMU does then is reported
    # by kvmlu qemu-upgrade --faults (docs/qemu-upgrade.md), not required.
    plan = Plan(UPGRADES, between=3, hold=True, faults=path == "kvmlu")
    rep = run_path(path, plan, base, work)
    if rep.skipped:
        pytest.skip(rep.skipped)
    results = Path(os.environ.get("KVMLU_RESULTS") or work)
    for log in sorted((work / path).glob("gen-*/qemu.log")):
        (results / f"qemu-upgrade-{path}-{log.parent.name}-qemu.log").write_bytes(log.read_bytes())
    (results / f"qemu-upgrade-{path}.json").write_text(json.dumps(rep.to_json(), indent=2))
    print(f"\n{rep.text()}")
    for u in rep.upgrades + rep.faults:
        print(f"  {u.text()}")
    return rep


def test_every_upgrade_hands_the_guest_to_a_new_qemu(upgraded: PathReport) -> None:
    # Verifies: each of the upgrades ends with a new QEMU process running
    # the guest, and the guest answers through it.
    assert upgraded.error is None, upgraded.text()
    assert len(upgraded.upgrades) == UPGRADES, upgraded.text()
    assert [u.runner for u in upgraded.upgrades] == ["new"] * UPGRADES, upgraded.text()
    assert all(u.error is None for u in upgraded.upgrades), [u.text() for u in upgraded.upgrades]


def test_the_msi_raised_in_every_pause_is_counted_exactly_once(upgraded: PathReport) -> None:
    # Verifies: in every upgrade one MSI was raised while no QEMU ran the
    # guest, the nested host took it inside the pause, and the guest counted
    # it exactly once after the new QEMU started: none lost, none extra.
    ups = upgraded.upgrades
    assert [u.window_raises for u in ups] == [1] * len(ups), [u.text() for u in ups]
    assert [u.counted for u in ups] == [1] * len(ups), [u.text() for u in ups]
    assert all(u.pause_ms is not None and u.pause_ms > 0 for u in ups)


def test_msis_between_upgrades_are_all_counted(upgraded: PathReport) -> None:
    # Verifies: the MSIs raised between upgrades, spaced, are counted exactly.
    assert upgraded.between_raised == 3 * (UPGRADES + 1), upgraded.text()
    assert upgraded.between_counted == upgraded.between_raised, upgraded.text()


def test_kvmlu_hand_over_makes_no_table_or_binding(upgraded: PathReport) -> None:
    # Verifies: on the kvmlu path the new QEMU adopts the table and the
    # bindings: kvmlu's global counts of tables and bindings are the same
    # before and after every upgrade; the stock path creates none at all.
    for u in upgraded.upgrades:
        assert u.kvmlu_before == u.kvmlu_after, u.text()
        if upgraded.path == "stock":
            assert u.kvmlu_before == {"tables": 0, "bindings": 0}, u.text()


@pytest.mark.parametrize("fault", ["new-fails", "new-dies", "old-dies"])
def test_a_failed_kvmlu_upgrade_loses_nothing(upgraded: PathReport, fault: str) -> None:
    # Verifies: when the new QEMU does not start or dies while loading, the
    # old QEMU runs the guest on; when the old one dies after its save, the
    # new one completes; either way the MSI raised meanwhile is counted once.
    if upgraded.path != "kvmlu":
        pytest.skip("the faults run on the kvmlu path only")
    [u] = [f for f in upgraded.faults if f.fault == fault]
    assert u.error is None and u.ok, u.text()
    assert u.runner == ("new" if fault == "old-dies" else "old"), u.text()
    assert u.window_raises == 1 and u.counted == 1, u.text()


def test_nothing_is_left_over(upgraded: PathReport) -> None:
    # Verifies: once the last QEMU powered the guest off, no kvmlu table or
    # binding is left in the kernel.
    assert upgraded.kvmlu_before is not None, "kvmlu.ko is loaded in the test VM"
    assert upgraded.kvmlu_after == upgraded.kvmlu_before, upgraded.text()
