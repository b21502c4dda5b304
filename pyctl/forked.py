"""Run a function in a forked child that has taken on another identity.

The child keeps the parent's open files (a /dev/kvmlu fd opened as root, for
example) and reports one JSON value back through a pipe; kvmlu judges the
calling task's credentials at each ioctl, so this is how a test or a
benchmark acts as another owner.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


class ChildError(RuntimeError):
    """The child raised, or exited without reporting."""


def drop_to_uid(uid: int) -> None:
    """Become ``uid`` (and gid ``uid``, no supplementary groups) for good."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def in_child(become: Callable[[], None], fn: Callable[[], Any]) -> Any:
    """Fork; in the child call ``become()`` then ``fn()``; return what ``fn`` returned.

    The value must be JSON. Whatever the child raises comes back as a
    :class:`ChildError` naming it.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(r)
            become()
            report = json.dumps({"value": fn()})
            code = 0
        except BaseException as e:  # everything goes to the parent
            report = json.dumps({"error": repr(e)})
        try:
            os.write(w, report.encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    out = json.loads(data) if data else {"error": "the child reported nothing"}
    if "error" in out or os.waitstatus_to_exitcode(status) != 0:
        raise ChildError(out.get("error", f"the child exited with status {status}"))
    return out["value"]
