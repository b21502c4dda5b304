"""argparse types shared by the ``kvmlu`` subcommands: bounded integers."""

from __future__ import annotations

import argparse
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
