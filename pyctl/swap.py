"""Swapping vAPIC modules under a VM: save on one version, load on another.

The tables (and their PIR) stay in kvmlu.ko throughout; only the vAPIC state
travels, as a blob. :func:`swap` moves every table's vAPIC, checks that IRR
and ISR arrived as they left, and times each step.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyctl.errors import KvmluError
from pyctl.kvmlu import Table
from pyctl.vapic import Vapic, VapicDevice


@dataclass
class SwapReport:
    """What a swap did and how long each step took, in seconds."""

    tables: int = 0
    vcpus: int = 0
    blob_bytes: int = 0
    steps: dict[str, float] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def text(self) -> str:
        steps = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in self.steps.items())
        verdict = "state intact" if self.ok else f"MISMATCH: {'; '.join(self.mismatches)}"
        return f"{self.tables} tables, {self.vcpus} vCPUs, {self.blob_bytes} B: {steps}; {verdict}"


def module_name(version: int) -> str:
    return f"kvmlu_vapic_v{version}"


def unload(version: int) -> None:
    """rmmod the vAPIC module; fails (KvmluError) while any of its objects lives."""
    r = subprocess.run(["rmmod", module_name(version)], capture_output=True, text=True, check=False)
    if r.returncode:
        raise KvmluError(0, f"rmmod {module_name(version)}: {r.stderr.strip()}")


def load_module(path: Path, version: int, timeout: float = 10.0) -> None:
    """insmod a vAPIC module and wait for its device node."""
    subprocess.run(["insmod", str(path)], check=True, capture_output=True)
    node = Path(f"/dev/{module_name(version)}")
    deadline = time.monotonic() + timeout
    while not node.exists():
        if time.monotonic() > deadline:
            raise KvmluError(0, f"{node} did not appear")
        time.sleep(0.005)


def swap(
    pairs: Sequence[tuple[Table, Vapic]],
    to: VapicDevice,
    *,
    format: int = 0,
    unload_old: bool = False,
) -> tuple[list[Vapic], SwapReport]:
    """Move each (table, vAPIC) to module ``to``; the old vAPICs are closed.

    ``format`` picks the blob's format version (0: the old module's own).
    With ``unload_old`` the old module is unloaded once its objects are gone.
    """
    rep = SwapReport(tables=len(pairs), vcpus=sum(t.nr_vcpus for t, _ in pairs))
    before = [[v.get(i) for i in range(t.nr_vcpus)] for t, v in pairs]
    t0 = time.perf_counter()
    blobs = [v.save(format) for _, v in pairs]
    t1 = time.perf_counter()
    new = []
    for (t, _), blob in zip(pairs, blobs, strict=True):
        n = to.create(t)
        n.load(blob)
        new.append(n)
    t2 = time.perf_counter()
    for (t, _), b, n in zip(pairs, before, new, strict=True):
        for i in range(t.nr_vcpus):
            a, s = b[i], n.get(i)
            if (a.irr, a.isr) != (s.irr, s.isr):
                rep.mismatches.append(f"vCPU {i}: {a} became {s}")
    t3 = time.perf_counter()
    old_version = pairs[0][1].version if pairs else 0
    for _, v in pairs:
        v.close()
    t4 = time.perf_counter()
    if unload_old and old_version:
        unload(old_version)
    t5 = time.perf_counter()
    rep.blob_bytes = sum(len(b) for b in blobs)
    rep.steps = {"save": t1 - t0, "load": t2 - t1, "check": t3 - t2, "close": t4 - t3}
    # "check" reads every vCPU back through GET; the snapshot taken before the
    # save for it is not timed.
    if unload_old:
        rep.steps["unload"] = t5 - t4
    return new, rep
