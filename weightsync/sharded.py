"""A round from a sharded trainer: every trainer rank takes part, rank 0 alone sends.

This is the gathering round, kept for receivers that expect one sender (an init_info without
`trainer_ranks`; rank 0 warns of it). With `trainer_ranks` every rank sends only what it owns
instead, nothing gathered: `weightsync.planned_api`.

FSDP2 (`fully_shard`) or `distribute_tensor` leaves each parameter a `DTensor` whose whole value
exists only after `full_tensor()`, a collective over the trainer's ranks. So every trainer rank
calls `send_weights` for the round and iterates the source in the same order; rank 0, the only
trainer member of the transfer group, packs each materialized tensor into the stream as it comes
(`CollectiveTransport.send_source`), and the other ranks drop theirs.

Over the trainer's own process group (not the transfer group) rank 0 broadcasts two small
messages per round, fixed-size JSON in a uint8 tensor (no pickle):
  1. "go" once the receivers agreed to the manifest (or the round's failure, if they refused:
     then nobody materializes anything);
  2. the round's outcome (its stats, or the error type and message), which every other rank
     returns or raises.
If rank 0 stops sending mid-round (a receiver vanished), it still drives the iteration to its
end so that the other ranks' collectives complete, then reports the failure.

A trainer rank that dies mid-round: the survivors' next collective over the trainer's group
fails (gloo notices the closed connection, at the latest the group's timeout); rank 0 then
stops materializing, sends the rest of the stream as zeros and fails the final agreement with
the reason, so every receiver fails the round too (it never lands as good). If rank 0 dies, the
receivers' transfer group and the other trainer ranks' trainer group fail the same way.

The other ranks wait for "go" while the receivers check the header, so the trainer group's
timeout (init_process_group's `timeout`) should be at least the transfer group's
`timeout_seconds`; every wait here is bounded by one of the two.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from weightsync import errors
from weightsync.errors import TransferError, WeightSyncError
from weightsync.protocol import Manifest
from weightsync.source import ParamMeta, WeightSource
from weightsync.transports.base import RoundStats, Transport

MESSAGE_BYTES = 8192  # one control message over the trainer's group (JSON, NUL-padded)


class _Tracked:
    """The source as rank 0 iterates it, remembering how far it got (to finish it after a failure)."""

    def __init__(self, source: WeightSource):
        self.source = source
        self.iterator: Iterator[tuple[str, torch.Tensor]] | None = None
        self.finished = False  # exhausted, or it raised itself (then it cannot go on)

    def metadata(self) -> Manifest | Sequence[ParamMeta]:
        return self.source.metadata()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        self.iterator = iter(self.source)
        while True:
            try:
                item = next(self.iterator)
            except StopIteration:
                self.finished = True
                return
            except BaseException:
                self.finished = True  # the source's own failure: it cannot go on
                raise
            yield item

    def finish(self) -> None:
        """Drive an interrupted iteration to its end (the other ranks are inside its collectives)."""
        if self.iterator is None or self.finished:
            return
        self.finished = True
        try:
            for _ in self.iterator:
                pass
        except Exception:  # noqa: BLE001 - a peer died meanwhile: nothing left to keep in step
            pass


class TrainerGroup:
    """The trainer's own process group, as a sharded round uses it."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise WeightSyncError("a sharded trainer needs torch.distributed initialized "
                                  "(init_process_group) on every trainer rank")
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self._src = dist.get_global_rank(group, 0) if group is not None and group is not dist.group.WORLD else 0
        backend = dist.get_backend(self.group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")

    def announce(self, message: dict[str, Any]) -> None:
        """Rank 0: broadcast one message to the other trainer ranks."""
        data = json.dumps(message).encode()  # ASCII: non-ASCII text is escaped
        if len(data) >= MESSAGE_BYTES:  # never cut JSON: the reason is cut in `_failure`
            data = json.dumps(_failure(TransferError("the round's outcome was too long to tell"))).encode()
        block = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
        block[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        dist.broadcast(block.to(self.device), src=self._src, group=self.group)

    def listen(self) -> dict[str, Any]:
        """Other ranks: the next message from rank 0 (bounded by the group's timeout)."""
        block = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=self.device)
        try:
            dist.broadcast(block, src=self._src, group=self.group)
        except Exception as error:  # noqa: BLE001 - rank 0 died or the group timed out
            raise TransferError(f"the trainer's rank 0 did not report the round: {error}") from error
        raw = bytes(block.cpu().numpy()).split(b"\0", 1)[0]
        message: dict[str, Any] = json.loads(raw)
        return message


def _failure(error: BaseException) -> dict[str, Any]:
    kind = type(error).__name__ if isinstance(error, WeightSyncError) else "TransferError"
    text = str(error) or type(error).__name__
    return {"error": {"type": kind, "message": text if len(text) <= 4000 else text[:4000] + "..."}}


def _raise(failure: dict[str, Any]) -> None:
    cls = getattr(errors, failure["type"], TransferError)
    if not (isinstance(cls, type) and issubclass(cls, WeightSyncError)):
        cls = TransferError
    raise cls(failure["message"])


def send_sharded(transport: Transport | None, trainer: TrainerGroup, source: WeightSource) -> RoundStats:
    """One round on this trainer rank (rank 0: `transport` is its membership of the transfer group)."""
    if trainer.rank == 0:
        if transport is None:
            raise WeightSyncError("trainer rank 0 sends the round: it needs its transport")
        return _lead(transport, trainer, source)
    return _follow(trainer, source)


def _lead(transport: Transport, trainer: TrainerGroup, source: WeightSource) -> RoundStats:
    tracked = _Tracked(source)
    announced = False

    def go() -> None:
        nonlocal announced
        trainer.announce({"go": True})
        announced = True

    try:
        stats = transport.send_source(tracked, on_iterate=go)
    except BaseException as error:
        if announced:  # the others are iterating: finish the iteration with them
            tracked.finish()
        _tell(trainer, _failure(error))  # refused before "go": nobody materialized anything
        raise
    _tell(trainer, {"stats": {k: v for k, v in asdict(stats).items() if k != "update_info"}})
    return stats


def abandon(trainer: TrainerGroup, error: BaseException) -> None:
    """Rank 0, when a round fails before `send_sharded` was called (a control-plane call failed):
    the other ranks, waiting for "go", raise this error instead of waiting for their timeout."""
    if trainer.rank == 0:
        _tell(trainer, _failure(error))


def _tell(trainer: TrainerGroup, message: dict[str, Any]) -> None:
    """The round's outcome to the other ranks; a dead peer must not hide the round's own result."""
    try:
        trainer.announce(message)
    except Exception:  # noqa: BLE001 - they fail on the trainer group themselves
        pass


def _follow(trainer: TrainerGroup, source: WeightSource) -> RoundStats:
    started = time.perf_counter()
    first = trainer.listen()
    if "error" in first:
        _raise(first["error"])
    try:
        for _ in source:  # each full_tensor() pairs with rank 0's
            pass
    except Exception as error:  # noqa: BLE001 - a peer died inside a collective
        raise TransferError(f"materializing the source failed on trainer rank {trainer.rank}: {error}") from error
    outcome = trainer.listen()
    if "error" in outcome:
        _raise(outcome["error"])
    stats = outcome["stats"]
    stats["seconds"] = time.perf_counter() - started
    return RoundStats(**stats)
