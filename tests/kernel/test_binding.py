"""IRQ bindings driven by eventfd writes: posting in the wakeup callback, counters, lifetime,
and the binding as the eventfd's one consumer (EBUSY, no wakeup of pollers, no semaphores)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kutil import eventfd_count, wait_readable, wait_until

from pyctl.errors import BusyError, InvalidArgumentError
from pyctl.kvmlu import Device, Table

TIMEOUT = 10.0
# A new Python process in the test VM took over 10 s to reach its first
# system call with two busy loops on the host: a hang guard only.
PROCESS_TIMEOUT = 120.0


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


# A binding is the eventfd's one consumer: a priority, exclusive waiter.


def _stats_of(dev: Device, *tables: Table) -> tuple[object, ...]:
    """Everything a refused BIND must leave as it was."""
    q = dev.query()
    return (q.nr_bindings, q.stats, *(t.info() for t in tables))


@pytest.mark.parametrize("where", ["same table", "another table"])
def test_second_bind_of_bound_eventfd_busy(dev: Device, table: Table, src: int, where: str) -> None:
    """A bound eventfd cannot be bound again, to any table: EBUSY, and nothing changes."""
    with dev.create_table(2) as other, table.bind(src, 0, 0x40) as b:
        target = table if where == "same table" else other
        os.eventfd_write(src, 2)
        before = (_stats_of(dev, table, other), b.info(), table.pir(0), other.pir(1))
        with pytest.raises(BusyError):
            target.bind(src, 1, 0x41)
        assert (_stats_of(dev, table, other), b.info(), table.pir(0), other.pir(1)) == before
        os.eventfd_write(src, 3)
        assert b.info().stats.signals == 5, "the first binding still takes every count"
        assert other.info().stats.signals == 0
        assert table.pir(1) == frozenset()
    os.eventfd_write(src, 1)
    assert eventfd_count(src) == 1, "the refused BIND left no waiter that drains the eventfd"


def test_bind_leaves_no_trace_of_its_probe(table: Table, src: int, efd: int) -> None:
    """BIND's own signal (the semaphore probe) is neither posted nor left in the eventfd."""
    table.set_notify(0, efd, nv=0xF2, ndst=0)
    with table.bind(src, 0, 0x40) as b:
        s = b.info().stats
        assert (s.signals, s.posted, s.coalesced, s.notified, s.suppressed) == (0, 0, 0, 0, 0)
        assert table.pir(0) == frozenset()
        assert eventfd_count(efd) == 0
        assert eventfd_count(src) == 0
        os.eventfd_write(src, 1)
        assert b.info().stats.signals == 1


@pytest.mark.parametrize("pending", [0, 1, 3])
def test_semaphore_eventfd_refused(dev: Device, table: Table, pending: int) -> None:
    """An EFD_SEMAPHORE eventfd is EINVAL; its pending count and the table are unchanged."""
    sem = os.eventfd(pending, os.EFD_SEMAPHORE | os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        before = _stats_of(dev, table)
        with pytest.raises(InvalidArgumentError) as ei:
            table.bind(sem, 0, 0x40)
        assert ei.value.errno == errno.EINVAL
        assert _stats_of(dev, table) == before
        assert table.pir(0) == frozenset()
        reads = 0
        while eventfd_count(sem):  # a semaphore gives 1 a read
            reads += 1
        assert reads == pending
        os.eventfd_write(sem, 2)
        assert eventfd_count(sem) == 1, "the refused BIND left no waiter on the eventfd"
    finally:
        os.close(sem)


# x86-64 system call numbers of poll, ppoll, epoll_wait and epoll_pwait.
_POLL_SYSCALLS = {7, 271, 232, 281}

_POLLER = """
import select, sys
src, stop, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if how == "poll":
    p = select.poll()
    p.register(src, select.POLLIN)
    p.register(stop, select.POLLIN)
    ready = p.poll()
else:
    p = select.epoll()
    p.register(src, select.EPOLLIN)
    p.register(stop, select.EPOLLIN)
    ready = p.poll()
print(" ".join(str(fd) for fd, _ in sorted(ready)), flush=True)
"""


class Poller:
    """A process blocked in poll() or epoll_wait() on an eventfd and a stop pipe."""

    def __init__(self, src: int, how: str) -> None:
        self.stop_r, self.stop_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _POLLER, str(src), str(self.stop_r), how],
            pass_fds=(src, self.stop_r),
            stdout=subprocess.PIPE,
            text=True,
        )

    def _asleep_in_poll(self) -> bool:
        proc = Path(f"/proc/{self.proc.pid}")
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            # Read after the state: the kernel answers with a system call
            # number only once the task is off its CPU, its sleep counted.
            nr = (proc / "syscall").read_text().split()[0]
        except (OSError, IndexError):
            return False
        return state == "S" and nr.isdigit() and int(nr) in _POLL_SYSCALLS

    def sleeps(self) -> int:
        """Its voluntary context switches, once it is asleep in the poll."""
        wait_until(self._asleep_in_poll, PROCESS_TIMEOUT, "the poller asleep in its poll")
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
        raise AssertionError("no voluntary_ctxt_switches in /proc/PID/status")

    def stop(self) -> list[int]:
        """End the poll through the pipe; the fds it found ready."""
        os.write(self.stop_w, b"x")
        out, _ = self.proc.communicate(timeout=PROCESS_TIMEOUT)
        assert self.proc.returncode == 0
        return [int(fd) for fd in out.split()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.stop_r)
        os.close(self.stop_w)


