"""Python objects for kvmlu.ko: the device and its descriptor tables.

Each object owns one file descriptor and closes it on :meth:`close` or when its
``with`` block ends::

    with Device() as dev, dev.create_table(8) as table:
        table.set_notify(0, efd, nv=0xf2, ndst=0)
        table.post(0, 0x41)
        assert table.pir(0) == {0x41}
"""

from __future__ import annotations

import enum
import mmap
import os
from dataclasses import dataclass
from typing import Any

from pyctl.closing import Closing
from pyctl.errors import ClosedError
from pyctl.uapi import ffi, ioctl, lib, new_arg

DEVICE_PATH = "/dev/kvmlu"
DESC_SIZE: int = ffi.sizeof("struct kvmlu_pi_desc")


class PostResult(enum.IntFlag):
    """What one post did (the ``KVMLU_POST_*`` bits); 0 means set PIR, ON already set."""

    #: The vector was pending already; nothing else happened.
    COALESCED = lib.KVMLU_POST_COALESCED
    #: SN was set: PIR set, ON not, nobody signalled.
    SUPPRESSED = lib.KVMLU_POST_SUPPRESSED
    #: ON went from 0 to 1 and the notification target was signalled.
    NOTIFIED = lib.KVMLU_POST_NOTIFIED


def vectors_from_words(words: Any) -> frozenset[int]:
    """The set of vectors whose bits are set in four 64-bit PIR words."""
    out: set[int] = set()
    for i in range(4):
        word = int(words[i])
        while word:
            low = word & -word
            out.add(i * 64 + low.bit_length() - 1)
            word ^= low
    return frozenset(out)


@dataclass(frozen=True)
class Descriptor:
    """One posted-interrupt descriptor as read at one moment."""

    pir: frozenset[int]
    control: int

    @classmethod
    def from_cdata(cls, desc: Any) -> Descriptor:
        """Read a ``struct kvmlu_pi_desc`` (a copy or a view into the mmap)."""
        return cls(vectors_from_words(desc.pir), int(desc.control))

    @property
    def on(self) -> bool:
        """Outstanding Notification."""
        return bool(self.control >> lib.KVMLU_PI_ON_BIT & 1)

    @property
    def sn(self) -> bool:
        """Suppress Notification."""
        return bool(self.control >> lib.KVMLU_PI_SN_BIT & 1)

    @property
    def nv(self) -> int:
        """Notification Vector."""
        return int(self.control >> lib.KVMLU_PI_NV_SHIFT & lib.KVMLU_PI_NV_MASK)

    @property
    def ndst(self) -> int:
        """Notification Destination."""
        return int(self.control >> lib.KVMLU_PI_NDST_SHIFT & lib.KVMLU_PI_NDST_MASK)

    def __str__(self) -> str:
        vecs = ",".join(f"0x{v:02x}" for v in sorted(self.pir)) or "-"
        return (
            f"ON={int(self.on)} SN={int(self.sn)} NV=0x{self.nv:02x} "
            f"NDST=0x{self.ndst:08x} PIR={{{vecs}}}"
        )


@dataclass(frozen=True)
class Stats:
    """Posting counters (``struct kvmlu_stats``); signals == posted + coalesced."""

    signals: int
    posted: int
    coalesced: int
    notified: int
    suppressed: int

    @classmethod
    def from_cdata(cls, s: Any) -> Stats:
        return cls(
            int(s.signals), int(s.posted), int(s.coalesced), int(s.notified), int(s.suppressed)
        )


@dataclass(frozen=True)
class TableInfo:
    """What KVMLU_TABLE_INFO reports."""

    nr_vcpus: int
    nr_bindings: int
    stats: Stats


@dataclass(frozen=True)
class BindingInfo:
    """What KVMLU_BINDING_INFO reports: the target and the counters."""

    vcpu: int
    vector: int
    active: bool
    hup: bool
    stats: Stats


@dataclass(frozen=True)
class ApiInfo:
    """What KVMLU_QUERY reports."""

    api_version: int
    max_vcpus: int
    capabilities: int
    nr_tables: int
    nr_bindings: int
    nr_sessions: int
    stats: Stats


class _FdObject(Closing):
    """An object that owns one file descriptor."""

    _what = "object"

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def fd(self) -> int:
        """The file descriptor; raises :class:`ClosedError` once closed."""
        if self._fd is None:
            raise ClosedError(self._what)
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        """Close the file descriptor; closing twice is harmless."""
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self._fd}>"


class Binding(_FdObject):
    """An eventfd bound to (table, vCPU, vector): each signal posts the vector in the kernel."""

    _what = "binding"

    def info(self) -> BindingInfo:
        arg = new_arg("kvmlu_binding_info")
        ioctl(self.fd, lib.KVMLU_BINDING_INFO, arg)
        return BindingInfo(
            int(arg.vcpu),
            int(arg.vector),
            bool(arg.state & lib.KVMLU_BINDING_ACTIVE),
            bool(arg.state & lib.KVMLU_BINDING_HUP),
            Stats.from_cdata(arg.stats),
        )


