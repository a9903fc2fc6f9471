"""Bounded waits for GPU work: a transfer must fail within its timeout, never hang."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from weightsync.errors import TransferError

SPIN_SECONDS = 0.002  # poll without sleeping this long (short waits), then sleep between polls
POLL_SLEEP = 0.00005  # a round's end is noticed within ~0.1 ms; polling costs a few % of a core


def wait_event_until(event: torch.cuda.Event, deadline: float, what: str = "waiting for the GPU",
                     on_poll: Callable[[float], None] | None = None, spin: float = SPIN_SECONDS) -> None:
    """Block until `event` completed or `deadline` (time.monotonic) passed (TransferError).

    `on_poll(now)` runs between polls, e.g. to notice a failed peer before the deadline. `spin`:
    how long to poll without sleeping (a background thread passes 0, so as not to take the
    interpreter from the thread doing the round)."""
    started = time.monotonic()
    while not event.query():
        now = time.monotonic()
        if on_poll is not None:
            on_poll(now)
        if now > deadline:
            raise TransferError(f"{what} timed out after {now - started:.3g}s")
        time.sleep(0 if now - started < spin else POLL_SLEEP)
