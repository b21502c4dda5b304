"""The PIR preservation checker: lost, spurious and duplicated interrupts.

Input is a timeline per (vCPU, vector):

- a :class:`Raise` for each interrupt the device raised, stamped when the MSI
  had *landed* (the host's handler ran), so any fetch that starts later must
  see it;
- a :class:`Fetch` for each time an owner (old or new VMM) took what was
  pending on a vCPU, stamped when the fetch *started*, with the vectors it
  returned (possibly none).

Where the owner runs concurrently with the device (vCPU threads that fetch
while interrupts are being raised), two more stamps make the timeline exact:
a raise may carry ``issued`` (when the device was told to raise: a fetch
that ends after it may already take the vector) and a fetch may carry
``end`` (when it returned: it may have taken a vector raised until then).
A fetch then loses only raises that had landed before it *started*.

Equal vectors coalesce, as in hardware: one delivery covers every raise since
the previous delivery of that vector. A fetch that returns a vector no raise
stands behind is *spurious*, or *duplicated* if that vector was delivered
before (the same interrupt delivered twice, as when a new VMM re-injects what
the old one had already taken). A fetch that does not return a vector whose
raises had landed before it started means those raises are *lost*: once an
MSI has landed, its vector must be pending. Raises still uncovered at the end
are lost too; the caller's last fetch takes what is pending then.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from pyctl.errors import InputError, load_json_object

Key = tuple[int, int]  # (vCPU, vector)


@dataclass(frozen=True, order=True)
class Raise:
    """An interrupt the device raised, landed at ``t`` (CLOCK_MONOTONIC seconds)."""

    t: float
    vcpu: int
    vector: int
    issued: float | None = None  # when it was raised, if known (before ``t``)


@dataclass(frozen=True)
class Fetch:
    """A fetch of ``vcpu`` by ``side`` that started at ``t`` and took ``vectors``."""

    t: float
    vcpu: int
    vectors: frozenset[int]
    side: str = "new"
    end: float | None = None  # when it returned, if known (after ``t``)


@dataclass
class KeyReport:
    """What happened to one (vCPU, vector)."""

    raised: int = 0
    delivered: int = 0
    lost: int = 0
    spurious: int = 0
    duplicated: int = 0
    raised_in_switch: int = 0


@dataclass
class Report:
    """The checker's verdict; :attr:`ok` means nothing lost, spurious or duplicated."""

    keys: dict[Key, KeyReport] = field(default_factory=dict)
    switch: tuple[float, float] | None = None

    def total(self, what: str) -> int:
        return sum(getattr(k, what) for k in self.keys.values())

    @property
    def lost(self) -> int:
        return self.total("lost")

    @property
    def spurious(self) -> int:
        return self.total("spurious")

    @property
    def duplicated(self) -> int:
        return self.total("duplicated")

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.spurious == 0 and self.duplicated == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "lost": self.lost,
            "spurious": self.spurious,
            "duplicated": self.duplicated,
            "switch": list(self.switch) if self.switch else None,
            "keys": [
                {"vcpu": v, "vector": x, **asdict(r)} for (v, x), r in sorted(self.keys.items())
            ],
        }

    def text(self) -> str:
        lines = [
            f"{'vCPU':>4} {'vector':>6} {'raised':>6} {'in-switch':>9} {'delivered':>9} "
            f"{'lost':>4} {'spurious':>8} {'dup':>3}"
        ]
        for (v, x), r in sorted(self.keys.items()):
            lines.append(
                f"{v:>4} {f'0x{x:02x}':>6} {r.raised:>6} {r.raised_in_switch:>9} "
                f"{r.delivered:>9} {r.lost:>4} {r.spurious:>8} {r.duplicated:>3}"
            )
        verdict = "OK" if self.ok else "FAIL"
        lines.append(
            f"{verdict}: {self.lost} lost, {self.spurious} spurious, {self.duplicated} duplicated"
        )
        return "\n".join(lines)


# Event kinds, in the order they sort at equal times.
_ISSUE, _LAND, _FETCH = 0, 1, 2


