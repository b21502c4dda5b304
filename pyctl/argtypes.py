"""argparse types shared by the ``kvmlu`` subcommands: bounded numbers."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer (any base Python reads) in ``lo..hi``."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"at least {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"{value} is not {bound}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number above 0")
    return value
