"""The kvmlu uAPI as cffi sees it, and the one place that issues ioctls.

``ffi`` and ``lib`` come from the API-mode extension built from
``kmod/include/uapi/linux/kvmlu.h``; nothing here restates a layout.
"""

from __future__ import annotations

from typing import Any

from pyctl._kvmlu_cffi import ffi, lib
from pyctl.errors import error_for

__all__ = ["ffi", "ioctl", "lib", "new_arg"]

#: ioctl request number -> name, for error messages.
REQUEST_NAMES: dict[int, str] = {
    getattr(lib, name): name
    for name in dir(lib)
    if name.startswith("KVMLU_")
    and not name.startswith(("KVMLU_CMD_", "KVMLU_PI_", "KVMLU_POST_", "KVMLU_CAP_"))
    and name
    not in {
        "KVMLU_IOCTL_TYPE",
        "KVMLU_API_VERSION",
        "KVMLU_MAX_VCPUS",
        "KVMLU_VECTOR_MIN",
        "KVMLU_VECTOR_MAX",
        "KVMLU_NR_VECTORS",
        "KVMLU_TABLE_CMD_BASE",
        "KVMLU_BINDING_CMD_BASE",
        "KVMLU_BINDING_ACTIVE",
        "KVMLU_BINDING_HUP",
        "KVMLU_SESSION_CMD_BASE",
        "KVMLU_SET_NOTIFY_ATTACH",
        "KVMLU_SET_NOTIFY_FLAGS",
        "KVMLU_SESSION_NAME_LEN",
        "KVMLU_SESSION_HELD",
        "KVMLU_VAPIC_DEV_CMD_BASE",
        "KVMLU_VAPIC_CMD_BASE",
        "KVMLU_VAPIC_MAGIC",
    }
}


def new_arg(struct: str, **fields: int) -> Any:
    """Allocate ``struct <struct>`` zeroed, with ``size`` set and ``fields`` filled in."""
    arg = ffi.new(f"struct {struct} *")
    arg.size = ffi.sizeof(f"struct {struct}")
    for name, value in fields.items():
        setattr(arg, name, value)
    return arg


def ioctl(fd: int, request: int, arg: Any, what: str | None = None) -> int:
    """Issue ``ioctl(fd, request, arg)``; ``arg`` is cdata, a writable buffer or an int.

    The GIL is released during the call. Raises the :mod:`pyctl.errors` class
    for the errno on failure (naming the request, or ``what``) and returns the
    ioctl's value otherwise.
    """
    direct = isinstance(arg, (int, ffi.CData))
    ptr = ffi.cast("void *", arg) if direct else ffi.from_buffer(arg)
    ret: int = lib.ioctl(fd, request, ptr)
    if ret < 0:
        err = ffi.errno
        raise error_for(err, what or REQUEST_NAMES.get(request, hex(request)))
    return ret
