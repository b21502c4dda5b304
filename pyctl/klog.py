"""Kernel-log scanner: find the lines of a kernel log that report a problem.

The VM harness runs the kernel suite, then feeds what the kernel logged after
its start marker to :func:`scan`. Any line returned is a *finding* and fails the
run: a ``WARN()``/``BUG()`` report, an oops, a lockdep, KASAN, UBSAN or kmemleak
report, a lockup or RCU stall, a panic.

Only the *header* line of a report is a finding; the lines around it
(``Call Trace:``, register dumps, ``Modules linked in:``, ``Tainted:``) are
context and are not.  Ordinary boot and module-load lines are not findings
either, in particular ``loading out-of-tree module taints kernel.`` and the
CPU-mitigation notices that contain the word ``WARNING:`` in the middle of the
line (``RETBleed: WARNING: ...``).

Lines may be given as the kernel message alone, as ``dmesg`` prints them
(``[   12.345678] msg``), as a console log, or as raw ``/dev/kmsg`` records
(``4,523,12345678,-;msg``).

``python -m pyctl.klog FILE...`` scans files (or stdin) and exits 1 on findings.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "KmsgRecord",
    "classify",
    "lines_after_marker",
    "main",
    "message_of",
    "parse_kmsg_record",
    "scan",
]

# What may precede the message proper: a /dev/kmsg record header or a syslog
# level, a printk timestamp, a caller id (CONFIG_PRINTK_CALLER).
_PREFIX_RE = re.compile(
    r"""
    ^(?:\d+,\d+,\d+,[^;]*;|<\d+>)?   # /dev/kmsg "pri,seq,usec,flags;" or "<pri>"
    (?:\s*\[\s*\d+\.\d+\])?          # "[   12.345678]"
    (?:\s*\[\s*[TC]\d+\])?           # "[  T123]" / "[    C1]"
    \s*
    """,
    re.VERBOSE,
)

# Patterns that must start the message: report headers the kernel prints at the
# beginning of a line.  Anchoring keeps e.g. "RETBleed: WARNING: ..." and a
# user process's "traps: x[1] general protection fault ..." out.
_ANCHORED: tuple[tuple[str, str], ...] = (
    ("warning", r"WARNING:"),
    ("bug", r"BUG:"),
    ("lockdep", r"INFO: (?:lockdep|possible|trying to register non-static key)"),
    ("hung task", r"INFO: task \S+ blocked for more than"),
    ("rcu stall", r"INFO: rcu\w* (?:self-)?detected stall"),
    ("oops", r"Oops\b"),
    ("oops", r"general protection fault\b"),
    ("oops", r"invalid opcode: [0-9a-f]+ \[#\d+\]"),
    ("bug", r"kernel BUG at\b"),
    ("panic", r"Kernel panic - not syncing"),
    ("refcount", r"refcount_t: "),
)

# Patterns that may appear anywhere in the message.
_ANYWHERE: tuple[tuple[str, str], ...] = (
    ("bug", r"\bBUG: "),
    ("bug", r"\bkernel BUG at\b"),
    ("oops", r"\bOops: "),
    ("kasan", r"\bKASAN: "),
    ("ubsan", r"\bUBSAN: "),
    ("kmemleak", r"\bunreferenced object 0x[0-9a-f]+"),
    ("kmemleak", r"\bkmemleak: \d+ new suspected memory leaks?\b"),
    ("lockdep", r"\bDEBUG_LOCKS_WARN_ON\b"),
    ("lockdep", r"\bpossible recursive locking detected\b"),
    ("lockdep", r"\bpossible circular locking dependency\b"),
    ("lockdep", r"\binconsistent lock state\b"),
    ("lockdep", r"\bsuspicious RCU usage\b"),
    ("lockdep", r"\bpossible irq lock inversion dependency\b"),
    ("lockdep", r"\bbad unlock balance detected\b"),
    ("lockdep", r"\bheld lock freed\b"),
    ("lockdep", r"\block held when returning to user space\b"),
    ("lockdep", r"\b\w+-safe -> \w+-unsafe lock order detected\b"),
    ("lockup", r"\bsoft lockup\b"),
    ("lockup", r"\bhard LOCKUP\b"),
    ("rcu stall", r"\brcu\w*: .*\bdetected stalls? on CPUs/tasks"),
    ("list corruption", r"\blist_(?:add|del) corruption\b"),
)

_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    [(kind, re.compile("^" + rx)) for kind, rx in _ANCHORED]
    + [(kind, re.compile(rx)) for kind, rx in _ANYWHERE]
)


def message_of(line: str) -> str:
    """Return the kernel message of *line*, without record header or timestamp."""
    return _PREFIX_RE.sub("", line.rstrip("\r\n"), count=1)


def classify(line: str) -> str | None:
    """Return the kind of problem *line* reports ("warning", "kasan", ...), or None."""
    msg = message_of(line)
    for kind, rx in _RULES:
        if rx.search(msg):
            return kind
    return None


def scan(lines: Iterable[str]) -> list[str]:
    """Return the lines of *lines* that report a kernel problem, in order.

    Each returned line has its trailing newline removed; otherwise it is given
    back as it came (with timestamp or record header, if any).
    """
    return [line.rstrip("\r\n") for line in lines if classify(line) is not None]


def lines_after_marker(lines: Iterable[str], marker: str) -> list[str]:
    """Return the lines after the last one that contains *marker*.

    If no line contains *marker*, every line is returned: scanning too much is
    safer than scanning nothing.
    """
    kept: list[str] = []
    for line in lines:
        if marker in line:
            kept = []
        else:
            kept.append(line)
    return kept


@dataclass(frozen=True)
class KmsgRecord:
    """One record read from ``/dev/kmsg`` (see Documentation/ABI/testing/dev-kmsg)."""

    level: int
    facility: int
    seq: int
    usec: int
    message: str

    def format(self) -> str:
        """Render the record like ``dmesg`` does: ``[  sec.usec] message``."""
        sec, usec = divmod(self.usec, 1_000_000)
        return f"[{sec:5d}.{usec:06d}] {self.message}"


def parse_kmsg_record(raw: str) -> KmsgRecord | None:
    """Parse one ``/dev/kmsg`` record; None if *raw* is not a record.

    Continuation lines (`` KEY=value`` dictionary entries) are dropped.
    """
    head, sep, rest = raw.partition(";")
    if not sep:
        return None
    fields = head.split(",")
    if len(fields) < 3:
        return None
    try:
        prival, seq, usec = int(fields[0]), int(fields[1]), int(fields[2])
    except ValueError:
        return None
    message = rest.split("\n", 1)[0]
    return KmsgRecord(level=prival & 7, facility=prival >> 3, seq=seq, usec=usec, message=message)


def main(argv: Sequence[str] | None = None) -> int:
    """Scan the named files (or stdin); print findings; 1 if any, else 0."""
    paths = list(sys.argv[1:] if argv is None else argv)
    findings: list[str] = []
    if not paths:
        findings = scan(sys.stdin)
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            findings += [f"{path}: {line}" for line in scan(f)]
    for finding in findings:
        print(finding)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
