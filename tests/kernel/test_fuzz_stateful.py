"""Stateful fuzzing: the real module and pyctl.model run the same steps.

After every step an invariant compares each table's mmap'd descriptors, the
signals each notification eventfd received, the table and binding counters
and every vAPIC's IRR and ISR with the model. Sessions preserve tables and
eventfds under tokens; a forked second process retrieves the session and a
table by token and posts through it, and the parent's mapping must show it.
One source can be the MSI trigger of an edu device, raised for real.
vAPICs are swapped between module versions by save and load. Steps include
bad calls (vCPU and vector values at and past every bound, fds of the wrong
kind, tokens and names that are taken or missing, replies in memory that
cannot be written), whose errno must be the model's and which must change
nothing. Failures print a replayable program
(Hypothesis's stateful output).

``KVMLU_FUZZ_EXAMPLES`` sets how many programs run (``make fuzz`` runs
10,000 in all, split over processes that run side by side; the kernel
suite a few dozen). ``KVMLU_FUZZ_EDU`` picks the edu function of a process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import socket
import time
from typing import Any

from faultmem import LAYOUTS, placed
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from kutil import fuzz_stats, raw_arg, wait_readable

from pyctl.edu import Edu, find_vfio_edu
from pyctl.errors import KvmluError
from pyctl.kvmlu import Binding, Device, Session, Table
from pyctl.model import SessionModel, SessionsModel, TableModel, VapicModel
from pyctl.uapi import ioctl, lib, new_arg
from pyctl.upgrade import MsiCounter
from pyctl.vapic import Vapic, VapicDevice

EXAMPLES = int(os.environ.get("KVMLU_FUZZ_EXAMPLES", "40"))
#: How long a step waits for what must happen (an MSI landing, a deferred
#: notification) before it fails: long enough for a TCG test VM on a loaded
#: host; a correct run never waits it out.
LANDING_WAIT = 30.0
# Programs per Hypothesis run. A run remembers every program it tried, about
# 75 MB per 1,000 of them, so a long fuzz is many runs, each from its own seed.
CHUNK = 500
vcpus = st.integers(min_value=0, max_value=9) | st.sampled_from([1023, 1024, 2**32 - 1])
vectors = st.integers(min_value=28, max_value=40) | st.integers(min_value=250, max_value=260)
tokens = st.integers(min_value=1, max_value=4)
MISSING_TOKEN = 2**64 - 1


class _EduSource:
    """One edu function for the whole module: opening VFIO per program is slow."""

    edu: Edu | None = None
    counter: MsiCounter | None = None
    tried = False

    @classmethod
    def get(cls) -> Edu | None:
        if not cls.tried:
            cls.tried = True
            bdfs = find_vfio_edu()
            if bdfs:
                # Fuzzers that run side by side (make fuzz) each take their own.
                cls.edu = Edu(bdfs[int(os.environ.get("KVMLU_FUZZ_EDU", "0")) % len(bdfs)])
        return cls.edu

    @classmethod
    def close(cls) -> None:
        if cls.counter is not None:
            cls.counter.close()
        if cls.edu is not None:
            with contextlib.suppress(KvmluError):
                cls.edu.disable_msi()
            cls.edu.close()
        cls.edu, cls.counter, cls.tried = None, None, False


class _Successor:
    """The second process: forked once, before the first program opens
    anything, it retrieves sessions and posts through them on request.

    Forking the fuzzer itself for every successor step cost about 90 ms under
    TCG, a quarter of a program's time. The child keeps only its two pipes.
    """

    pid = 0
    requests: int | None = None  # the parent's write end
    replies: int | None = None  # the parent's read end

    @classmethod
    def start(cls) -> None:
        if cls.pid:
            return
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                for fd in [int(f) for f in os.listdir("/proc/self/fd")]:
                    if fd > 2 and fd not in (req_r, rep_w):
                        with contextlib.suppress(OSError):
                            os.close(fd)
                _serve_successors(req_r, rep_w)
                code = 0
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(rep_w)
        cls.pid, cls.requests, cls.replies = pid, req_w, rep_r

    @classmethod
    def ask(cls, name: str, token: int, vcpu: int, vector: int) -> dict[str, int]:
        assert cls.requests is not None and cls.replies is not None
        msg = json.dumps([name, token, vcpu, vector]).encode() + b"\n"
        os.write(cls.requests, msg)
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(cls.replies, 4096)
            assert chunk, "the successor process died"
            line += chunk
        got: dict[str, int] = json.loads(line)
        assert "error" not in got, f"successor failed: {got['error']}"
        return got

    @classmethod
    def stop(cls) -> None:
        if not cls.pid:
            return
        assert cls.requests is not None and cls.replies is not None
        os.close(cls.requests)  # EOF: it exits
        os.close(cls.replies)
        _, status = os.waitpid(cls.pid, 0)
        cls.pid, cls.requests, cls.replies = 0, None, None
        assert status == 0, f"successor process exited with {status:#x}"


def _serve_successors(req_r: int, rep_w: int) -> None:
    with os.fdopen(req_r, "rb") as requests:
        for line in requests:
            try:
                name, token, vcpu, vector = json.loads(line)
                out: dict[str, Any] = _successor(name, token, vcpu, vector)
            except Exception as e:  # reported to the parent
                out = {"error": repr(e)}
            os.write(rep_w, json.dumps(out).encode() + b"\n")


def teardown_module() -> None:
    _Successor.stop()
    _EduSource.close()
    fuzz_stats.write()


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class KvmluMachine(RuleBasedStateMachine):
    """Tables, notification targets, SN, posts, fetches and eventfd bindings."""

    tables = Bundle("tables")
    sources = Bundle("sources")
    sessions = Bundle("sessions")
    vapics = Bundle("vapics")

    def __init__(self) -> None:
        super().__init__()
        fuzz_stats.add("programs")
        self.checked_once = False  # invariants run once before the first step
        _Successor.start()  # before this process holds anything of the module
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
        self.sessions_model = SessionsModel()
        # open session fds: handle -> (name, session, its model)
        self.open_sessions: dict[int, tuple[str, Session, SessionModel]] = {}
        self.preserved: dict[str, dict[int, int]] = {}  # name -> token -> table preserved
        self.vapics_open: dict[int, tuple[Vapic, VapicModel, int]] = {}  # with table name
        self.edu_src: int | None = None  # the source whose eventfd the edu's MSI signals

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

    @rule(
        t=tables,
        vcpu=vcpus,
        vector=vectors,
        op=st.sampled_from(["FETCH", "POST", "PEEK", "INFO"]),
        layout=st.sampled_from(LAYOUTS),
    )
    def faulting_reply(self, t: int, vcpu: int, vector: int, op: str, layout: str) -> None:
        """A call whose reply cannot be written is EFAULT whatever its vCPU and
        vector (the reply is checked first) and changes nothing: the model is
        not stepped, and the invariants compare the table with it."""
        struct, fields = {
            "FETCH": ("kvmlu_table_fetch", {"vcpu": vcpu}),
            "POST": ("kvmlu_table_post", {"vcpu": vcpu, "vector": vector}),
            "PEEK": ("kvmlu_table_peek", {"vcpu": vcpu}),
            "INFO": ("kvmlu_table_info", {}),
        }[op]
        request = getattr(lib, f"KVMLU_TABLE_{op}")
        with placed(bytes(raw_arg(struct, **fields)), layout) as addr:
            self._expect(errno.EFAULT, ioctl, self.real[t].fd, request, addr)

    @rule(t=tables, s=sources, vcpu=vcpus, vector=vectors)
    def bind(self, t: int, s: int, vcpu: int, vector: int) -> None:
        pending = _drain(self.srcs[s])  # the kernel posts what is pending at bind time
        if pending:
            os.eventfd_write(self.srcs[s], pending)
        m = self.model[t]
        err = m.check_vcpu(vcpu) or m.check_vector(vector)
        if not err and any(key[1] == s for key in self.binds):
            err = errno.EBUSY  # an eventfd has one binding, of any table
        err = err or m.bind(s, vcpu, vector, pending)
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
        self._fired(s, n)

    @precondition(lambda self: self.edu_src is None and _EduSource.get() is not None)
    @rule(target=sources)
    def edu_source(self) -> int:
        """A source whose eventfd is the edu device's MSI trigger."""
        edu = _EduSource.get()
        assert edu is not None
        name = self._name()
        self.srcs[name] = edu.enable_msi(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        if _EduSource.counter is None:
            _EduSource.counter = MsiCounter(edu.bdf)
        self.edu_src = name
        return name

    @precondition(lambda self: self.edu_src is not None)
    @rule(n=st.integers(1, 3))
    def raise_msi(self, n: int) -> None:
        """Real MSIs, one at a time, each waited for until the host handled it."""
        edu, counter = _EduSource.edu, _EduSource.counter
        assert edu is not None and counter is not None and self.edu_src is not None
        s = self.edu_src
        bound = [key for key in self.binds if key[1] == s]
        # The host counts the interrupt before VFIO's handler signals the
        # eventfd: wait for the signal's effect, a binding's count or the
        # eventfd's, before the model takes it.
        binding = self.binds[max(bound, key=self.bind_seq.__getitem__)] if bound else None
        for _ in range(n):
            before = counter.count()
            signals = binding.info().stats.signals if binding is not None else 0
            edu.raise_irq()
            deadline = time.monotonic() + LANDING_WAIT
            while counter.count() == before:
                assert time.monotonic() < deadline, "the edu MSI did not land"
                time.sleep(0.0002)
            if binding is not None:
                while binding.info().stats.signals == signals:
                    assert time.monotonic() < deadline, "the MSI was not posted"
                    time.sleep(0.0002)
            else:
                assert wait_readable(self.srcs[s], LANDING_WAIT), "VFIO did not signal the eventfd"
            self._fired(s, 1)

    def _fired(self, s: int, n: int) -> None:
        """Source ``s`` was signalled ``n`` times: the model's side."""
        bound = [key for key in self.binds if key[1] == s]
        if bound:
            (t, _), *others = bound
            assert not others, "an eventfd has one binding"
            self.model[t].fire(s, n)
        else:
            _drain(self.srcs[s])

    # Sessions. Names come from a small pool so that EEXIST and re-use after
    # FINISH happen.

    def _session_name(self, i: int) -> str:
        return f"fz{os.getpid()}-{i}"

    @rule(target=sessions, i=st.integers(0, 2))
    def create_session(self, i: int) -> object:
        name = self._session_name(i)
        err = self.sessions_model.create(name)
        s = self._expect(err, self.dev.create_session, name)
        if s is None:
            return multiple()
        handle = self._name()
        self.open_sessions[handle] = (name, s, self.sessions_model.sessions[name])  # type: ignore[assignment]
        self.preserved[name] = {}
        return handle

    @rule(s=sessions, what=st.sampled_from(["table", "source", "socket", "closed"]), token=tokens)
    def preserve(self, s: int, what: str, token: int) -> None:
        name, real, m = self.open_sessions[s]
        table = next(iter(sorted(self.real)), None)
        src = next(iter(sorted(self.srcs)), None)
        if what == "table" and table is not None:
            fd, err = self.real[table].fd, 0
        elif what == "source" and src is not None:
            fd, err = self.srcs[src], 0
        elif what == "socket":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._expect(errno.EOPNOTSUPP, real.preserve, sock.fileno(), token)
            sock.close()
            return
        else:
            closed = os.eventfd(0, os.EFD_CLOEXEC)
            os.close(closed)
            self._expect(errno.EBADF, real.preserve, closed, token)
            return
        err = m.preserve(token, (what, table if what == "table" else src))
        self._expect(err, real.preserve, fd, token)
        if not err and what == "table":
            self.preserved[name][token] = table  # type: ignore[assignment]

    @rule(s=sessions, token=tokens)
    def retrieve(self, s: int, token: int) -> None:
        _, real, m = self.open_sessions[s]
        fd = self._expect(m.retrieve(token), real.retrieve, token)
        if fd is not None:
            os.close(fd)  # type: ignore[arg-type]

    @rule(s=sessions, token=tokens)
    def unpreserve(self, s: int, token: int) -> None:
        name, real, m = self.open_sessions[s]
        self._expect(m.unpreserve(token), real.unpreserve, token)
        self.preserved.get(name, {}).pop(token, None)

    @rule(s=sessions)
    def finish_session(self, s: int) -> None:
        name, real, m = self.open_sessions[s]
        real.finish()
        if not m.finished:
            self.sessions_model.finish(name)
            self.preserved.pop(name, None)

    @rule(s=consumes(sessions))
    def close_session(self, s: int) -> None:
        _, real, m = self.open_sessions.pop(s)
        real.close()
        self.sessions_model.close(m)

    @precondition(lambda self: any(not m.held for m in self.sessions_model.sessions.values()))
    @rule(data=st.data(), vcpu=vcpus, vector=vectors)
    def successor(self, data: st.DataObject, vcpu: int, vector: int) -> None:
        """The second process retrieves a closed session and posts through a table in it."""
        free = sorted(n for n, m in self.sessions_model.sessions.items() if not m.held)
        name = data.draw(st.sampled_from(free))
        live = sorted(tok for tok, t in self.preserved[name].items() if t in self.real)
        token = data.draw(st.sampled_from(live)) if live else MISSING_TOKEN
        got = _Successor.ask(name, token, vcpu, vector)
        assert got["retrieve"] == 0 and got["again"] == errno.EBUSY, got
        assert got["missing"] == errno.ENOENT, got
        if token == MISSING_TOKEN:
            assert got["table"] == errno.ENOENT, got
            return
        assert got["table"] == 0, got
        err, result = self.model[self.preserved[name][token]].post(vcpu, vector)
        assert (got["post"], got["result"]) == (err, result), (got, err, result)

    # vAPICs over the tables, and swaps between module versions.

    @rule(target=vapics, t=tables, version=st.sampled_from([1, 2]))
    def create_vapic(self, t: int, version: int) -> int:
        with VapicDevice(version) as d:
            va = d.create(self.real[t])
        handle = self._name()
        self.vapics_open[handle] = (va, VapicModel(self.model[t], version), t)
        return handle

    @rule(vp=vapics, vcpu=vcpus, op=st.sampled_from(["sync", "ack", "eoi"]))
    def vapic_op(self, vp: int, vcpu: int, op: str) -> None:
        va, m, _ = self.vapics_open[vp]
        err, want = getattr(m, op)(vcpu)
        out = self._expect(err, getattr(va, op), vcpu)
        if out is None:
            return
        got = out.moved if op == "sync" else out  # type: ignore[attr-defined]
        assert got == want, f"{op} gave {got}, model {want}"

    @rule(
        vp=vapics,
        vcpu=vcpus,
        op=st.sampled_from(["SYNC", "ACK", "EOI", "GET"]),
        layout=st.sampled_from(LAYOUTS),
    )
    def vapic_faulting_reply(self, vp: int, vcpu: int, op: str, layout: str) -> None:
        """SYNC, ACK, EOI and GET with a reply that cannot be written: EFAULT, and
        neither PIR nor IRR nor ISR moved (the invariants check both)."""
        va, _, _ = self.vapics_open[vp]
        arg = bytes(raw_arg("kvmlu_vapic_vcpu", vcpu=vcpu))
        with placed(arg, layout) as addr:
            self._expect(errno.EFAULT, ioctl, va.fd, getattr(lib, f"KVMLU_VAPIC_{op}"), addr)

    @rule(src=vapics, dst=vapics, fmt=st.sampled_from([0, 1, 2, 3]))
    def vapic_move(self, src: int, dst: int, fmt: int) -> None:
        """Save one vAPIC (in ``fmt``; 0 is the module's own) and load it into another."""
        sva, sm, _ = self.vapics_open[src]
        dva, dm, _ = self.vapics_open[dst]
        err, blob = sm.save(fmt or sm.version)
        if err == 0 and (fmt or sm.version) > dm.version:
            err = errno.EPROTONOSUPPORT  # saved fine, but too new for the loader
            raw = sva.save(fmt)
            self._expect(err, dva.load, raw)
            return
        out = self._expect(err, sva.save, fmt)
        if out is not None:
            assert isinstance(out, bytes)
            self._expect(dm.load(blob), dva.load, out)

    @rule(vp=consumes(vapics), target=vapics, version=st.sampled_from([1, 2]))
    def swap_vapic(self, vp: int, version: int) -> object:
        """The version swap: a new vAPIC on the same table loads the old one's state."""
        va, m, t = self.vapics_open.pop(vp)
        if t not in self.real:
            va.close()
            return multiple()
        raw = va.save(min(version, m.version))
        _, blob = m.save(min(version, m.version))
        va.close()
        with VapicDevice(version) as d:
            new = d.create(self.real[t])
        nm = VapicModel(m.table, version)
        assert nm.load(blob) == 0
        new.load(raw)
        handle = self._name()
        self.vapics_open[handle] = (new, nm, t)
        return handle

    @rule(vp=consumes(vapics))
    def close_vapic(self, vp: int) -> None:
        self.vapics_open.pop(vp)[0].close()

    @invariant()
    def count_steps(self) -> None:
        if self.checked_once:
            fuzz_stats.add("steps")
        self.checked_once = True

    @invariant()
    def vapics_match(self) -> None:
        for handle, (va, m, _) in self.vapics_open.items():
            for v in range(m.table.nr_vcpus):
                r = va.get(v)
                assert (set(r.irr), set(r.isr)) == (m.irr[v], m.isr[v]), (
                    f"vAPIC {handle} vCPU {v}: IRR {sorted(r.irr)} ISR {sorted(r.isr)}, "
                    f"model {sorted(m.irr[v])} {sorted(m.isr[v])}"
                )

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
        # Binding notifications come from an irq_work.
        deadline = time.monotonic() + LANDING_WAIT
        while True:
            for i, fd in enumerate(self.targets):
                self.received[i] += _drain(fd)
            if self.received == owed or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        assert self.received == owed, f"signals {self.received}, model {owed}"

    def teardown(self) -> None:
        for va, _, _ in self.vapics_open.values():
            va.close()
        for name, real, m in self.open_sessions.values():
            real.finish()
            real.close()
            if self.sessions_model.sessions.get(name) is m:
                del self.sessions_model.sessions[name]
        for name in list(self.sessions_model.sessions):
            with self.dev.retrieve_session(name) as s:
                s.finish()
        for b in self.binds.values():
            b.close()
        for t in self.real.values():
            t.close()
        for fd in [*self.targets, *self.srcs.values()]:
            os.close(fd)
        self.dev.close()


def _successor(name: str, token: int, vcpu: int, vector: int) -> dict[str, int]:
    """The second process: what each of its calls returned (0 or an errno)."""

    def err(call: object, *args: object) -> tuple[int, object]:
        try:
            return 0, call(*args)  # type: ignore[operator]
        except KvmluError as e:
            return e.errno or 0, None

    out: dict[str, int] = {}
    with Device() as dev:
        out["retrieve"], s = err(dev.retrieve_session, name)
        assert isinstance(s, Session)
        out["again"], _ = err(dev.retrieve_session, name)
        out["missing"], _ = err(s.retrieve, MISSING_TOKEN)
        out["table"], fd = err(s.retrieve, token)
        if isinstance(fd, int):
            arg = new_arg("kvmlu_table_post", vcpu=vcpu, vector=vector)
            out["post"], _ = err(ioctl, fd, lib.KVMLU_TABLE_POST, arg)
            out["result"] = int(arg.result) if out["post"] == 0 else 0
            os.close(fd)
        s.close()
    return out


SETTINGS = settings(
    max_examples=CHUNK,
    stateful_step_count=25,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def test_stateful_programs() -> None:
    """EXAMPLES programs against the model, CHUNK per Hypothesis run.

    Each run starts from seed KVMLU_FUZZ_SEED (random if unset) plus its
    index; a failure names the seed and size that replay its run alone.
    """
    base = int(os.environ.get("KVMLU_FUZZ_SEED", "0")) or random.SystemRandom().getrandbits(63)
    left, index = EXAMPLES, 0
    while left > 0:
        n, run_seed = min(CHUNK, left), base + index
        try:
            run_state_machine_as_test(
                seed(run_seed)(KvmluMachine), settings=settings(SETTINGS, max_examples=n)
            )
        except BaseException as e:
            e.add_note(f"replay: KVMLU_FUZZ_SEED={run_seed} KVMLU_FUZZ_EXAMPLES={n}")
            raise
        left, index = left - n, index + 1
