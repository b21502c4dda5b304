"""Real MSIs from QEMU's edu devices, through vfio-pci and interrupt remapping, into bindings."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from kutil import eventfd_count, wait_readable, wait_until

from pyctl.edu import EDU_ID_LOW, Edu, find_vfio_edu
from pyctl.kvmlu import Binding, Device

TIMEOUT = 10.0
STORM_SECONDS = 3.0  # the storm lasts at least this long,
STORM_RAISES = 100  # and until each device raised this many times;
STORM_HANG_SECONDS = 600.0  # a guard only: a storm that makes no progress


@pytest.fixture
def edus() -> Iterator[list[Edu]]:
    """Two edu functions opened through VFIO, each with its MSI on its own eventfd."""
    bdfs = find_vfio_edu()
    assert len(bdfs) >= 2, f"the test VM has two edu devices on vfio-pci, found {bdfs}"
    devs: list[Edu] = []
    try:
        for bdf in bdfs[:2]:
            devs.append(Edu(bdf))
            devs[-1].enable_msi()
        yield devs
    finally:
        for d in devs:
            if d.msi_eventfd is not None:
                try:
                    d.disable_msi()
                finally:
                    os.close(d.msi_eventfd)
            d.close()


def signals(b: Binding) -> int:
    return b.info().stats.signals


def raise_and_wait(edu: Edu, b: Binding) -> None:
    """Raise one MSI and wait until the binding has consumed it."""
    before = signals(b)
    edu.raise_irq()
    wait_until(lambda: signals(b) > before, TIMEOUT, f"the MSI of {edu.bdf}")


def test_edu_identifies() -> None:
    """The edu functions answer through a mapped BAR0."""
    for bdf in find_vfio_edu():
        with Edu(bdf) as e:
            assert e.ident & 0xFFFF == EDU_ID_LOW, hex(e.ident)


def test_msi_reaches_eventfd(edus: list[Edu]) -> None:
    """Without a binding, a raise signals the MSI eventfd (the path every VMM uses)."""
    e = edus[0]
    assert e.msi_eventfd is not None
    e.raise_irq()
    assert wait_readable(e.msi_eventfd, TIMEOUT), "no MSI arrived"
    assert eventfd_count(e.msi_eventfd) >= 1


def test_each_device_sets_its_own_bit(dev: Device, edus: list[Edu]) -> None:
    """Two devices bound to different (vCPU, vector) pairs: each raise sets exactly its bit."""
    a, b = edus
    assert a.msi_eventfd is not None and b.msi_eventfd is not None
    with (
        dev.create_table(4) as t,
        t.bind(a.msi_eventfd, 1, 0x51) as ba,
        t.bind(b.msi_eventfd, 3, 0xA3) as bb,
    ):
        raise_and_wait(a, ba)
        assert [t.pir(v) for v in range(4)] == [set(), {0x51}, set(), set()]
        raise_and_wait(b, bb)
        assert [t.pir(v) for v in range(4)] == [set(), {0x51}, set(), {0xA3}]
        assert t.fetch(1) == {0x51}
        assert t.fetch(3) == {0xA3}
        assert all(not t.view(v).pir and not t.view(v).on for v in range(4))


def test_one_notification_per_on_rise(dev: Device, edus: list[Edu]) -> None:
    """Raises while ON is set give no new notification; after a fetch the next one does."""
    e = edus[0]
    assert e.msi_eventfd is not None
    notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        with dev.create_table(2) as t, t.bind(e.msi_eventfd, 0, 0x60) as b:
            t.set_notify(0, notify, nv=0xF2, ndst=0)
            for _ in range(5):
                raise_and_wait(e, b)
            assert wait_readable(notify, TIMEOUT)
            wait_until(lambda: b.info().stats.notified == 1, TIMEOUT, "one ON rise")
            assert eventfd_count(notify) == 1
            assert t.fetch(0) == {0x60}
            raise_and_wait(e, b)
            assert wait_readable(notify, TIMEOUT)
            assert eventfd_count(notify) == 1
            assert b.info().stats.notified == 2
    finally:
        os.close(notify)


def test_sn_keeps_bit_without_notification(dev: Device, edus: list[Edu]) -> None:
    """With SN set an MSI sets the PIR bit, not ON, and nobody is signalled; fetch clears."""
    e = edus[1]
    assert e.msi_eventfd is not None
    notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        with dev.create_table(2) as t, t.bind(e.msi_eventfd, 1, 0x77) as b:
            t.set_notify(1, notify, nv=0xF2, ndst=1)
            t.set_sn(1, True)
            raise_and_wait(e, b)
            d = t.view(1)
            assert d.pir == {0x77}
            assert not d.on
            assert b.info().stats.suppressed == 1
            assert eventfd_count(notify) == 0
            assert t.fetch(1) == {0x77}
            assert not t.view(1).pir
    finally:
        os.close(notify)


def test_storm_nothing_lost_nothing_spurious(dev: Device, edus: list[Edu]) -> None:
    """Raisers on both devices race a fetching consumer; every rise is taken exactly once.

    The storm lasts STORM_SECONDS and until each device raised STORM_RAISES
    times, however slow the machine: its size is reached, not hoped for."""
    a, b = edus
    assert a.msi_eventfd is not None and b.msi_eventfd is not None
    targets = {0: (0, 0x45), 1: (1, 0xB2)}  # device -> (vCPU, vector)
    notifies = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
    raised: Counter[int] = Counter()
    taken: Counter[tuple[int, int]] = Counter()
    stop = threading.Event()
    errors: list[BaseException] = []
    try:
        with dev.create_table(2) as t:
            for v, fd in enumerate(notifies):
                t.set_notify(v, fd, nv=0xF2, ndst=v)
            binds = [t.bind(e.msi_eventfd, *targets[i]) for i, e in enumerate(edus)]  # type: ignore[arg-type]

            def raiser(i: int) -> None:
                rng = random.Random(i)
                try:
                    while not stop.is_set():
                        edus[i].raise_irq()
                        raised[i] += 1
                        if rng.random() < 0.01:
                            time.sleep(0.001)
                except BaseException as exc:
                    errors.append(exc)

            def consumer() -> None:
                try:
                    while not stop.is_set():
                        for v in range(2):
                            for vec in t.fetch(v):
                                taken[(v, vec)] += 1
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=raiser, args=(i,)) for i in range(2)]
            threads.append(threading.Thread(target=consumer))
            for th in threads:
                th.start()
            start = time.monotonic()
            while (
                time.monotonic() - start < STORM_SECONDS or min(raised[0], raised[1]) < STORM_RAISES
            ):
                if errors or time.monotonic() - start > STORM_HANG_SECONDS:
                    break
                time.sleep(0.05)
            stop.set()
            for th in threads:
                th.join()
            assert not errors, errors

            # One last raise per device, consumed before we look: every earlier MSI
            # of that device was consumed before it (one vector, delivered in order).
            for i, e in enumerate(edus):
                raise_and_wait(e, binds[i])
                raised[i] += 1
            final = {v: t.fetch(v) for v in range(2)}
            for i, (v, vec) in targets.items():
                assert vec in final[v], f"device {i}: its last raise is not pending"
                taken[(v, vec)] += 1
            assert set(taken) == set(targets.values()), f"spurious: {taken}"

            for i, (v, vec) in targets.items():
                s = binds[i].info().stats
                assert s.signals == s.posted + s.coalesced
                assert taken[(v, vec)] == s.posted, f"device {i}: rises {s.posted} taken {taken}"
                assert 0 < s.signals <= raised[i], f"device {i}: {s} for {raised[i]} raises"

            # One notification per ON rise, also through the deferred (irq_work) path.
            got = [0, 0]
            want = [binds[i].info().stats.notified for i in (0, 1)]

            def caught_up() -> bool:
                for v in (0, 1):
                    got[v] += eventfd_count(notifies[v])
                return got == want

            wait_until(caught_up, TIMEOUT, f"notifications {want}, got {got}")
            ts = t.info().stats
            assert ts.signals == sum(b.info().stats.signals for b in binds)
            assert min(raised[0], raised[1]) > STORM_RAISES, f"storm made no progress: {raised}"
            for bd in binds:
                bd.close()
    finally:
        for fd in notifies:
            os.close(fd)


def test_detach_under_load(dev: Device, edus: list[Edu]) -> None:
    """Bindings and eventfds closed while both devices keep raising: clean detach, HUP seen."""
    a, b = edus
    assert a.msi_eventfd is not None and b.msi_eventfd is not None
    stop = threading.Event()
    errors: list[BaseException] = []
    raised = Counter[int]()

    def raiser(i: int) -> None:
        try:
            while not stop.is_set():
                edus[i].raise_irq()
                raised[i] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=raiser, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    try:
        with dev.create_table(2) as t:
            for _ in range(20):
                ba = t.bind(a.msi_eventfd, 0, 0x40)
                bb = t.bind(b.msi_eventfd, 1, 0x41)
                ba.close()
                bb.close()
            assert t.info().nr_bindings == 0

            # Give device b an eventfd whose only file reference is ours, bind it,
            # and close that reference while VFIO keeps signalling its context.
            x = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            old = b.msi_eventfd
            b.enable_msi(x)
            os.close(old)
            with t.bind(x, 1, 0x42) as bh:
                wait_until(lambda: signals(bh) > 0, TIMEOUT, "MSIs into the binding")
                os.close(x)
                b.msi_eventfd = None
                wait_until(lambda: bh.info().hup, TIMEOUT, "EPOLLHUP")
                n, r = signals(bh), raised[1]
                wait_until(lambda: raised[1] > r + 50, TIMEOUT, "more raises on device b")
                assert signals(bh) == n, "a binding consumed signals after HUP"
                assert not bh.info().active
            b.disable_msi()
            t.post(0, 0x99)
            assert 0x99 in t.pir(0)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors, errors


def test_discovery_finds_the_runners_devices() -> None:
    """pyudev finds the same edu functions the VM runner bound to vfio-pci."""
    expected = sorted(filter(None, os.environ.get("KVMLU_EDU", "").split(",")))
    assert expected, "the VM runner exports KVMLU_EDU"
    assert find_vfio_edu() == expected


def test_table_closed_under_interrupts(dev: Device, edus: list[Edu]) -> None:
    """The table fd closed while MSIs keep posting: the binding keeps it alive, then frees it."""
    e = edus[0]
    assert e.msi_eventfd is not None
    base = dev.query().nr_tables
    stop = threading.Event()
    errors: list[BaseException] = []

    def raiser() -> None:
        try:
            while not stop.is_set():
                e.raise_irq()
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=raiser)
    th.start()
    try:
        t = dev.create_table(2)
        b = t.bind(e.msi_eventfd, 1, 0x5A)
        wait_until(lambda: signals(b) > 0, TIMEOUT, "MSIs into the binding")
        t.close()
        n = signals(b)
        wait_until(lambda: signals(b) > n + 20, TIMEOUT, "posting after the table fd closed")
        assert dev.query().nr_tables == base + 1
        b.close()
        assert dev.query().nr_tables == base, "the last binding freed the table"
    finally:
        stop.set()
        th.join()
    assert not errors, errors
