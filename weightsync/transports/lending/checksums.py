"""A lent round's checksum: what it covers, where the trainer publishes it, who computes it.

The trainer checksums what it lends on a side stream, off the round's critical path, and
publishes the value on the group's rendezvous store; each receiver checksums what it copied (the
same ranges of the stream) and compares before it commits anything. See `weightsync.transports.ipc`
for why ipc may checksum a sample and p2p never does.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from weightsync.errors import TransferError
from weightsync.integrity import StreamDigest, format_digest
from weightsync.packing import Region, RegionPlan, sampled_regions
from weightsync.transports.waits import wait_event_until

DIGEST_KEY = "ipc-digest/{}"


class Coverage(enum.Enum):
    """The verification strategy: which bytes of the stream a round's checksum covers.

    One definition for both ends, so that the trainer's ranges and the receiver's are the same:
    `SAMPLE`, every tensor's ends and one 64 KiB window per 4 MiB (`integrity.sample_ranges`);
    `FULL`, every byte."""

    SAMPLE = "sample"
    FULL = "full"

    def plan(self, flats: Sequence[torch.Tensor], offsets: Sequence[int]) -> RegionPlan:
        """A checksum-only plan of the covered bytes of `flats` (flat uint8, at stream `offsets`)."""
        if self is Coverage.SAMPLE:
            return RegionPlan(sampled_regions(flats, offsets), copy=False)
        return RegionPlan([Region(flat, None, offset) for flat, offset in zip(flats, offsets, strict=True)], copy=False)


class DigestBoard:
    """Where the trainer's checksum of a round meets the receivers: one key per round id on the
    group's rendezvous store (the only channel besides the coordinator's update_info)."""

    # `store`: a torch.distributed.Store (Any: its stubs take str values; bytes are what it holds).
    def __init__(self, store: Any) -> None:
        self.store = store  # the rendezvous store (torch.distributed.Store); None once closed

    @staticmethod
    def key(round_id: str) -> str:
        return DIGEST_KEY.format(round_id)

    def put(self, round_id: str, value: bytes) -> None:
        self.store.set(self.key(round_id), value)

    def forget(self, round_ids: Sequence[str]) -> None:
        for round_id in round_ids:
            self.store.delete_key(self.key(round_id))

    def has(self, round_id: str) -> bool:
        """Whether the trainer published round `round_id`'s value (without waiting for it)."""
        return bool(self.store.check([self.key(round_id)]))

    def fetch(self, round_id: str) -> str:
        """The trainer's checksum of round `round_id` (waits up to the store's timeout);
        TransferError when none came or the trainer could not checksum."""
        try:
            value: str = self.store.get(self.key(round_id)).decode(errors="replace")
        except Exception as error:  # the store raises after its timeout
            raise TransferError(f"the trainer published no checksum for round {round_id}: {error}") from error
        if value.startswith("error:"):
            raise TransferError(f"the trainer could not checksum round {round_id}: {value[6:].strip()}")
        return value

    def close(self) -> None:
        self.store = None


class DigestPublisher:
    """The trainer's checksum of what it lends: one worker thread per trainer enqueues each
    round's checksum on a side stream (its launch costs the round nothing), publishes the value
    on the `DigestBoard` and forgets old values, so a round's send returns without waiting."""

    def __init__(self, board: DigestBoard, device: torch.device, side: torch.cuda.Stream, timeout: float,
                 programs: int | None) -> None:
        self._board = board
        self._device = device
        self._side = side
        self._timeout = timeout
        self._programs = programs  # GPU programs of the checksum; None: all it takes
        self._jobs: queue.SimpleQueue[Any] | None = None  # (round id, plan, stale keys), None to stop
        self._published: list[str] = []  # the last two rounds' keys (older ones are forgotten)

    def publish(self, round_id: str, plan: RegionPlan) -> None:
        """Checksum `plan` behind everything queued so far on the current stream, then publish."""
        self._side.wait_stream(torch.cuda.current_stream(self._device))
        stale = self._published[:-1]
        self._published = self._published[-1:] + [round_id]
        self._queue().put((round_id, plan, stale))

    def _queue(self) -> queue.SimpleQueue[Any]:
        if self._jobs is None:
            jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
            # The worker keeps the store it started with (closing the transport ends it, not the store).
            board = DigestBoard(self._board.store)
            timeout, device, side, programs = self._timeout, self._device, self._side, self._programs

            def work() -> None:
                while (job := jobs.get()) is not None:
                    round_id, plan, stale = job
                    try:
                        with torch.cuda.device(device), torch.cuda.stream(side):
                            digest = StreamDigest(device)
                            plan.run(digest, programs)
                            done = torch.cuda.Event()
                            done.record(side)
                        wait_event_until(done, time.monotonic() + timeout, "checksumming the lent weights", spin=0)
                        value = format_digest(digest.sums).encode()
                    except Exception as error:  # noqa: BLE001 - receivers then report it
                        value = f"error: {error}".encode()
                    try:
                        board.put(round_id, value)
                        board.forget(stale)
                    except Exception:  # noqa: BLE001 - the store is gone: the transport closed
                        return

            threading.Thread(target=work, name="weightsync-ipc-digest", daemon=True).start()
            self._jobs = jobs
        return self._jobs

    def close(self) -> None:
        """Stop the worker and forget what is still published (the store's server may outlive
        the group); best effort: the store may already be gone."""
        if self._jobs is not None:
            self._jobs.put(None)
        if self._board.store is not None:
            for round_id in self._published:
                try:
                    self._board.forget([round_id])
                except Exception:  # noqa: BLE001 - best effort: the store may already be gone
                    break
