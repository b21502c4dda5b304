"""The QEMU patch series: every patch is listed, well-formed and checkpatch-clean.

The checkpatch run uses QEMU's own scripts/checkpatch.pl from the tree that
`make qemu` unpacked into the cache (KVMLU_QEMU_CACHE, default
/var/cache/kvmlu/qemu); without that tree it is skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCHES = ROOT / "qemu-patches"
SERIES = PATCHES / "series"
QEMU_CACHE = Path(os.environ.get("KVMLU_QEMU_CACHE", "/var/cache/kvmlu/qemu"))

# The first line git format-patch writes: the commit and a fixed date.
FROM_LINE = re.compile(r"From [0-9a-f]{40} Mon Sep 17 00:00:00 2001\n")


def series() -> list[str]:
    """The patch file names in qemu-patches/series, in order."""
    names = []
    for line in SERIES.read_text().splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            names.append(words[0])
    return names


def test_series_is_not_empty() -> None:
    """The series lists at least one patch."""
    assert series(), f"{SERIES} lists no patch"


def test_every_patch_file_is_in_the_series() -> None:
    """No .patch file in qemu-patches/ is left out of the series."""
    unlisted = sorted({p.name for p in PATCHES.glob("*.patch")} - set(series()))
    assert not unlisted, f"not in {SERIES.name}: {unlisted}"


@pytest.mark.parametrize("name", series())
def test_patch_is_a_signed_format_patch(name: str) -> None:
    """Each listed patch exists and is a git format-patch mail with a Signed-off-by."""
    path = PATCHES / name
    assert path.is_file(), f"{SERIES.name} lists {name}, which does not exist"
    text = path.read_text()
    assert FROM_LINE.match(text), f"{name} does not start like a git format-patch file"
    header, sep, rest = text.partition("\n---\n")
    assert sep, f"{name} has no '---' line between message and diff"
    assert re.search(r"^Subject: \[PATCH[^]]*\] \S", header, re.M), f"{name}: no Subject"
    assert re.search(r"^Signed-off-by: .+ <[^>]+@[^>]+>$", header, re.M), (
        f"{name}: no Signed-off-by in the commit message"
    )
    assert "\ndiff --git a/" in "\n" + rest, f"{name} contains no diff"


def checkpatch() -> Path:
    """QEMU's checkpatch.pl in the cached tree, or a skip when there is none."""
    script = QEMU_CACHE / "current" / "src" / "scripts" / "checkpatch.pl"
    if not script.is_file():
        pytest.skip(f"no cached QEMU tree ({script} missing): run make qemu first")
    return script


@pytest.mark.parametrize("name", series())
def test_patch_is_checkpatch_clean(name: str) -> None:
    """QEMU's scripts/checkpatch.pl finds no error and no warning in the patch."""
    script = checkpatch()
    path = PATCHES / name
    r = subprocess.run(
        ["perl", str(script), str(path)],
        cwd=script.parents[1],  # checkpatch wants to run at the top of a tree
        capture_output=True,
        text=True,
        check=False,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "total: 0 errors, 0 warnings" in out, out
