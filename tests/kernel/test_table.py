"""Descriptor tables: layout through mmap, and the posting semantics."""

from __future__ import annotations

import mmap
import os
import struct

import pytest
from kutil import eventfd_count, snapshot

from pyctl.kvmlu import DESC_SIZE, Device, PostResult, Table


def raw_words(table: Table, vcpu: int) -> tuple[int, ...]:
    """The eight 64-bit words of a descriptor, straight from a fresh mapping."""
    with mmap.mmap(table.fd, table.map_size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        return struct.unpack_from("<8Q", m, vcpu * DESC_SIZE)


def test_new_table_is_zeroed(dev: Device) -> None:
    """A new table has no vector pending and ON, SN, NV, NDST all zero."""
    with dev.create_table(16) as t:
        for v in range(16):
            assert raw_words(t, v) == (0,) * 8, f"vCPU {v}"


def test_layout_pir_bits(table: Table) -> None:
    """Vector N is bit N % 64 of PIR word N // 64 of the vCPU's 64-byte slot."""
    vectors = [32, 63, 64, 100, 127, 128, 191, 192, 255]
    for vec in vectors:
        table.post(5, vec)
    words = raw_words(table, 5)
    expected = [0, 0, 0, 0]
    for vec in vectors:
        expected[vec // 64] |= 1 << (vec % 64)
    assert list(words[:4]) == expected
    assert words[5:] == (0, 0, 0), "reserved words stay zero"
    for v in (4, 6):
        assert raw_words(table, v) == (0,) * 8, f"neighbour vCPU {v} untouched"
    assert table.pir(5) == frozenset(vectors)


def test_layout_control_bits(table: Table, efd: int) -> None:
    """ON is bit 0, SN bit 1, NV bits 16..23 and NDST bits 32..63 of the word at offset 32."""
    table.set_notify(3, efd, nv=0xAB, ndst=0x12345678)
    assert raw_words(table, 3)[4] == (0xAB << 16) | (0x12345678 << 32)
    table.post(3, 0x40)
    assert raw_words(table, 3)[4] == (0xAB << 16) | (0x12345678 << 32) | 1
    table.set_sn(3, True)
    assert raw_words(table, 3)[4] == (0xAB << 16) | (0x12345678 << 32) | 0b11
    d = table.view(3)
    assert (d.on, d.sn, d.nv, d.ndst) == (True, True, 0xAB, 0x12345678)
    assert table.peek(3) == d


def test_set_notify_keeps_on_sn_and_pir(table: Table, efd: int) -> None:
    """Changing NV and NDST leaves ON, SN and PIR as they were."""
    table.post(2, 0x50)
    table.set_sn(2, True)
    table.set_notify(2, efd, nv=0x33, ndst=7)
    table.set_notify(2, None, nv=0xF0, ndst=0xFFFFFFFF)
    d = table.view(2)
    assert (d.on, d.sn, d.nv, d.ndst, d.pir) == (True, True, 0xF0, 0xFFFFFFFF, {0x50})


def test_first_post_sets_pir_on_and_signals_once(table: Table, efd: int) -> None:
    """The first post sets PIR and ON and signals the notification eventfd exactly once."""
    table.set_notify(0, efd, nv=0xF2, ndst=0)
    assert table.post(0, 0x41) == PostResult.NOTIFIED
    d = table.view(0)
    assert d.pir == {0x41}
    assert d.on
    assert eventfd_count(efd) == 1


def test_posts_while_on_coalesce_without_signal(table: Table, efd: int) -> None:
    """While ON is set, further posts set their bits (or coalesce) and signal nothing."""
    table.set_notify(0, efd, nv=0xF2, ndst=0)
    table.post(0, 0x41)
    assert eventfd_count(efd) == 1
    assert table.post(0, 0x41) == PostResult.COALESCED
    assert table.post(0, 0x42) == PostResult(0)
    assert table.post(0, 0x42) == PostResult.COALESCED
    assert eventfd_count(efd) == 0
    assert table.pir(0) == {0x41, 0x42}


def test_sn_sets_pir_but_not_on_nor_signal(table: Table, efd: int) -> None:
    """With SN set a post sets its PIR bit and neither ON nor a signal."""
    table.set_notify(1, efd, nv=0xF2, ndst=0)
    table.set_sn(1, True)
    assert table.post(1, 0x60) == PostResult.SUPPRESSED
    d = table.view(1)
    assert d.pir == {0x60}
    assert not d.on
    assert eventfd_count(efd) == 0


def test_clearing_sn_with_pending_pir_notifies(table: Table, efd: int) -> None:
    """Clearing SN while PIR holds vectors sets ON and signals once."""
    table.set_notify(1, efd, nv=0xF2, ndst=0)
    table.set_sn(1, True)
    table.post(1, 0x60)
    table.set_sn(1, False)
    assert table.view(1).on
    assert eventfd_count(efd) == 1
    table.set_sn(1, True)
    table.set_sn(1, False)
    assert eventfd_count(efd) == 0, "ON was already set: no second signal"


def test_clearing_sn_with_empty_pir_is_silent(table: Table, efd: int) -> None:
    """Clearing SN with nothing pending sets nothing and signals nothing."""
    table.set_notify(1, efd, nv=0xF2, ndst=0)
    table.set_sn(1, True)
    table.set_sn(1, False)
    assert table.view(1) == table.peek(1)
    assert not table.view(1).on
    assert eventfd_count(efd) == 0


def test_fetch_returns_posted_set_and_clears(table: Table, efd: int) -> None:
    """Fetch returns exactly the posted set, leaves PIR empty and clears ON."""
    table.set_notify(4, efd, nv=0xF2, ndst=0)
    posted = {32, 0x41, 0x80, 0xC3, 255}
    for vec in posted:
        table.post(4, vec)
    assert table.fetch(4) == posted
    d = table.view(4)
    assert d.pir == frozenset()
    assert not d.on
    assert table.fetch(4) == frozenset()
    eventfd_count(efd)
    assert table.post(4, 0x41) == PostResult.NOTIFIED, "after a fetch the next post notifies"
    assert eventfd_count(efd) == 1


def test_fetch_keeps_sn_and_notification_config(table: Table) -> None:
    """Fetch touches only PIR and ON."""
    table.set_notify(6, None, nv=0x99, ndst=0xABCD)
    table.set_sn(6, True)
    table.post(6, 0x70)
    assert table.fetch(6) == {0x70}
    d = table.view(6)
    assert (d.sn, d.nv, d.ndst) == (True, 0x99, 0xABCD)


def test_peek_changes_nothing(table: Table, efd: int) -> None:
    """Peek copies a descriptor and changes nothing, ON and PIR included."""
    table.set_notify(7, efd, nv=0xF2, ndst=3)
    table.post(7, 0x90)
    before = snapshot(table)
    for _ in range(3):
        assert table.peek(7) == before[7]
    assert snapshot(table) == before


def test_notify_target_replaced_and_removed(table: Table) -> None:
    """Only the current target is signalled; with none, ON still goes up."""
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        table.set_notify(0, a, nv=0xF2, ndst=0)
        table.set_notify(0, b, nv=0xF2, ndst=0)
        table.post(0, 0x41)
        assert (eventfd_count(a), eventfd_count(b)) == (0, 1)
        table.fetch(0)
        table.set_notify(0, None, nv=0xF2, ndst=0)
        assert table.post(0, 0x41) == PostResult.NOTIFIED
        assert table.view(0).on
        assert (eventfd_count(a), eventfd_count(b)) == (0, 0)
    finally:
        os.close(a)
        os.close(b)


def test_table_holds_its_own_eventfd_reference(table: Table) -> None:
    """Closing the eventfd after SET_NOTIFY does not break posting."""
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    table.set_notify(0, a, nv=0xF2, ndst=0)
    os.close(a)
    assert table.post(0, 0x41) == PostResult.NOTIFIED


def test_descriptors_are_independent(table: Table) -> None:
    """A post, SN or fetch on one vCPU changes no other descriptor."""
    before = snapshot(table)
    table.post(2, 0x44)
    table.set_sn(3, True)
    after = snapshot(table)
    for v in range(table.nr_vcpus):
        if v not in (2, 3):
            assert after[v] == before[v], f"vCPU {v}"


@pytest.mark.parametrize("nr_vcpus", [1, 63, 64, 65, 1024])
def test_table_sizes(dev: Device, nr_vcpus: int) -> None:
    """Tables of 1..1024 vCPUs work at both ends; the last descriptor is usable."""
    with dev.create_table(nr_vcpus) as t:
        last = nr_vcpus - 1
        t.post(last, 0xEE)
        assert t.pir(last) == {0xEE}
        assert t.map_size % mmap.PAGESIZE == 0
        assert t.map_size >= nr_vcpus * DESC_SIZE
