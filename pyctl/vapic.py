"""The versioned vAPIC modules: per-vCPU IRR/ISR state over a kvmlu table.

``/dev/kvmlu_vapic_v1`` and ``/dev/kvmlu_vapic_v2`` each create vAPIC objects
attached to a table; state moves between versions as a saved blob::

    with VapicDevice(1) as v1, v1.create(table) as old:
        old.sync(0); old.ack(0)
        blob = old.save()
    with VapicDevice(2) as v2, v2.create(table) as new:
        new.load(blob)          # PIR is left as it is
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from pyctl.kvmlu import Table, _FdObject, vectors_from_words
from pyctl.uapi import ffi, ioctl, lib, new_arg

BLOB_HEADER = struct.Struct("<IHHIIII")  # magic, version, header_size, size, nr, rec, crc


@dataclass(frozen=True)
class VapicState:
    """One vCPU's registers after a command; ``vector`` is ACK's or EOI's answer."""

    irr: frozenset[int]
    isr: frozenset[int]
    tmr: frozenset[int]
    vector: int
    moved: frozenset[int]


@dataclass(frozen=True)
class VapicInfo:
    version: int
    min_load_version: int
    vcpu_record_size: int


class Vapic(_FdObject):
    """A vAPIC object on one table."""

    _what = "vAPIC"

    def __init__(self, fd: int, version: int) -> None:
        super().__init__(fd)
        self.version = version
        self._blob_size: dict[int, int] = {}  # format -> size, from the last save

    def __repr__(self) -> str:
        return f"<Vapic v{self.version} fd={self._fd}>"

    def _vcpu(self, request: int, vcpu: int) -> VapicState:
        arg = new_arg("kvmlu_vapic_vcpu", vcpu=vcpu)
        ioctl(self.fd, request, arg)
        return VapicState(
            vectors_from_words(arg.irr),
            vectors_from_words(arg.isr),
            vectors_from_words(arg.tmr),
            int(arg.vector),
            vectors_from_words(arg.moved),
        )

    def sync(self, vcpu: int) -> VapicState:
        """Move ``vcpu``'s PIR into IRR (the table's FETCH semantics)."""
        return self._vcpu(lib.KVMLU_VAPIC_SYNC, vcpu)

    def ack(self, vcpu: int) -> int:
        """Move the highest deliverable IRR vector to ISR and return it (0: none)."""
        return self._vcpu(lib.KVMLU_VAPIC_ACK, vcpu).vector

    def eoi(self, vcpu: int) -> int:
        """Retire the highest in-service vector and return it (0: none)."""
        return self._vcpu(lib.KVMLU_VAPIC_EOI, vcpu).vector

    def get(self, vcpu: int) -> VapicState:
        return self._vcpu(lib.KVMLU_VAPIC_GET, vcpu)

    def blob_size(self, format: int = 0) -> int:
        """The size of a saved blob in ``format`` (asked once: it never changes)."""
        size = self._blob_size.get(format)
        if size is None:
            arg = new_arg("kvmlu_vapic_save", format=format)
            try:
                ioctl(self.fd, lib.KVMLU_VAPIC_SAVE, arg)
            except OSError as e:
                if e.errno != errno.ENOSPC:  # now we know the size
                    raise
            size = self._blob_size[format] = int(arg.blob_size)
        return size

    def save_into(self, buf: Any, format: int = 0) -> int:
        """Save into the writable buffer ``buf`` (a shared mapping, say); the size.

        After the first call of a format this is one ioctl and no copy in
        Python: the kernel writes straight into ``buf``.
        """
        cbuf = ffi.from_buffer(buf, require_writable=True)
        arg = new_arg(
            "kvmlu_vapic_save",
            buf=int(ffi.cast("uintptr_t", cbuf)),
            buf_len=len(cbuf),
            format=format,
        )
        ioctl(self.fd, lib.KVMLU_VAPIC_SAVE, arg)
        return int(arg.blob_size)

    def save(self, format: int = 0) -> bytes:
        """The whole state as a blob in this module's format, or an older ``format``."""
        buf = bytearray(self.blob_size(format))
        return bytes(buf[: self.save_into(buf, format)])

    def load(self, blob: Any) -> None:
        """Replace the state from ``blob`` (bytes or any buffer, a shared mapping
        too). PIR is never touched."""
        buf = ffi.from_buffer(blob)
        arg = new_arg(
            "kvmlu_vapic_load",
            buf=int(ffi.cast("uintptr_t", buf)),
            buf_len=len(buf),
        )
        ioctl(self.fd, lib.KVMLU_VAPIC_LOAD, arg)


class VapicDevice(_FdObject):
    """``/dev/kvmlu_vapic_v<version>``."""

    _what = "vAPIC device"

    def __init__(self, version: int) -> None:
        self.version = version
        super().__init__(os.open(f"/dev/kvmlu_vapic_v{version}", os.O_RDWR | os.O_CLOEXEC))

    def query(self) -> VapicInfo:
        arg = new_arg("kvmlu_vapic_query")
        ioctl(self.fd, lib.KVMLU_VAPIC_QUERY, arg)
        return VapicInfo(int(arg.version), int(arg.min_load_version), int(arg.vcpu_record_size))

    def create(self, table: Table | int) -> Vapic:
        """A vAPIC attached to ``table`` (a Table or a table fd), which it keeps alive."""
        fd = table if isinstance(table, int) else table.fd
        arg = new_arg("kvmlu_create_vapic", table_fd=fd)
        ioctl(self.fd, lib.KVMLU_CREATE_VAPIC, arg)
        return Vapic(int(arg.fd), self.version)


def blob_header(blob: bytes) -> dict[str, Any]:
    """The fields of a blob's header."""
    names = ("magic", "version", "header_size", "size", "nr_vcpus", "vcpu_size", "checksum")
    return dict(zip(names, BLOB_HEADER.unpack_from(blob), strict=True))


def rewrite_blob(blob: bytes, *, fix_checksum: bool = True, **fields: int) -> bytes:
    """``blob`` with header ``fields`` replaced (for tests and tools)."""
    h = {**blob_header(blob), **fields}
    body = blob[BLOB_HEADER.size :]
    if fix_checksum:
        h["checksum"] = zlib.crc32(body)
    return BLOB_HEADER.pack(*h.values()) + body
