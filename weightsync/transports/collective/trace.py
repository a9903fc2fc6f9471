"""Diagnosis: when each host step of a round ended, on the monotonic clock, and how long
each phase of the last round took.

Off unless a benchmark sets `TRACE` to a list (`benchmarks/transfer.py`); every part of a round
records through `mark`, so the record reads as one timeline across trainer and receivers of a host.
"""

from __future__ import annotations

import time

TRACE: list[tuple[str, float]] | None = None  # set to a list to record when each step ended


def mark(label: str) -> None:
    """Record a step of the round on the monotonic clock (shared by processes of a host)."""
    if TRACE is not None:
        TRACE.append((label, time.monotonic()))


def phases(started: float, marks: list[tuple[str, float]]) -> dict[str, float]:
    """Seconds spent in each phase of the last round (for diagnosis and benchmarks)."""
    out, last = {}, started
    for name, at in marks:
        out[name] = at - last
        last = at
    return out