class Table(_FdObject):
    """A descriptor table: ``nr_vcpus`` posted-interrupt descriptors."""

    _what = "table"

    def __init__(self, fd: int, nr_vcpus: int) -> None:
        super().__init__(fd)
        self.nr_vcpus = nr_vcpus
        self._map: mmap.mmap | None = None
        self._view: Any = None

    def __repr__(self) -> str:
        return f"<Table fd={self._fd} nr_vcpus={self.nr_vcpus}>"

    @classmethod
    def from_fd(cls, fd: int) -> Table:
        """Adopt a table fd (retrieved or received); asks the kernel for its size."""
        arg = new_arg("kvmlu_table_info")
        ioctl(fd, lib.KVMLU_TABLE_INFO, arg)
        return cls(fd, int(arg.nr_vcpus))

    def set_notify(
        self, vcpu: int, eventfd: int | None, nv: int, ndst: int, *, attach: bool = False
    ) -> None:
        """Signal ``eventfd`` (or nothing, for None) on each ON transition of ``vcpu``.

        With ``attach`` the caller takes the descriptor over from a previous
        owner: if a vector is pending ON is set, and the new target is
        signalled once if ON is set. PIR is never written.
        """
        arg = new_arg(
            "kvmlu_table_set_notify",
            flags=lib.KVMLU_SET_NOTIFY_ATTACH if attach else 0,
            vcpu=vcpu,
            eventfd=-1 if eventfd is None else eventfd,
            nv=nv,
            ndst=ndst,
        )
        ioctl(self.fd, lib.KVMLU_TABLE_SET_NOTIFY, arg)

    def set_sn(self, vcpu: int, suppress: bool) -> None:
        """Set (``suppress``) or clear SN of ``vcpu``."""
        ioctl(
            self.fd,
            lib.KVMLU_TABLE_SET_SN,
            new_arg("kvmlu_table_set_sn", vcpu=vcpu, suppress=int(suppress)),
        )

    def peek(self, vcpu: int) -> Descriptor:
        """A copy of ``vcpu``'s descriptor, through the PEEK ioctl."""
        arg = new_arg("kvmlu_table_peek", vcpu=vcpu)
        ioctl(self.fd, lib.KVMLU_TABLE_PEEK, arg)
        return Descriptor.from_cdata(arg.desc)

    def fetch(self, vcpu: int) -> frozenset[int]:
        """Take the pending vectors of ``vcpu``: PIR is left empty and ON clear."""
        arg = new_arg("kvmlu_table_fetch", vcpu=vcpu)
        ioctl(self.fd, lib.KVMLU_TABLE_FETCH, arg)
        return vectors_from_words(arg.pir)

    def post(self, vcpu: int, vector: int) -> PostResult:
        """Post ``vector`` to ``vcpu`` exactly as an IRQ binding would."""
        arg = new_arg("kvmlu_table_post", vcpu=vcpu, vector=vector)
        ioctl(self.fd, lib.KVMLU_TABLE_POST, arg)
        return PostResult(arg.result)

    def bind(self, eventfd: int, vcpu: int, vector: int) -> Binding:
        """Post ``vector`` to ``vcpu`` in the kernel each time ``eventfd`` is signalled."""
        arg = new_arg("kvmlu_table_bind", eventfd=eventfd, vcpu=vcpu, vector=vector)
        ioctl(self.fd, lib.KVMLU_TABLE_BIND, arg)
        return Binding(int(arg.fd))

    def info(self) -> TableInfo:
        """The table's vCPU count, binding count and counters."""
        arg = new_arg("kvmlu_table_info")
        ioctl(self.fd, lib.KVMLU_TABLE_INFO, arg)
        return TableInfo(int(arg.nr_vcpus), int(arg.nr_bindings), Stats.from_cdata(arg.stats))

    # The read-only mmap view.

    @property
    def map_size(self) -> int:
        """Bytes of the table's mapping (whole pages)."""
        page = mmap.PAGESIZE
        return (self.nr_vcpus * DESC_SIZE + page - 1) // page * page

    def _descs(self) -> Any:
        if self._view is None:
            self._map = mmap.mmap(self.fd, self.map_size, mmap.MAP_SHARED, mmap.PROT_READ)
            self._view = ffi.from_buffer("struct kvmlu_pi_desc[]", self._map)
        return self._view

    def view(self, vcpu: int) -> Descriptor:
        """``vcpu``'s descriptor as read through the mapping (no ioctl)."""
        if not 0 <= vcpu < self.nr_vcpus:
            raise IndexError(f"vCPU {vcpu} not in 0..{self.nr_vcpus - 1}")
        return Descriptor.from_cdata(self._descs()[vcpu])

    def pir(self, vcpu: int) -> frozenset[int]:
        """Pending vectors of ``vcpu``, read through the mapping."""
        return self.view(vcpu).pir

    def on(self, vcpu: int) -> bool:
        return self.view(vcpu).on

    def sn(self, vcpu: int) -> bool:
        return self.view(vcpu).sn

    def nv(self, vcpu: int) -> int:
        return self.view(vcpu).nv

    def ndst(self, vcpu: int) -> int:
        return self.view(vcpu).ndst

    def close(self) -> None:
        """Drop the mapping, then close the table's fd."""
        if getattr(self, "_view", None) is not None:
            ffi.release(self._view)
            self._view = None
        if getattr(self, "_map", None) is not None:
            assert self._map is not None
            self._map.close()
            self._map = None
        super().close()


