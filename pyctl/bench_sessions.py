"""``kvmlu bench sessions``: does creating a session slow down as sessions pile up?

Several owners (uids, each in a forked child that drops to it) each create
sessions and let go of them, as a VMM that preserves its state and exits
would; the sessions stay. Each owner's batch is timed. If CREATE_SESSION
walked every session, later batches would take longer than the first: the
figure is each batch's time over the first batch's, measured in one run.
Afterwards each owner finishes its own sessions. Runs as root in the test VM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from pyctl.argtypes import int_range
from pyctl.forked import drop_to_uid, in_child
from pyctl.kvmlu import Device

FIRST_UID = 20000


def _as_uid(uid: int, fn: Callable[[], float]) -> float:
    """Run ``fn`` in a child that has dropped to ``uid``; return what it returned."""
    return float(in_child(lambda: drop_to_uid(uid), fn))


def run(owners: int, per_owner: int) -> dict[str, Any]:
    """Create ``owners`` x ``per_owner`` parked sessions; time each owner's batch."""
    with Device() as dev:
        base = dev.query().nr_sessions

        def create() -> float:
            start = time.perf_counter()
            for i in range(per_owner):
                dev.create_session(f"bench-{i}").close()
            return time.perf_counter() - start

        def finish() -> float:
            start = time.perf_counter()
            for i in range(per_owner):
                with dev.retrieve_session(f"bench-{i}") as s:
                    s.finish()
            return time.perf_counter() - start

        batches: list[float] = []
        try:
            for k in range(owners):
                batches.append(_as_uid(FIRST_UID + k, create))
        finally:
            for k in range(len(batches)):
                _as_uid(FIRST_UID + k, finish)
        left = dev.query().nr_sessions - base
    return {
        "owners": owners,
        "per_owner": per_owner,
        "batch_s": batches,
        "ratio_to_first": [b / batches[0] for b in batches],
        "left": left,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--owners", type=int_range(1, 1000), default=10, help="uids that create")
    p.add_argument(
        "--per-owner",
        type=int_range(1, 100_000),
        default=1000,
        help="sessions each owner creates (kvmlu.ko's max_sessions_per_owner bounds it)",
    )
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    res = run(args.owners, args.per_owner)
    total = res["owners"] * res["per_owner"]
    ratios = res["ratio_to_first"]
    print(
        f"{total} sessions by {res['owners']} owners: batches of {res['per_owner']} took "
        + ", ".join(f"{b:.3f}" for b in res["batch_s"])
        + " s"
    )
    print(
        f"last batch / first: {ratios[-1]:.2f}; median ratio {statistics.median(ratios):.2f} "
        f"(n = {len(ratios)} batches, one run); sessions left: {res['left']}"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0 if res["left"] == 0 else 1