@pytest.mark.parametrize("how", ["poll", "epoll"])
def test_poller_of_bound_eventfd_not_woken(table: Table, src: int, how: str) -> None:
    """Writes to a bound eventfd wake no poller, and post exactly: N writes of k are N*k signals."""
    n, k = 10, 3
    poller = Poller(src, how)
    try:
        with table.bind(src, 4, 0x64) as b:
            asleep = poller.sleeps()
            for i in range(n):
                os.eventfd_write(src, k)
                assert poller.sleeps() == asleep, f"write {i + 1} woke the poller"
                assert table.pir(4) == {0x64}
                table.fetch(4)
            s = b.info().stats
            assert (s.signals, s.posted, s.coalesced) == (n * k, n, n * (k - 1))
            assert table.info().stats.signals == n * k
            assert poller.stop() == [poller.stop_r], "only the stop pipe was ready"
    finally:
        poller.close()


# KVM's irqfd: the other priority consumer of an eventfd.

KVM_CREATE_VM = 0xAE01
KVM_CREATE_IRQCHIP = 0xAE60
KVM_IRQFD = 0x4020AE76  # _IOW(KVMIO, 0x76, struct kvm_irqfd), 32 bytes
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
GSI = 5


@pytest.fixture
def kvm_vm() -> Iterator[int]:
    """A KVM VM with an in-kernel irqchip, as QEMU makes one for irqfds."""
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        pytest.skip("no /dev/kvm in this VM")
    try:
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    finally:
        os.close(kvm)
    try:
        fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
        yield vm
    finally:
        os.close(vm)


def kvm_irqfd(vm: int, efd: int, flags: int = 0) -> None:
    fcntl.ioctl(vm, KVM_IRQFD, struct.pack("=IIII16x", efd, GSI, flags, 0))


def test_bind_after_kvm_irqfd_busy(dev: Device, table: Table, src: int, kvm_vm: int) -> None:
    """An eventfd that is a KVM irqfd cannot be bound (EBUSY) until the irqfd goes."""
    kvm_irqfd(kvm_vm, src)
    before = _stats_of(dev, table)
    with pytest.raises(BusyError):
        table.bind(src, 0, 0x40)
    assert _stats_of(dev, table) == before
    kvm_irqfd(kvm_vm, src, KVM_IRQFD_FLAG_DEASSIGN)
    with table.bind(src, 0, 0x40) as b:
        os.eventfd_write(src, 2)
        assert b.info().stats.signals == 2


def test_kvm_irqfd_after_bind_gets_nothing(table: Table, src: int, kvm_vm: int) -> None:
    """A KVM irqfd on a bound eventfd takes none of its signals.

    KVM 7.3 refuses the irqfd (EBUSY: the queue has a priority waiter);
    6.1 and 6.12 accept it behind the binding, which keeps every signal.
    """
    with table.bind(src, 0, 0x40) as b:
        try:
            kvm_irqfd(kvm_vm, src)
        except OSError as e:
            assert e.errno == errno.EBUSY, e
            attached = False
        else:
            attached = True
        for _ in range(5):
            os.eventfd_write(src, 2)
        assert b.info().stats.signals == 10
        assert table.pir(0) == {0x40}
        if attached:
            kvm_irqfd(kvm_vm, src, KVM_IRQFD_FLAG_DEASSIGN)