def check(
    raises: Iterable[Raise],
    fetches: Iterable[Fetch],
    switch: tuple[float, float] | None = None,
) -> Report:
    """Compare what was raised with what was fetched; see the module docstring."""
    fetches = list(fetches)
    keys: set[Key] = set()
    # (time, kind, fetch start, got, issued-before-landing)
    events: dict[Key, list[tuple[float, int, float, bool, bool]]] = defaultdict(list)
    for r in raises:
        key = (r.vcpu, r.vector)
        keys.add(key)
        if r.issued is not None:
            events[key].append((r.issued, _ISSUE, 0.0, False, True))
        events[key].append((r.t, _LAND, 0.0, False, r.issued is not None))
    for f in fetches:
        keys.update((f.vcpu, x) for x in f.vectors)
    for f in fetches:
        end = f.t if f.end is None else f.end
        for key in keys:
            if key[0] == f.vcpu:
                events[key].append((end, _FETCH, f.t, key[1] in f.vectors, False))
    report = Report(switch=switch)
    for key in sorted(keys):
        report.keys[key] = _walk(sorted(events[key]), switch)
    return report


def _walk(
    events: list[tuple[float, int, float, bool, bool]], switch: tuple[float, float] | None
) -> KeyReport:
    """One key's events in time order: issues, landings and fetches (at their end).

    A fetch that took the vector while a raise was in flight (issued, not
    landed, or landed after the fetch started) may or may not have taken
    that raise. Such a raise may justify one later delivery, and a later
    fetch that does not return it is no proof of a loss.
    """
    kr = KeyReport()
    landed: list[float] = []  # landing times of raises a delivery must still cover
    optional: list[float] = []  # landed raises an earlier fetch may have taken
    # In-flight raises in issue order: "free" (no delivery could be theirs
    # yet), "maybe" (one could), "used" (one was, for certain).
    flight: list[str] = []
    delivered_before = False
    for t, kind, start, got, issued in events:
        if kind == _ISSUE:
            flight.append("free")
        elif kind == _LAND:
            kr.raised += 1
            kr.raised_in_switch += bool(switch and switch[0] <= t <= switch[1])
            state = flight.pop(0) if issued else "free"
            if state == "free":
                landed.append(t)
            elif state == "maybe":
                optional.append(t)
        elif got:
            kr.delivered += 1
            if landed or optional or "free" in flight:
                pass
            elif "maybe" in flight:
                flight[flight.index("maybe")] = "used"  # this delivery is that raise's
            elif delivered_before:
                kr.duplicated += 1
            else:
                kr.spurious += 1
            optional = [x for x in landed + optional if x >= start]
            landed = []
            flight = ["maybe" if f == "free" else f for f in flight]
            delivered_before = True
        else:
            # Raises that landed before the fetch started had to be in it.
            kr.lost += sum(1 for x in landed if x < start)
            landed = [x for x in landed if x >= start]
            optional = [x for x in optional if x >= start]
    kr.lost += len(landed)
    return kr


def load_log(path: str) -> tuple[list[Raise], list[Fetch], tuple[float, float] | None]:
    """Read a JSON log: ``{"raises": [[t, vcpu, vector, (issued)]...], "fetches":
    [[t, vcpu, [vectors], side, (end)]...], "switch": [t0, t1] or null}``.

    :class:`~pyctl.errors.InputError` if the file is not such a log, or has
    no raise (a check of nothing is not a pass).
    """
    doc = load_json_object(path, ("raises", "fetches"), "kvmlu log")
    try:
        raises = [
            Raise(float(r[0]), int(r[1]), int(r[2]), None if len(r) < 4 else float(r[3]))
            for r in doc["raises"]
        ]
        fetches = [
            Fetch(
                float(f[0]),
                int(f[1]),
                frozenset(int(x) for x in f[2]),
                str(f[3]),
                None if len(f) < 5 else float(f[4]),
            )
            for f in doc["fetches"]
        ]
        sw = doc.get("switch")
        switch = (float(sw[0]), float(sw[1])) if sw else None
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise InputError(f"{path}: a malformed entry: {type(e).__name__}: {e}") from e
    if not raises:
        raise InputError(f"{path}: no raises: nothing to check")
    return raises, fetches, switch


def dump_log(
    path: str,
    raises: Iterable[Raise],
    fetches: Iterable[Fetch],
    switch: tuple[float, float] | None,
) -> None:
    """Write a log that :func:`load_log` reads and ``kvmlu check`` checks."""
    doc = {
        "raises": [
            [r.t, r.vcpu, r.vector] + ([] if r.issued is None else [r.issued]) for r in raises
        ],
        "fetches": [
            [f.t, f.vcpu, sorted(f.vectors), f.side] + ([] if f.end is None else [f.end])
            for f in fetches
        ],
        "switch": list(switch) if switch else None,
    }
    with open(path, "w") as f:
        json.dump(doc, f)
