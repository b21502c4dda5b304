"""The modules build with W=1 and without a single warning."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyctl.vm import find_kernel

ROOT = Path(__file__).resolve().parents[2]


def test_modules_build_with_w1_without_warnings(tmp_path: Path) -> None:
    """A W=1 build of a copy of the tree prints no warning and yields kvmlu.ko."""
    try:
        kernel = find_kernel(os.environ.get("KVMLU_KERNEL"))
    except Exception as e:  # no headers installed: make test installs them first
        pytest.skip(f"no kernel headers: {e}")
    shutil.copy(ROOT / "Kbuild", tmp_path / "Kbuild")
    junk = shutil.ignore_patterns("*.o", "*.ko", ".*.cmd", "*.mod*")
    shutil.copytree(ROOT / "kmod", tmp_path / "kmod", ignore=junk)
    r = subprocess.run(
        ["make", "-C", str(kernel.build_dir), f"M={tmp_path}", "W=1", "modules"],
        capture_output=True,
        text=True,
        check=False,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    warnings = [line for line in out.splitlines() if "warning:" in line.lower()]
    assert not warnings, "\n".join(warnings)
    assert (tmp_path / "kmod" / "kvmlu.ko").exists()
