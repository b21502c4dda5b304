"""The uAPI as Python sees it: numbers, layouts, decoding. No kernel needed."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import ioctl_opt
import pytest

from pyctl import errors
from pyctl.kvmlu import Descriptor, PostResult, vectors_from_words
from pyctl.uapi import REQUEST_NAMES, ffi, lib

HEADER = Path(__file__).resolve().parents[2] / "kmod/include/uapi/linux/kvmlu.h"
IOCTL_RE = re.compile(r"^#define\s+(KVMLU_\w+)\s+_IO\(KVMLU_IOCTL_TYPE,\s*(KVMLU_CMD_\w+)\)", re.M)


def header_ioctls() -> list[tuple[str, str]]:
    found = IOCTL_RE.findall(HEADER.read_text())
    assert found, "no ioctl found in the header"
    return found


@pytest.mark.parametrize("name,cmd", header_ioctls())
def test_ioctl_number_matches_ioctl_opt(name: str, cmd: str) -> None:
    """Each request number cffi takes from the header equals ioctl-opt's _IO()."""
    assert getattr(lib, name) == ioctl_opt.IO(lib.KVMLU_IOCTL_TYPE, getattr(lib, cmd))


def test_every_header_ioctl_is_declared() -> None:
    """The cffi declarations name every ioctl of the header, and nothing else."""
    assert {n for n, _ in header_ioctls()} == set(REQUEST_NAMES.values())


def test_request_numbers_are_distinct() -> None:
    numbers = [getattr(lib, n) for n, _ in header_ioctls()]
    assert len(set(numbers)) == len(numbers)


def test_pi_desc_layout() -> None:
    """The descriptor is VT-d's: 64 bytes, PIR at 0, control at 32, reserved to the end."""
    assert ffi.sizeof("struct kvmlu_pi_desc") == 64
    assert ffi.offsetof("struct kvmlu_pi_desc", "pir") == 0
    assert ffi.offsetof("struct kvmlu_pi_desc", "control") == 32
    assert ffi.offsetof("struct kvmlu_pi_desc", "reserved") == 40
    assert (lib.KVMLU_PI_ON_BIT, lib.KVMLU_PI_SN_BIT) == (0, 1)
    assert (lib.KVMLU_PI_NV_SHIFT, lib.KVMLU_PI_NV_MASK) == (16, 0xFF)
    assert (lib.KVMLU_PI_NDST_SHIFT, lib.KVMLU_PI_NDST_MASK) == (32, 0xFFFFFFFF)


@pytest.mark.parametrize(
    "struct",
    [
        "kvmlu_query",
        "kvmlu_create_table",
        "kvmlu_table_set_notify",
        "kvmlu_table_set_sn",
        "kvmlu_table_peek",
        "kvmlu_table_fetch",
        "kvmlu_table_post",
        "kvmlu_table_bind",
        "kvmlu_table_info",
        "kvmlu_binding_info",
        "kvmlu_session_create",
        "kvmlu_list_sessions",
        "kvmlu_session_preserve",
        "kvmlu_session_token",
        "kvmlu_session_finish",
    ],
)
def test_structs_start_with_size_and_flags(struct: str) -> None:
    """size is the first __u32 and flags the second; every structure is padded to 8."""
    assert ffi.offsetof(f"struct {struct}", "size") == 0
    assert ffi.offsetof(f"struct {struct}", "flags") == 4
    assert ffi.sizeof(f"struct {struct}") % 8 == 0


def test_vector_range() -> None:
    assert (lib.KVMLU_VECTOR_MIN, lib.KVMLU_VECTOR_MAX, lib.KVMLU_NR_VECTORS) == (32, 255, 256)


def test_vectors_from_words() -> None:
    words = [1 << 32, 1 << 63, 0, (1 << 63) | 1]
    assert vectors_from_words(words) == {32, 127, 192, 255}
    assert vectors_from_words([0, 0, 0, 0]) == frozenset()


def test_descriptor_decoding() -> None:
    d = Descriptor(frozenset({0x41}), (0xDEADBEEF << 32) | (0xF2 << 16) | 0b11)
    assert (d.on, d.sn, d.nv, d.ndst) == (True, True, 0xF2, 0xDEADBEEF)
    assert str(d) == "ON=1 SN=1 NV=0xf2 NDST=0xdeadbeef PIR={0x41}"


def test_post_result_bits_are_distinct() -> None:
    bits = [int(f) for f in PostResult]
    assert len(bits) == 3
    assert all(b & (b - 1) == 0 for b in bits)
    assert len(set(bits)) == 3


@pytest.mark.parametrize(
    "err,cls",
    [
        (errno.EINVAL, errors.InvalidArgumentError),
        (errno.E2BIG, errors.StructTooBigError),
        (errno.ERANGE, errors.OutOfRangeError),
        (errno.EBADF, errors.BadFileDescriptorError),
        (errno.ENOTTY, errors.UnknownCommandError),
        (errno.EACCES, errors.PermissionDeniedError),
        (errno.EBUSY, errors.BusyError),
        (errno.EIO, errors.KvmluError),
    ],
)
def test_errno_mapping(err: int, cls: type[errors.KvmluError]) -> None:
    """Errors map to their named class under the one root, keeping errno."""
    e = errors.error_for(err, "KVMLU_TABLE_POST")
    assert type(e) is cls
    assert isinstance(e, errors.KvmluError)
    assert isinstance(e, OSError)
    assert e.errno == err
    assert "KVMLU_TABLE_POST" in str(e)
