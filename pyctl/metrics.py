"""Helpers every measurement in pyctl shares: one percentile, one eventfd drain.

The benchmarks, the upgrade and the demo used to carry their own copies,
two of them with a different idea of what a percentile is; a figure from
one now means the same as a figure from another.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank *q* quantile (0 < q <= 1) of *sorted_values*.

    The smallest value that at least ``q`` of the values are less than or
    equal to: with 50 values, ``q=0.99`` is the largest, so a p99 of 50
    samples is their maximum.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 < q <= 1:
        raise ValueError(f"quantile {q} is not in (0, 1]")
    n = len(sorted_values)
    return sorted_values[min(n - 1, max(0, round(q * n) - 1))]


def drain_eventfd(fd: int) -> int:
    """Read and reset a non-blocking eventfd's count; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
