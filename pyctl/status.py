"""What ``kvmlu status`` shows: the module's own report."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pyctl.kvmlu import DEVICE_PATH, Device
from pyctl.uapi import lib

CAPABILITIES = {lib.KVMLU_CAP_TABLES: "tables", lib.KVMLU_CAP_BINDINGS: "bindings"}


def _module_refcnt() -> int | None:
    try:
        return int(Path("/sys/module/kvmlu/refcnt").read_text())
    except (OSError, ValueError):
        return None


def status_dict(dev: Device) -> dict[str, Any]:
    """QUERY's answer, plus the module's reference count, as plain data."""
    info = dev.query()
    return {
        "device": DEVICE_PATH,
        "api_version": info.api_version,
        "max_vcpus": info.max_vcpus,
        "capabilities": [n for bit, n in CAPABILITIES.items() if info.capabilities & bit],
        "tables": info.nr_tables,
        "bindings": info.nr_bindings,
        "counters": dataclasses.asdict(info.stats),
        "module_refcnt": _module_refcnt(),
    }


def print_status(dev: Device) -> None:
    """Print what kvmlu.ko reports, for people."""
    s = status_dict(dev)
    c = s["counters"]
    print(f"kvmlu.ko loaded: {s['device']}, API version {s['api_version']}")
    print(f"  capabilities: {', '.join(s['capabilities'])}")
    print(f"  max vCPUs per table: {s['max_vcpus']}")
    print(f"  alive: {s['tables']} tables, {s['bindings']} IRQ bindings")
    print(
        f"  posting since load: {c['signals']} signals = {c['posted']} posted"
        f" + {c['coalesced']} coalesced; {c['notified']} notified, {c['suppressed']} suppressed"
    )
    print(f"  module references: {s['module_refcnt']}")
