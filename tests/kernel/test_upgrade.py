"""The live upgrade (``kvmlu upgrade``): test VMMs with vCPU threads under real MSIs.

Every run upgrades a running VMM several times while the edu devices raise
MSIs the whole time, and in every upgrade one more MSI is raised while no
VMM runs (the old one has saved, the new one has not started its vCPUs).
The checker then compares every raise with every SYNC of every VMM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyctl.edu import Edu
from pyctl.kvmlu import Device
from pyctl.livevmm import LiveVmm, Optimisations
from pyctl.upgrade import LAND_TIMEOUT, RunResult, Zygote, close_edus, open_edus, run, targets_for

UPGRADES = 4


@pytest.fixture
def edus() -> Iterator[list[Edu]]:
    devs = open_edus(3)
    try:
        yield devs
    finally:
        close_edus(devs)


def upgrade_run(
    edus: list[Edu],
    strategy: str,
    opts: str = "all",
    *,
    vcpus: int = 8,
    upgrades: int = UPGRADES,
    vapic: int = 2,
    faults: dict[int, str] | None = None,
    quiet: bool = False,
) -> RunResult:
    return run(
        edus,
        vcpus,
        strategy,
        Optimisations.parse(opts),
        upgrades,
        vapic=vapic,
        faults=faults,
        raise_in_window=True,
        quiet_upgrades=quiet,
    )


def assert_clean(r: RunResult, upgrades: int = UPGRADES) -> None:
    assert r.report.ok, r.report.text()
    assert len(r.downtimes) == upgrades
    assert not any(d.rolled_back for d in r.downtimes)
    # Every upgrade raised one in the window, and the vCPUs took them.
    assert r.raises >= upgrades and r.report.total("delivered") > 0
    assert r.acked > 0


def test_targets_spread_over_the_vcpus() -> None:
    assert targets_for(88, 3) == [(0, 0x41), (43, 0x62), (87, 0x73)]
    assert targets_for(1, 1) == [(0, 0x41)]


@pytest.mark.parametrize(
    "opts",
    [
        "all",
        "none",
        "no-prestart",
        "no-concurrent",
        "no-keep-eventfds",
        "no-realtime",
        "no-keep-vapic",
    ],
)
def test_shared_loses_and_invents_nothing(edus: list[Edu], opts: str) -> None:
    r = upgrade_run(edus, "shared", opts)
    assert_clean(r)
    for d in r.downtimes:
        ph = d.phases_ms()
        assert all(v >= 0 for v in ph.values()), ph
        assert d.total_ms == pytest.approx(sum(ph.values()))
    # The vAPIC object is handed over only when asked for and only when the
    # new VMM prepared before the old one saved its state.
    o = Optimisations.parse(opts)
    handed = o.keep_vapic and o.prestart
    assert [d.vapic_handed for d in r.downtimes] == [handed] * UPGRADES


def test_shared_with_88_vcpus(edus: list[Edu]) -> None:
    assert_clean(upgrade_run(edus, "shared", vcpus=88, upgrades=2), 2)


def test_runs_share_one_zygote(edus: list[Edu]) -> None:
    # kvmlu bench forks every run's VMMs from one zygote: it must outlive a run.
    zygote = Zygote()
    try:
        for strategy in ("shared", "naive"):
            r = run(
                edus, 8, strategy, Optimisations.parse("all"), 2, zygote=zygote, quiet_upgrades=True
            )
            assert r.report.ok, r.report.text()
            assert zygote.proc.poll() is None
            # Every raise landed, and the slowest landing is on record.
            assert r.unlanded == 0
            assert 0 < r.land_ms_max < LAND_TIMEOUT * 1e3
    finally:
        zygote.close()
    assert zygote.proc.returncode == 0


def test_shared_on_vapic_v1(edus: list[Edu]) -> None:
    r = upgrade_run(edus, "shared", vapic=1)
    assert_clean(r)
    assert all(d.vapic_handed for d in r.downtimes)


@pytest.mark.parametrize("version, handed", [(2, True), (1, False), (None, False)])
def test_vapic_object_goes_only_to_a_vmm_of_its_version(
    edus: list[Edu], version: int | None, handed: bool
) -> None:
    vmm = LiveVmm("shared", 2, Optimisations())
    try:
        vmm.setup([os.dup(e.vfio.fd) for e in edus], targets_for(8, len(edus)), 8)
        manifest, fds = vmm.export(version)
        assert ("vapic" in manifest["names"]) == handed
        assert vmm.vapic is not None and (vmm.vapic.fd in fds) == handed
        assert manifest["vapic_version"] == 2
    finally:
        vmm.release()


def test_vmm_of_another_version_refuses_a_handed_vapic(edus: list[Edu]) -> None:
    old = LiveVmm("shared", 2, Optimisations())
    new = LiveVmm("shared", 1, Optimisations())
    try:
        old.setup([os.dup(e.vfio.fd) for e in edus], targets_for(8, len(edus)), 8)
        manifest, fds = old.export(2)
        dup = [os.dup(fd) for fd in fds]
        try:
            with pytest.raises(ValueError, match="v2 object was handed to a v1 VMM"):
                new.prepare(manifest, dup)
            # Refused before it adopted anything.
            assert new.table is None and new.vapic is None and not new.devices
        finally:
            for fd in dup:
                os.close(fd)
    finally:
        old.release()


def test_naive_loses_what_lands_in_the_window(edus: list[Edu]) -> None:
    # Quiet upgrades: a loss shows as a SYNC that finds nothing after the
    # window's raise. With the stream running, the device's next raise of the
    # same vector could land before the new vCPU's first SYNC and make the
    # lost raise look coalesced with it (seen once the window got short).
    r = upgrade_run(edus, "naive", quiet=True)
    assert r.report.lost >= UPGRADES, r.report.text()


def test_inject_invents_interrupts(edus: list[Edu]) -> None:
    # Quiet upgrades: only the window's raise is pending, so at least two of
    # the three injected vectors stand for nothing the device raised.
    r = upgrade_run(edus, "inject", quiet=True)
    assert r.report.lost == 0, r.report.text()
    assert r.report.spurious + r.report.duplicated > 0, r.report.text()


def test_cpr_invents_nothing(edus: list[Edu]) -> None:
    # The window's raise comes after the unbind, so the eventfd counter
    # carries it; only what lands between the PIR sync and the unbind can be
    # lost, and that depends on timing.
    r = upgrade_run(edus, "cpr")
    assert r.report.spurious == 0 and r.report.duplicated == 0, r.report.text()
    assert r.report.total("delivered") > 0


@pytest.mark.parametrize("opts", ["all", "no-prestart"])
def test_new_vmm_that_fails_to_start_rolls_back(edus: list[Edu], opts: str) -> None:
    r = upgrade_run(edus, "shared", opts, faults={1: "start"})
    assert r.report.ok, r.report.text()
    assert [d.rolled_back for d in r.downtimes] == [False, True, False, False]


@pytest.mark.parametrize("opts", ["all", "none"])
def test_new_vmm_that_dies_in_the_load_rolls_back(edus: list[Edu], opts: str) -> None:
    r = upgrade_run(edus, "shared", opts, faults={0: "load", 2: "load"})
    assert r.report.ok, r.report.text()
    assert [d.rolled_back for d in r.downtimes] == [True, False, True, False]


def test_old_vmm_that_dies_after_the_save_is_replaced_from_a_session(edus: list[Edu]) -> None:
    r = upgrade_run(edus, "shared", faults={1: "old"})
    assert_clean(r)
    with Device() as dev:
        assert dev.list_sessions() == []


def test_old_vmm_dies_after_a_failed_start_still_saves_its_vapic(edus: list[Edu]) -> None:
    # The failed start was handed the vAPIC object and never ran; the next
    # upgrade (the old VMM killed after its save) hands nothing over, so
    # the old VMM must save its vAPIC blob for the session again.
    r = upgrade_run(edus, "shared", faults={0: "start", 1: "old"})
    assert r.report.ok, r.report.text()
    assert [d.rolled_back for d in r.downtimes] == [True, False, False, False]
    with Device() as dev:
        assert dev.list_sessions() == []
