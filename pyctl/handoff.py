"""Passing an upgrade's file descriptors from the old VMM to the new one.

Two ways, one manifest format. A manifest is JSON: ``{"objects": [{"name",
"kind"}...], ...}``; object *i* travels as the *i*-th fd.

- :func:`send` / :func:`receive`: SCM_RIGHTS over a UNIX socket while both
  processes live (as QEMU's cpr-transfer does).
- :func:`preserve` / :func:`retrieve`: through a kvmlu session, so the old
  process may exit first. Object *i* is preserved under token *i + 1*; the
  manifest itself is a memfd under token 0.

:func:`spawn_successor` starts the new process with exactly the fds it is
given: everything else pyctl opens is O_CLOEXEC.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyctl.kvmlu import Device, Session

MANIFEST_TOKEN = 0
_LEN = struct.Struct("<I")


@dataclass
class Handoff:
    """A manifest and the fds it describes (owned by the receiver)."""

    manifest: dict[str, Any]
    fds: list[int] = field(default_factory=list)

    def fd(self, name: str) -> int:
        """The fd of the object called ``name``."""
        for i, obj in enumerate(self.manifest["objects"]):
            if obj["name"] == name:
                return self.fds[i]
        raise KeyError(name)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def make_manifest(objects: Sequence[tuple[str, str]], **extra: Any) -> dict[str, Any]:
    """A manifest for (name, kind) pairs, in fd order, plus ``extra`` fields."""
    return {"objects": [{"name": n, "kind": k} for n, k in objects], **extra}


def send(sock: socket.socket, manifest: dict[str, Any], fds: Sequence[int]) -> None:
    """Send the manifest and its fds in one message (SCM_RIGHTS)."""
    if len(fds) != len(manifest["objects"]):
        raise ValueError("one fd per manifest object")
    body = json.dumps(manifest).encode()
    socket.send_fds(sock, [_LEN.pack(len(body)) + body], list(fds))


def receive(sock: socket.socket, max_fds: int = 253) -> Handoff:
    """Receive one message sent by :func:`send`."""
    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, max_fds)
    if len(data) < _LEN.size:
        raise ConnectionError("the old VMM closed the handoff socket")
    (n,) = _LEN.unpack_from(data)
    manifest = json.loads(data[_LEN.size : _LEN.size + n])
    for fd in fds:
        os.set_inheritable(fd, False)
    return Handoff(manifest, list(fds))


def preserve(
    dev: Device,
    name: str,
    manifest: dict[str, Any],
    fds: Sequence[int],
    stop_after: int | None = None,
) -> None:
    """Preserve the manifest and fds in a new session ``name``, then let go of it.

    ``stop_after`` preserves only that many objects (fault injection: a
    process that dies half-way through leaves such a session).
    """
    if len(fds) != len(manifest["objects"]):
        raise ValueError("one fd per manifest object")
    if stop_after is not None:
        fds = fds[:stop_after]
    with dev.create_session(name) as s:
        memfd = os.memfd_create("kvmlu-manifest", os.MFD_CLOEXEC)
        try:
            os.write(memfd, json.dumps(manifest).encode())
            s.preserve(memfd, MANIFEST_TOKEN)
        finally:
            os.close(memfd)
        for i, fd in enumerate(fds):
            s.preserve(fd, i + 1)


def retrieve(dev: Device, name: str) -> tuple[Handoff, Session]:
    """Retrieve session ``name``: its manifest, a new fd per object, and the session.

    The caller finishes the session once the new VMM runs; until then a
    successor that dies can retrieve everything again.
    """
    s = dev.retrieve_session(name)
    try:
        memfd = s.retrieve(MANIFEST_TOKEN)
        try:
            size = os.fstat(memfd).st_size
            manifest = json.loads(os.pread(memfd, size, 0))
        finally:
            os.close(memfd)
        fds: list[int] = []
        try:
            for i in range(len(manifest["objects"])):
                fds.append(s.retrieve(i + 1))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
    except BaseException:
        s.close()
        raise
    return Handoff(manifest, fds), s


def spawn_successor(argv: Sequence[str], pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """Fork and exec the new VMM with only ``pass_fds`` (plus stdio) inherited."""
    return subprocess.Popen(list(argv), pass_fds=tuple(pass_fds), close_fds=True)
