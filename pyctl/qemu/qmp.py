"""A small synchronous QMP client: commands, their answers, and the events between.

QEMU's monitor protocol (``docs/interop/qmp-spec.rst``) is JSON lines over a
socket: a greeting, ``qmp_capabilities``, then each ``{"execute": ...}`` is
answered by one ``{"return": ...}`` or ``{"error": ...}``, with
``{"event": ..., "timestamp": {"seconds", "microseconds"}}`` lines in
between. :class:`Qmp` keeps every event it reads, in order, so a caller can
wait for one that came while it waited for something else; the timestamp is
QEMU's host wall clock, which :attr:`Event.time` gives in seconds.
"""

from __future__ import annotations

import json
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyctl.closing import Closing
from pyctl.qemu import QemuError


class QmpError(QemuError):
    """QEMU answered a command with an error, or the monitor went away."""


@dataclass(frozen=True)
class Event:
    """One QMP event."""

    name: str
    data: dict[str, Any]
    #: QEMU's timestamp (host wall clock), in seconds.
    time: float


class Qmp(Closing):
    """A connected, negotiated QMP monitor."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self.events: list[Event] = []
        self.greeting = self._read_message(time.monotonic() + 30.0)
        if "QMP" not in self.greeting:
            raise QmpError(f"not a QMP greeting: {self.greeting!r}")
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: Path, timeout: float = 60.0) -> Qmp:
        """Connect to a monitor socket, retrying until QEMU has created it."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(path))
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP monitor at {path} within {timeout:g} s") from None
                time.sleep(0.02)
            except BaseException:
                sock.close()
                raise

    def close(self) -> None:
        self.sock.close()

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError("the QMP monitor closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QmpError(f"unexpected QMP message {msg!r}")
        return msg

    def _note_event(self, msg: dict[str, Any]) -> None:
        ts = msg.get("timestamp", {})
        stamp = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
        self.events.append(Event(msg["event"], msg.get("data", {}), stamp))

    def execute(self, command: str, timeout: float = 60.0, **arguments: Any) -> Any:
        """Run *command*; its ``return`` value. Events read meanwhile are kept."""
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + timeout
        try:
            while True:
                msg = self._read_message(deadline)
                if "event" in msg:
                    self._note_event(msg)
                elif "return" in msg:
                    return msg["return"]
                elif "error" in msg:
                    err = msg["error"]
                    raise QmpError(f"{command}: {err.get('class')}: {err.get('desc')}")
        except TimeoutError:
            raise QmpError(f"no answer to {command} within {timeout:g} s") from None

    def wait_event(self, name: str, timeout: float, since: int = 0, **match: Any) -> Event:
        """The first event *name* (at index >= *since*) whose data has *match*."""
        deadline = time.monotonic() + timeout
        i = since
        while True:
            while i < len(self.events):
                ev = self.events[i]
                i += 1
                if ev.name == name and all(ev.data.get(k) == v for k, v in match.items()):
                    return ev
            try:
                msg = self._read_message(deadline)
            except TimeoutError:
                raise QmpError(f"no {name} event within {timeout:g} s") from None
            if "event" in msg:
                self._note_event(msg)
