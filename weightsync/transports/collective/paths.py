"""How the payload of an agreed round moves: the data path interfaces the sender and the
receiver compose, and the packed paths every collective transport can run (gloo's).

A path knows the group's data movement and nothing of headers or agreements: the sender or
receiver calls it at fixed points of the round, in this order:

  trainer:  prepare (while the receivers check the header) → send_payload (once agreed)
            or abandon (refused); close with the transport.
  receiver: lead (before its own checks) → prepare (while the verdicts come in) →
            receive_payload, or for a loader round lead_landed / post_chunk per chunk;
            abandon when the round is refused; close with the transport.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence

import torch

from weightsync.integrity import StreamDigest
from weightsync.landing import Landing, StagedLoad
from weightsync.layout import Chunk
from weightsync.packing import RegionPlan, landed_regions, pack_regions, unpack_regions
from weightsync.protocol import RoundHeader
from weightsync.transports.collective.buffers import StagingBuffers
from weightsync.transports.collective.group import Party, Pending


class SendPath(ABC):
    """Trainer: moves an agreed round's chunks to every receiver."""

    @abstractmethod
    def prepare(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor], header: RoundHeader,
                digest: StreamDigest | None, views_cached: bool) -> None:
        """While the receivers check the header: anything that lands nothing in their weights (a
        pipelined path packs its first chunks and sends its lead chunk). `views_cached`:
        `sources` is the sender's cached list of a repeated round (the same memory as before)."""

    @abstractmethod
    def abandon(self) -> None:
        """The receivers refused the header; settle `prepare` (bounded)."""

    @abstractmethod
    def send_payload(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor], header: RoundHeader,
                     digest: StreamDigest | None) -> None:
        """Move every chunk (folding what is sent into `digest`); the caller's stream (or the
        host) is ordered after it when this returns."""

    @abstractmethod
    def close(self) -> None:
        """Release what the path holds (after the group was closed)."""


class ReceivePath(ABC):
    """Receiver: lands an agreed round's chunks where the landing says."""

    @abstractmethod
    def lead(self, pieces: Sequence[int], chunk: Chunk | None, header: RoundHeader | None,
             loader_round: bool) -> None:
        """Before this receiver's own checks: receive the broadcasts the trainer sends ahead of the
        agreement (`pieces`: the `header`'s first `chunk`, or only their sizes when this receiver
        does not hold the header) into scratch memory, never into the weights."""

    @abstractmethod
    def abandon(self) -> None:
        """The round was refused; wait (bounded) for `lead` to complete."""

    @abstractmethod
    def prepare(self, chunks: Sequence[Chunk], header: RoundHeader, digest: StreamDigest | None,
                landing: Landing) -> None:
        """While the others' verdicts come in: anything that needs no payload yet."""

    @abstractmethod
    def receive_payload(self, chunks: Sequence[Chunk], header: RoundHeader, digest: StreamDigest | None,
                        landing: Landing) -> None:
        """Receive every chunk into the landing, folding what landed into `digest`."""

    @abstractmethod
    def lead_landed(self, staged: StagedLoad) -> Pending | None:
        """A loader round's first chunk when it moved ahead of the agreement (see `lead`): a
        handle that waits until it is in its staging place. None: not sent ahead."""

    @abstractmethod
    def post_chunk(self, staged: StagedLoad, number: int, header: RoundHeader) -> Pending:
        """A loader round: start receiving chunk `number` into its staging place."""

    @abstractmethod
    def side_programs(self) -> int | None:
        """GPU programs a checksum beside the transfer may use (None: all it takes)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the path holds (after the group was closed)."""


class PackedSendPath(SendPath):
    """Pack each chunk into a staging buffer and broadcast it, `num_buffers` in flight: the path
    of any `Group` (gloo's), nothing moved ahead of the agreement."""

    def __init__(self, party: Party, staging: StagingBuffers):
        self._party = party
        self._staging = staging

    def prepare(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor], header: RoundHeader,
                digest: StreamDigest | None, views_cached: bool) -> None:
        pass  # nothing moves before the agreement

    def abandon(self) -> None:
        pass

    def send_payload(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor], header: RoundHeader,
                     digest: StreamDigest | None) -> None:
        """Pack each chunk (folding it into the checksum) and broadcast it, `num_buffers` in flight."""
        num_buffers = header.num_buffers
        buffers = self._staging.get(num_buffers)
        in_flight: deque[Pending] = deque()
        for chunk in chunks:
            if len(in_flight) == num_buffers:
                in_flight.popleft().wait()
            buffer = buffers[chunk.number % num_buffers]
            RegionPlan(pack_regions(chunk, sources, buffer), copy=True, digest=digest is not None).run(digest)
            in_flight.append(self._party.group.broadcast(buffer[: chunk.nbytes]))
        while in_flight:
            in_flight.popleft().wait()

    def close(self) -> None:
        pass


class PackedReceivePath(ReceivePath):
    """Receive each chunk straight into the landing target when there is one, else into staging
    buffers unpacked into the destinations, `num_buffers` in flight: the path of any `Group`."""

    def __init__(self, party: Party, staging: StagingBuffers):
        self._party = party
        self._staging = staging

    def lead(self, pieces: Sequence[int], chunk: Chunk | None, header: RoundHeader | None,
             loader_round: bool) -> None:
        pass  # the trainer sends nothing ahead of the agreement

    def abandon(self) -> None:
        pass

    def prepare(self, chunks: Sequence[Chunk], header: RoundHeader, digest: StreamDigest | None,
                landing: Landing) -> None:
        pass

    def receive_payload(self, chunks: Sequence[Chunk], header: RoundHeader, digest: StreamDigest | None,
                        landing: Landing) -> None:
        """Receive every chunk with `num_buffers` in flight: straight into the landing target when
        there is one (no staging, no copy), else into staging buffers unpacked into destinations."""
        group = self._party.group
        num_buffers = header.num_buffers
        target, destinations = landing.target, landing.destinations
        buffers = None if target is not None else self._staging.get(num_buffers)
        in_flight: deque[tuple[Chunk, torch.Tensor, Pending]] = deque()

        def land(chunk: Chunk, view: torch.Tensor, pending: Pending) -> None:
            pending.wait()
            if target is not None:
                plan = RegionPlan(landed_regions(chunk, target), copy=False)
            else:
                assert destinations is not None  # a landing without a target has destinations
                plan = RegionPlan(unpack_regions(chunk, view, destinations), copy=True)
            plan.run(digest)

        for chunk in chunks:
            if len(in_flight) == num_buffers:
                land(*in_flight.popleft())
            if target is not None:
                view = target[chunk.start : chunk.stop]
            else:
                assert buffers is not None  # staged when there is no target
                view = buffers[chunk.number % num_buffers][: chunk.nbytes]
            in_flight.append((chunk, view, group.broadcast(view)))
        while in_flight:
            land(*in_flight.popleft())
        group.synchronize()

    def lead_landed(self, staged: StagedLoad) -> Pending | None:
        return None

    def post_chunk(self, staged: StagedLoad, number: int, header: RoundHeader) -> Pending:
        return self._party.group.broadcast(staged.view(number))

    def side_programs(self) -> int | None:
        return None

    def close(self) -> None:
        pass
