"""A plain-Python model of kvmlu's tables, bindings, sessions and vAPICs, for fuzzing.

It says what each call must do to a table -- PIR, ON, SN, NV, NDST, the
notification signals and the counters --, to a session's preserved objects
and to a vAPIC's IRR and ISR, and which errno each bad call gets, in the
order the kernel checks. The stateful fuzzer runs the real modules and this
model side by side and compares them after every step.
"""

from __future__ import annotations

import errno
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

VECTOR_MIN, VECTOR_MAX = 32, 255
MAX_VCPUS = 1024
POST_COALESCED, POST_SUPPRESSED, POST_NOTIFIED = 1, 2, 4


@dataclass
class VcpuModel:
    pir: set[int] = field(default_factory=set)
    on: bool = False
    sn: bool = False
    nv: int = 0
    ndst: int = 0
    notify: int | None = None  # the model's name for the target eventfd


@dataclass
class Counters:
    signals: int = 0
    posted: int = 0
    coalesced: int = 0
    notified: int = 0
    suppressed: int = 0

    def account(self, result: int, count: int) -> None:
        rose = not result & POST_COALESCED
        self.signals += count
        self.posted += rose
        self.coalesced += count - rose
        self.notified += bool(result & POST_NOTIFIED)
        self.suppressed += bool(result & POST_SUPPRESSED)


@dataclass
class BindingModel:
    vcpu: int
    vector: int
    counters: Counters = field(default_factory=Counters)


class TableModel:
    """One table: its descriptors, targets, bindings and counters."""

    def __init__(self, nr_vcpus: int) -> None:
        self.nr_vcpus = nr_vcpus
        self.vcpus = [VcpuModel() for _ in range(nr_vcpus)]
        self.counters = Counters()
        self.bindings: dict[int, BindingModel] = {}  # source eventfd name -> binding
        self.signals: dict[int, int] = {}  # target eventfd name -> signals owed

    def _signal(self, vcpu: int) -> None:
        target = self.vcpus[vcpu].notify
        if target is not None:
            self.signals[target] = self.signals.get(target, 0) + 1

    # Validation, in the kernel's order.

    def check_vcpu(self, vcpu: int) -> int:
        return errno.ERANGE if not 0 <= vcpu < self.nr_vcpus else 0

    @staticmethod
    def check_vector(vector: int) -> int:
        return 0 if VECTOR_MIN <= vector <= VECTOR_MAX else errno.ERANGE

    # Operations; each returns (errno, result).

    def post(self, vcpu: int, vector: int, count: int = 1) -> tuple[int, int]:
        err = self.check_vcpu(vcpu) or self.check_vector(vector)
        if err:
            return err, 0
        v = self.vcpus[vcpu]
        if vector in v.pir:
            result = POST_COALESCED
        else:
            v.pir.add(vector)
            if v.sn:
                result = POST_SUPPRESSED
            elif v.on:
                result = 0
            else:
                v.on = True
                self._signal(vcpu)
                result = POST_NOTIFIED
        self.counters.account(result, count)
        return 0, result

    def fetch(self, vcpu: int) -> tuple[int, set[int]]:
        err = self.check_vcpu(vcpu)
        if err:
            return err, set()
        v = self.vcpus[vcpu]
        taken, v.pir, v.on = v.pir, set(), False
        return 0, taken

    def set_sn(self, vcpu: int, suppress: int) -> int:
        err = self.check_vcpu(vcpu)
        if err:
            return err
        if suppress not in (0, 1):
            return errno.EINVAL
        v = self.vcpus[vcpu]
        v.sn = bool(suppress)
        if not v.sn and v.pir and not v.on:
            v.on = True
            self.counters.notified += 1
            self._signal(vcpu)
        return 0

    def set_notify(
        self, vcpu: int, target: int | None, nv: int, ndst: int, attach: bool = False
    ) -> int:
        err = self.check_vcpu(vcpu) or self.check_vector(nv)
        if err:
            return err
        v = self.vcpus[vcpu]
        v.notify, v.nv, v.ndst = target, nv, ndst
        if attach:
            if not v.sn and v.pir and not v.on:
                v.on = True
                self.counters.notified += 1
            if v.on:
                self._signal(vcpu)
        return 0

    def bind(self, source: int, vcpu: int, vector: int, pending: int = 0) -> int:
        err = self.check_vcpu(vcpu) or self.check_vector(vector)
        if err:
            return err
        if source in self.bindings:
            return errno.EBUSY
        self.bindings[source] = BindingModel(vcpu, vector)
        if pending:
            self.fire(source, pending)
        return 0

    def fire(self, source: int, count: int) -> None:
        """The bound eventfd ``source`` was signalled ``count`` times."""
        b = self.bindings[source]
        _, result = self.post(b.vcpu, b.vector, count)
        b.counters.account(result, count)

    def unbind(self, source: int) -> None:
        del self.bindings[source]


