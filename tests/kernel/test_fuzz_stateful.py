"""Stateful fuzzing: the real module and pyctl.model run the same steps.

After every step an invariant compares each table's mmap'd descriptors, the
signals each notification eventfd received, and the table and binding
counters with the model. Steps include bad calls (vCPU and vector values at
and past every bound), whose errno must be the model's and which must change
nothing. Failures print a replayable program (Hypothesis's stateful output).

``KVMLU_FUZZ_EXAMPLES`` sets how many programs run (``make fuzz`` runs
10,000; the kernel suite a few dozen).
"""

from __future__ import annotations

import os
import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from pyctl.errors import KvmluError
from pyctl.kvmlu import Binding, Device, Table
from pyctl.model import TableModel
from pyctl.uapi import ioctl, lib, new_arg

EXAMPLES = int(os.environ.get("KVMLU_FUZZ_EXAMPLES", "40"))
vcpus = st.integers(min_value=0, max_value=9) | st.sampled_from([1023, 1024, 2**32 - 1])
vectors = st.integers(min_value=28, max_value=40) | st.integers(min_value=250, max_value=260)


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class KvmluMachine(RuleBasedStateMachine):
    """Tables, notification targets, SN, posts, fetches and eventfd bindings."""

    tables = Bundle("tables")
    sources = Bundle("sources")

    def __init__(self) -> None:
        super().__init__()
        self.dev = Device()
        self.real: dict[int, Table] = {}
        self.model: dict[int, TableModel] = {}
        self.targets = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
        self.received = [0, 0]
        self.srcs: dict[int, int] = {}  # source name -> eventfd
        self.binds: dict[tuple[int, int], Binding] = {}  # (table, source) -> binding
        self.bind_seq: dict[tuple[int, int], int] = {}
        self.gone = [0, 0]  # signals owed by tables closed since
        self.next = 0

    def _name(self) -> int:
        self.next += 1
        return self.next

    def _expect(self, err: int, call: object, *args: object) -> object:
        """Run the real call; it fails with ``err`` if the model says so."""
        try:
            out = call(*args)  # type: ignore[operator]
        except KvmluError as e:
            assert e.errno == err, f"kernel said {e.errno}, model {err}"
            return None
        assert err == 0, f"kernel succeeded, model expected errno {err}"
        return out

    @rule(target=tables, nr=st.integers(min_value=1, max_value=8))
    def create_table(self, nr: int) -> int:
        name = self._name()
        self.real[name] = self.dev.create_table(nr)
        self.model[name] = TableModel(nr)
        return name

    @rule(t=consumes(tables))
    def close_table(self, t: int) -> None:
        for (tn, s), b in list(self.binds.items()):
            if tn == t:
                b.close()
                del self.binds[(tn, s)]
                del self.bind_seq[(tn, s)]
        self.real.pop(t).close()
        m = self.model.pop(t)
        for i in (0, 1):
            self.gone[i] += m.signals.get(i, 0)

    @rule(target=sources)
    def new_source(self) -> int:
        name = self._name()
        self.srcs[name] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return name

    @rule(
        t=tables,
        vcpu=vcpus,
        tgt=st.sampled_from([None, 0, 1]),
        nv=vectors,
        ndst=st.integers(0, 2**32 - 1),
        attach=st.booleans(),
    )
    def set_notify(
        self, *, t: int, vcpu: int, tgt: int | None, nv: int, ndst: int, attach: bool
    ) -> None:
        fd = None if tgt is None else self.targets[tgt]
        err = self.model[t].set_notify(vcpu, tgt, nv, ndst, attach)
        self._expect(err, lambda: self.real[t].set_notify(vcpu, fd, nv, ndst, attach=attach))

    @rule(t=tables, vcpu=vcpus, suppress=st.sampled_from([0, 1, 2]))
    def set_sn(self, t: int, vcpu: int, suppress: int) -> None:
        err = self.model[t].set_sn(vcpu, suppress)
        arg = new_arg("kvmlu_table_set_sn", vcpu=vcpu, suppress=suppress)
        self._expect(err, ioctl, self.real[t].fd, lib.KVMLU_TABLE_SET_SN, arg)

    @rule(t=tables, vcpu=vcpus, vector=vectors)
    def post(self, t: int, vcpu: int, vector: int) -> None:
        err, result = self.model[t].post(vcpu, vector)
        out = self._expect(err, self.real[t].post, vcpu, vector)
        if out is not None:
            assert int(out) == result, f"post result {out!r}, model {result}"  # type: ignore[call-overload]

    @rule(t=tables, vcpu=vcpus)
    def fetch(self, t: int, vcpu: int) -> None:
        err, taken = self.model[t].fetch(vcpu)
        out = self._expect(err, self.real[t].fetch, vcpu)
        if out is not None:
            assert out == taken

    @rule(t=tables, s=sources, vcpu=vcpus, vector=vectors)
    def bind(self, t: int, s: int, vcpu: int, vector: int) -> None:
        pending = _drain(self.srcs[s])  # the kernel posts what is pending at bind time
        if pending:
            os.eventfd_write(self.srcs[s], pending)
        err = self.model[t].bind(s, vcpu, vector, pending)
        b = self._expect(err, self.real[t].bind, self.srcs[s], vcpu, vector)
        if b is not None:
            self.binds[(t, s)] = b  # type: ignore[assignment]
            self.bind_seq[(t, s)] = self._name()
        elif pending:
            _drain(self.srcs[s])  # the refused bind left it; keep the model's view

    @precondition(lambda self: self.binds)
    @rule(data=st.data())
    def unbind(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.binds)))
        self.binds.pop(key).close()
        del self.bind_seq[key]
        self.model[key[0]].unbind(key[1])

    @rule(s=sources, n=st.integers(1, 3))
    def signal(self, s: int, n: int) -> None:
        os.eventfd_write(self.srcs[s], n)
        bound = [key for key in self.binds if key[1] == s]
        if bound:
            # Several tables on one eventfd: the latest binding's callback runs
            # first (wait queues add at the head) and drains the count.
            t = max(bound, key=self.bind_seq.__getitem__)[0]
            self.model[t].fire(s, n)
        else:
            _drain(self.srcs[s])

    @invariant()
    def descriptors_match(self) -> None:
        for name, t in self.real.items():
            m = self.model[name]
            for v in range(t.nr_vcpus):
                d, mv = t.view(v), m.vcpus[v]
                assert (d.pir, d.on, d.sn, d.nv, d.ndst) == (
                    mv.pir,
                    mv.on,
                    mv.sn,
                    mv.nv,
                    mv.ndst,
                ), f"table {name} vCPU {v}: {d} vs model {mv}"
            c, mc = t.info().stats, m.counters
            assert (c.signals, c.posted, c.coalesced, c.notified, c.suppressed) == (
                mc.signals,
                mc.posted,
                mc.coalesced,
                mc.notified,
                mc.suppressed,
            ), f"table {name}: {c} vs model {mc}"
            for (tn, s), b in self.binds.items():
                if tn == name:
                    bc, mb = b.info().stats, m.bindings[s].counters
                    assert (bc.signals, bc.posted, bc.coalesced) == (
                        mb.signals,
                        mb.posted,
                        mb.coalesced,
                    )

    @invariant()
    def signals_match(self) -> None:
        owed = [sum(m.signals.get(i, 0) for m in self.model.values()) for i in (0, 1)]
        owed = [o + gone for o, gone in zip(owed, self.gone, strict=True)]
        deadline = time.monotonic() + 5  # binding notifications come from an irq_work
        while True:
            for i, fd in enumerate(self.targets):
                self.received[i] += _drain(fd)
            if self.received == owed or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        assert self.received == owed, f"signals {self.received}, model {owed}"

    def teardown(self) -> None:
        for b in self.binds.values():
            b.close()
        for t in self.real.values():
            t.close()
        for fd in [*self.targets, *self.srcs.values()]:
            os.close(fd)
        self.dev.close()


KvmluMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=25,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
TestKvmluStateful = KvmluMachine.TestCase
