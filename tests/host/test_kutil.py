"""The kernel tests' helpers that need no VM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))

from kutil import CHECKOUT, module_path  # after the path above


def test_module_path_is_the_one_the_run_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMLU_MODULES", "/d/kvmlu.ko:/d/kvmlu_vapic_v1.ko")
    assert module_path("kvmlu_vapic_v1") == Path("/d/kvmlu_vapic_v1.ko")
    assert module_path("kvmlu_vapic_v2") == CHECKOUT / "kmod/kvmlu_vapic_v2.ko"
    monkeypatch.delenv("KVMLU_MODULES")
    assert module_path("kvmlu") == CHECKOUT / "kmod/kvmlu.ko"
