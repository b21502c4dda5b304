"""The kernel tests' helpers that need no VM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))

from kutil import CHECKOUT, FuzzStats, module_path  # after the path above


def test_module_path_is_the_one_the_run_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMLU_MODULES", "/d/kvmlu.ko:/d/kvmlu_vapic_v1.ko")
    assert module_path("kvmlu_vapic_v1") == Path("/d/kvmlu_vapic_v1.ko")
    assert module_path("kvmlu_vapic_v2") == CHECKOUT / "kmod/kvmlu_vapic_v2.ko"
    monkeypatch.delenv("KVMLU_MODULES")
    assert module_path("kvmlu") == CHECKOUT / "kmod/kvmlu.ko"


def test_fuzz_stats_are_written_where_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = FuzzStats()
    stats.add("programs")
    stats.add("steps", 25)
    stats.add("malformed_calls")
    monkeypatch.delenv("KVMLU_FUZZ_STATS", raising=False)
    stats.write()  # nowhere to write: nothing happens
    out = tmp_path / "stats-0.json"
    monkeypatch.setenv("KVMLU_FUZZ_STATS", str(out))
    stats.write()
    doc = json.loads(out.read_text())
    assert (doc["programs"], doc["steps"], doc["malformed_calls"]) == (1, 25, 1)
    assert doc["seconds"] >= 0