@dataclass(frozen=True)
class SessionEntry:
    """One session as KVMLU_LIST_SESSIONS reports it."""

    name: str
    nr_objects: int
    held: bool


class Session(_FdObject):
    """A named set of preserved files, handed from a process to its successor.

    Objects are preserved under u64 tokens the caller picks. Closing the fd
    leaves the session (and its objects) in the kernel; :meth:`finish` ends it.
    """

    _what = "session"

    def __init__(self, fd: int, name: str) -> None:
        super().__init__(fd)
        self.name = name

    def __repr__(self) -> str:
        return f"<Session {self.name!r} fd={self._fd}>"

    def preserve(self, fd: int, token: int) -> None:
        """Keep the file behind ``fd`` under ``token``; the caller's fd is untouched."""
        arg = new_arg("kvmlu_session_preserve", fd=fd, token=token)
        ioctl(self.fd, lib.KVMLU_SESSION_PRESERVE, arg)

    def retrieve(self, token: int) -> int:
        """A new O_CLOEXEC fd for the object under ``token``; it stays preserved."""
        arg = new_arg("kvmlu_session_token", token=token)
        ioctl(self.fd, lib.KVMLU_SESSION_RETRIEVE, arg)
        return int(arg.fd)

    def unpreserve(self, token: int) -> None:
        """Drop the session's reference to the object under ``token``."""
        ioctl(self.fd, lib.KVMLU_SESSION_UNPRESERVE, new_arg("kvmlu_session_token", token=token))

    def finish(self) -> None:
        """Drop every object the session holds and end it; its name is free again."""
        ioctl(self.fd, lib.KVMLU_SESSION_FINISH, new_arg("kvmlu_session_finish"))


def _name_arg(name: str) -> Any:
    raw = name.encode()
    arg = new_arg("kvmlu_session_create")
    if len(raw) > len(arg.name):
        raise ValueError(f"session name longer than {len(arg.name)} bytes")
    arg.name[0 : len(raw)] = list(raw)
    return arg


class Device(_FdObject):
    """``/dev/kvmlu``: queries the module and creates tables."""

    _what = "device"

    def __init__(self, path: str = DEVICE_PATH) -> None:
        super().__init__(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def query(self) -> ApiInfo:
        arg = new_arg("kvmlu_query")
        ioctl(self.fd, lib.KVMLU_QUERY, arg)
        return ApiInfo(
            int(arg.api_version),
            int(arg.max_vcpus),
            int(arg.capabilities),
            int(arg.nr_tables),
            int(arg.nr_bindings),
            int(arg.nr_sessions),
            Stats.from_cdata(arg.stats),
        )

    def create_session(self, name: str) -> Session:
        """A new session called ``name`` (EEXIST: :class:`ExistsError` if taken)."""
        arg = _name_arg(name)
        ioctl(self.fd, lib.KVMLU_CREATE_SESSION, arg)
        return Session(int(arg.fd), name)

    def retrieve_session(self, name: str) -> Session:
        """Open the existing session ``name``; EBUSY while another fd of it is open."""
        arg = _name_arg(name)
        ioctl(self.fd, lib.KVMLU_RETRIEVE_SESSION, arg)
        return Session(int(arg.fd), name)

    def list_sessions(self) -> list[SessionEntry]:
        """The sessions the caller may retrieve (its own, or all it administers),
        each with its object count and whether it is held."""
        while True:
            count = self.query().nr_sessions + 4
            entries = ffi.new("struct kvmlu_session_entry[]", count)
            arg = new_arg(
                "kvmlu_list_sessions", count=count, entries=int(ffi.cast("uintptr_t", entries))
            )
            ioctl(self.fd, lib.KVMLU_LIST_SESSIONS, arg)
            if arg.nr_sessions <= count:
                break
        return [
            SessionEntry(
                bytes(ffi.buffer(entries[i].name)).split(b"\0")[0].decode(errors="replace"),
                int(entries[i].nr_objects),
                bool(entries[i].state & lib.KVMLU_SESSION_HELD),
            )
            for i in range(arg.nr_sessions)
        ]

    def create_table(self, nr_vcpus: int) -> Table:
        """A new table of ``nr_vcpus`` zeroed descriptors."""
        arg = new_arg("kvmlu_create_table", nr_vcpus=nr_vcpus)
        ioctl(self.fd, lib.KVMLU_CREATE_TABLE, arg)
        return Table(int(arg.fd), nr_vcpus)
