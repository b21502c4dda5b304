"""The upgrade's state header: a length, once signalled, is never seen changing.

The old VMM writes the blob length and signals; the new VMM may read the
header while the old one writes the device state length beside it. This
runs that writer in a second process for real, on a shared memfd mapping,
while this one reads the blob length, many times.
"""

from __future__ import annotations

import mmap
import os

from pyctl.livevmm import _HDR, _set_state_len

BLOB_LEN = 11288
READS = 1_000_000


def test_device_state_length_leaves_the_blob_length_alone() -> None:
    fd = os.memfd_create("kvmlu-test-header", os.MFD_CLOEXEC)
    os.ftruncate(fd, mmap.PAGESIZE)
    m = mmap.mmap(fd, mmap.PAGESIZE)
    _HDR.pack_into(m, 0, BLOB_LEN, 0)  # the first part: written before its signal
    go_r, go_w = os.pipe()
    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_r, False)
    pid = os.fork()
    if pid == 0:  # the old VMM's side: the second part's length, again and again
        code = 1
        try:
            os.write(go_w, b"x")
            i = 0
            while True:
                _set_state_len(m, 64 + i % 2)
                i += 1
                if i % 1000 == 0:
                    try:
                        os.read(stop_r, 1)
                        break
                    except BlockingIOError:
                        pass
            code = 0
        finally:
            os._exit(code)
    try:
        os.read(go_r, 1)  # the writer is running
        seen: dict[int, int] = {}
        for _ in range(READS):
            n = _HDR.unpack_from(m, 0)[0]
            seen[n] = seen.get(n, 0) + 1
    finally:
        os.write(stop_w, b"x")
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert list(seen) == [BLOB_LEN], f"the blob length read as {seen}"
    assert _HDR.unpack_from(m, 0)[0] == BLOB_LEN
    m.close()
    for f in (fd, go_r, go_w, stop_r, stop_w):
        os.close(f)