class VapicModel:
    """A vAPIC over a :class:`TableModel`: IRR and ISR per vCPU (TMR stays empty)."""

    def __init__(self, table: TableModel, version: int) -> None:
        self.table = table
        self.version = version
        self.irr: list[set[int]] = [set() for _ in range(table.nr_vcpus)]
        self.isr: list[set[int]] = [set() for _ in range(table.nr_vcpus)]

    def sync(self, vcpu: int) -> tuple[int, set[int]]:
        """PIR into IRR; returns the vectors moved."""
        err, moved = self.table.fetch(vcpu)
        if not err:
            self.irr[vcpu] |= moved
        return err, moved

    def ack(self, vcpu: int) -> tuple[int, int]:
        """The highest IRR vector whose priority class is above the in-service one."""
        err = self.table.check_vcpu(vcpu)
        if err:
            return err, 0
        irr = max(self.irr[vcpu], default=0)
        isr = max(self.isr[vcpu], default=0)
        if irr and (not isr or irr >> 4 > isr >> 4):
            self.irr[vcpu].discard(irr)
            self.isr[vcpu].add(irr)
            return 0, irr
        return 0, 0

    def eoi(self, vcpu: int) -> tuple[int, int]:
        err = self.table.check_vcpu(vcpu)
        if err:
            return err, 0
        isr = max(self.isr[vcpu], default=0)
        self.isr[vcpu].discard(isr)
        return 0, isr

    def save(self, format: int) -> tuple[int, Any]:
        """What a blob carries: (nr_vcpus, IRR, ISR)."""
        if format > self.version:
            return errno.EPROTONOSUPPORT, None
        return 0, (self.table.nr_vcpus, [set(r) for r in self.irr], [set(r) for r in self.isr])

    def load(self, blob: Any) -> int:
        """Replace IRR and ISR; PIR is left as it is."""
        nr, irr, isr = blob
        if nr != self.table.nr_vcpus:
            return errno.ERANGE
        self.irr, self.isr = [set(r) for r in irr], [set(r) for r in isr]
        return 0


@dataclass
class SessionModel:
    """One named session: its tokens, whether an fd of it is open, whether finished.

    ``tokens`` maps each token to the file it holds (any hashable name for
    it); ``preserved`` is the set of files every session holds, shared by the
    sessions of one :class:`SessionsModel`: a file is preserved once.
    """

    tokens: dict[int, Hashable] = field(default_factory=dict)
    held: bool = True
    finished: bool = False
    preserved: set[Hashable] = field(default_factory=set)

    def preserve(self, token: int, file: Hashable) -> int:
        if self.finished:
            return errno.ESTALE
        if token in self.tokens:
            return errno.EEXIST
        if file in self.preserved:
            return errno.EALREADY
        self.tokens[token] = file
        self.preserved.add(file)
        return 0

    def retrieve(self, token: int) -> int:
        if self.finished:
            return errno.ESTALE
        return 0 if token in self.tokens else errno.ENOENT

    def unpreserve(self, token: int) -> int:
        err = self.retrieve(token)
        if not err:
            self.preserved.discard(self.tokens.pop(token))
        return err

    def finish(self) -> None:
        self.preserved.difference_update(self.tokens.values())
        self.tokens.clear()
        self.finished = True


class SessionsModel:
    """The device's sessions by name."""

    def __init__(self) -> None:
        self.sessions: dict[str, SessionModel] = {}
        self.preserved: set[Hashable] = set()

    def create(self, name: str) -> int:
        if name in self.sessions:
            return errno.EEXIST
        self.sessions[name] = SessionModel(preserved=self.preserved)
        return 0

    def retrieve(self, name: str) -> int:
        s = self.sessions.get(name)
        if s is None:
            return errno.ENOENT
        if s.held:
            return errno.EBUSY
        s.held = True
        return 0

    def finish(self, name: str) -> SessionModel:
        """End the session; its name is free at once, its open fd answers ESTALE."""
        s = self.sessions.pop(name)
        s.finish()
        return s

    def close(self, session: SessionModel) -> None:
        """The session's fd was closed; it stays in the kernel unless finished."""
        session.held = False
