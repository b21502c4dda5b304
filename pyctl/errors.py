"""Exceptions raised by pyctl.

Everything pyctl raises for a failure is a subclass of one root. A kvmlu
ioctl's failure is chosen by errno in one table (:data:`ERRNO_CLASSES`) rather
than at each call site; the rest name what went wrong, not an errno::

    KvmluError (OSError)
     +-- UnknownCommandError        ENOTTY: not a command of this file
     +-- InvalidArgumentError       EINVAL: size, flags, reserved, wrong fd type
     +-- StructTooBigError          E2BIG: unknown non-zero tail
     +-- OutOfRangeError            ERANGE: vCPU, vector or count out of range
     +-- BadFileDescriptorError     EBADF: an fd field names no open file
     +-- PermissionDeniedError      EACCES, EPERM
     +-- BusyError                  EBUSY
     +-- NotFoundError              ENOENT
     +-- ExistsError                EEXIST
     +-- OutOfMemoryError           ENOMEM
     +-- ClosedError                the Python object was closed already
     +-- UsageError                 options that do not fit together (exit 2)
     +-- SetupError                 the machine lacks what is needed: the module,
     |                              an edu device on vfio-pci, a tool
     +-- InputError (ValueError)    a file given to a command is empty, not JSON,
     |                              or lacks what it must hold
     +-- RunError (RuntimeError)    a run went wrong: a VMM, a workload, a state
     |    +-- pyctl.upgrade.VmmError
     |    +-- pyctl.qemu.QemuError  the nested guest or its QEMU
     +-- pyctl.vm.VmError           the test VM cannot be set up as asked
          +-- pyctl.vm.VmUsageError options of kvmlu vm that cannot work

Misuse of an API (a wrong type, an impossible value passed by code) stays a
ValueError or TypeError.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any


class KvmluError(OSError):
    """Root of every error pyctl raises for a kvmlu object."""


class UnknownCommandError(KvmluError):
    """ENOTTY: the ioctl is not one of this file's commands."""


class InvalidArgumentError(KvmluError):
    """EINVAL: malformed argument (size, flags, reserved field, fd type)."""


class StructTooBigError(KvmluError):
    """E2BIG: the structure is larger than the kernel's, with a non-zero tail."""


class OutOfRangeError(KvmluError):
    """ERANGE: a vCPU, vector or count outside its range."""


class BadFileDescriptorError(KvmluError):
    """EBADF: an fd field names no open file."""


class PermissionDeniedError(KvmluError):
    """EACCES or EPERM."""


class BusyError(KvmluError):
    """EBUSY: the object is in use."""


class NotFoundError(KvmluError):
    """ENOENT: no such object."""


class ExistsError(KvmluError):
    """EEXIST: the object exists already."""


class OutOfMemoryError(KvmluError):
    """ENOMEM."""


class ClosedError(KvmluError):
    """The Python object was closed; its fd is gone."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EBADF, f"{what} is closed")


class UsageError(KvmluError):
    """A command's options do not fit together; ``kvmlu`` exits 2, as for argparse."""


class SetupError(KvmluError):
    """The machine lacks what a command needs: kvmlu.ko, an edu device, a tool."""


class InputError(KvmluError, ValueError):
    """A file a command reads is empty, not JSON, or lacks what it must hold."""


def load_json_object(
    path: str | os.PathLike[str], keys: tuple[str, ...], what: str
) -> dict[str, Any]:
    """The JSON object in *path*, which must have *keys*; :class:`InputError` if the
    file is missing, empty, not JSON, not an object, or lacks one of them. *what*
    names the file's kind in the message."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from e
    if not text.strip():
        raise InputError(f"{path}: empty, not a {what}")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not a {what}: {e}") from e
    if not isinstance(doc, dict):
        raise InputError(f"{path}: not a {what}: a JSON {type(doc).__name__}, not an object")
    missing = [k for k in keys if k not in doc]
    if missing:
        raise InputError(f"{path}: not a {what}: no {', '.join(missing)}")
    return doc


class RunError(KvmluError, RuntimeError):
    """A run went wrong: a VMM, a workload, or the state one side left."""


ERRNO_CLASSES: dict[int, type[KvmluError]] = {
    errno.ENOTTY: UnknownCommandError,
    errno.EINVAL: InvalidArgumentError,
    errno.E2BIG: StructTooBigError,
    errno.ERANGE: OutOfRangeError,
    errno.EBADF: BadFileDescriptorError,
    errno.EACCES: PermissionDeniedError,
    errno.EPERM: PermissionDeniedError,
    errno.EBUSY: BusyError,
    errno.ENOENT: NotFoundError,
    errno.EEXIST: ExistsError,
    errno.ENOMEM: OutOfMemoryError,
}


def error_for(err: int, what: str) -> KvmluError:
    """Return the exception for errno ``err`` raised by the operation ``what``."""
    cls = ERRNO_CLASSES.get(err, KvmluError)
    return cls(err, f"{what}: {os.strerror(err)}")
