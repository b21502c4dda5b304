"""IRQ bindings driven by eventfd writes: posting in the wakeup callback, counters, lifetime."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from kutil import eventfd_count, wait_readable

from pyctl.kvmlu import Device, Table

TIMEOUT = 10.0


@pytest.fixture
def src() -> Iterator[int]:
    """The eventfd a binding consumes (a device's MSI trigger in real use)."""
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    yield fd
    with contextlib.suppress(OSError):  # the test may have closed it
        os.close(fd)


def test_signal_posts_in_kernel(table: Table, src: int, efd: int) -> None:
    """A write to the bound eventfd sets the PIR bit and signals the target, with no reader."""
    table.set_notify(2, efd, nv=0xF2, ndst=0)
    with table.bind(src, 2, 0x61) as b:
        os.eventfd_write(src, 1)
        assert wait_readable(efd, TIMEOUT), "no notification"
        assert eventfd_count(efd) == 1
        assert table.pir(2) == {0x61}
        assert table.view(2).on
        assert eventfd_count(src) == 0, "the binding drained the eventfd"
        s = b.info().stats
        assert (s.signals, s.posted, s.coalesced, s.notified, s.suppressed) == (1, 1, 0, 1, 0)


def test_count_above_one_coalesces(table: Table, src: int) -> None:
    """A counter of 3 read at once is 3 signals: one post and two coalesced."""
    with table.bind(src, 0, 0x40) as b:
        os.eventfd_write(src, 3)
        s = b.info().stats
        assert (s.signals, s.posted, s.coalesced) == (3, 1, 2)
        assert table.pir(0) == {0x40}


def test_pending_count_posted_at_bind(table: Table, src: int) -> None:
    """A count already pending when the binding is made is posted at once."""
    os.eventfd_write(src, 2)
    with table.bind(src, 1, 0x90) as b:
        assert table.pir(1) == {0x90}
        s = b.info().stats
        assert (s.signals, s.posted, s.coalesced) == (2, 1, 1)
        assert eventfd_count(src) == 0


def test_binding_info_reports_target(table: Table, src: int) -> None:
    """A binding reports its vCPU, vector and state."""
    with table.bind(src, 7, 0xEE) as b:
        i = b.info()
        assert (i.vcpu, i.vector, i.active, i.hup) == (7, 0xEE, True, False)


def test_table_and_binding_counters_add_up(table: Table, src: int, efd: int) -> None:
    """Table counters cover bindings and POST calls; signals = posted + coalesced."""
    table.set_notify(0, efd, nv=0xF2, ndst=0)
    with table.bind(src, 0, 0x41) as b:
        os.eventfd_write(src, 1)
        os.eventfd_write(src, 1)
        table.post(0, 0x42)
        table.fetch(0)
        os.eventfd_write(src, 1)
        table.set_sn(0, True)
        table.fetch(0)
        os.eventfd_write(src, 1)
        bs, ts = b.info().stats, table.info().stats
        assert (bs.signals, bs.posted, bs.coalesced, bs.suppressed) == (4, 3, 1, 1)
        assert bs.notified == 2
        assert (ts.signals, ts.posted, ts.coalesced) == (5, 4, 1)
        assert ts.signals == ts.posted + ts.coalesced
        assert table.info().nr_bindings == 1


def test_close_binding_detaches(table: Table, src: int) -> None:
    """After the binding's fd is closed, signals post nothing and the count stays readable."""
    b = table.bind(src, 3, 0x70)
    assert table.info().nr_bindings == 1
    b.close()
    assert table.info().nr_bindings == 0
    os.eventfd_write(src, 1)
    assert table.pir(3) == frozenset()
    assert eventfd_count(src) == 1, "nobody drains a detached eventfd"


def test_eventfd_close_deactivates(table: Table, src: int) -> None:
    """When the eventfd's last file reference goes, the binding reports HUP and stays inert."""
    with table.bind(src, 3, 0x70) as b:
        os.close(src)
        i = b.info()
        assert (i.active, i.hup) == (False, True)
        assert table.info().nr_bindings == 1
        table.post(3, 0x71)
        assert table.pir(3) == {0x71}


def test_rebind_after_detach(table: Table, src: int) -> None:
    """The same eventfd can be bound again once the first binding is closed."""
    table.bind(src, 0, 0x40).close()
    with table.bind(src, 1, 0x41):
        os.eventfd_write(src, 1)
        assert table.pir(1) == {0x41}
        assert table.pir(0) == frozenset()


def test_one_eventfd_many_tables(dev: Device, src: int) -> None:
    """One eventfd may be bound to two tables; a signal posts into the first to drain it."""
    with (
        dev.create_table(1) as t1,
        dev.create_table(1) as t2,
        t1.bind(src, 0, 0x50) as b1,
        t2.bind(src, 0, 0x51) as b2,
    ):
        os.eventfd_write(src, 1)
        assert b1.info().stats.signals + b2.info().stats.signals == 1
        assert len(t1.pir(0)) + len(t2.pir(0)) == 1


def test_binding_keeps_closed_table_alive(dev: Device, src: int) -> None:
    """Closing the table fd first leaves the table alive for the binding until it closes."""
    base = dev.query().nr_tables
    t = dev.create_table(2)
    b = t.bind(src, 1, 0x44)
    t.close()
    assert dev.query().nr_tables == base + 1
    for _ in range(100):
        os.eventfd_write(src, 1)
    s = b.info().stats
    assert s.signals == 100
    assert (s.posted, s.coalesced) == (1, 99), "unfetched: the first posts, the rest coalesce"
    b.close()
    assert dev.query().nr_tables == base


def test_binding_fd_is_cloexec(table: Table, src: int) -> None:
    import fcntl

    with table.bind(src, 0, 0x40) as b:
        assert fcntl.fcntl(b.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
