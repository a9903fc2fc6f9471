"""The nccl receiver's data path: receive on the group's stream, place on side streams.

  comm stream     ── broadcasts chunk k straight into the weight store (or buffer b)
  place stream[b] ── waits, checksums (or unpacks + checksums) chunk k

A direct round receives each tensor piece where it belongs (one NCCL group per chunk). The
lead chunk, sent while the group agrees, is received into scratch memory before this receiver's
own checks and placed (copied and checksummed) only once the round is agreed; dropped if it is
refused. The host enqueues every step and waits once, at the final agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

import torch

from weightsync.errors import TransferError
from weightsync.integrity import StreamDigest
from weightsync.landing import Landing, StagedLoad
from weightsync.layout import Chunk, Segment
from weightsync.packing import Region, RegionPlan, landed_regions, unpack_regions
from weightsync.protocol import RoundHeader
from weightsync.transports.collective import Party, Pending, ReceivePath, mark
from weightsync.transports.collective.buffers import StagingBuffers
from weightsync.transports.nccl_group import EventPending, NcclGroup, wait_event
from weightsync.transports.nccl_pipeline import GpuTrace, PlanCache, Streams, is_direct, join, nccl_options


@dataclass(frozen=True)
class _Lead:
    """The lead chunk, received (or being received) into scratch memory."""

    scratch: torch.Tensor
    landed: torch.cuda.Event


@dataclass(frozen=True)
class _PreparedReceive:
    """A receive made ready ahead of its agreement."""

    streams: list[torch.cuda.Stream]  # place streams, one per buffer
    parts: list[StreamDigest | None]  # their partial checksums
    plans: list[RegionPlan] | None  # each chunk's checksum (landed) or unpack plan; None: nothing to run
    lead_plan: RegionPlan | None  # places the lead chunk from scratch, checksummed
    buffers: list[torch.Tensor] | None = None  # packed, not in place: the staging buffers
    pieces: list[list[torch.Tensor]] | None = None  # direct: each chunk's landing pieces


class _Receiving(NamedTuple):
    """One round's receive, as the loops of `NcclReceivePath.receive_payload` read it."""

    chunks: Sequence[Chunk]
    prepared: _PreparedReceive
    first: int  # the first chunk received here (1: the lead chunk came ahead of the agreement)
    num_buffers: int  # the round's buffers, and place streams
    verify: bool


def _destinations(landing: Landing) -> list[torch.Tensor]:
    """The landing's destinations, which a landing without a flat target has."""
    if landing.destinations is None:
        raise TransferError("a landing without a flat target has no destinations")
    return landing.destinations


def _memory(landing: Landing) -> tuple[object, ...]:
    """What the landing's memory is (addresses and sizes), for the plans cached over it."""
    target = landing.target
    if target is not None:
        return (target.data_ptr(), target.numel())
    return tuple((d.data_ptr(), d.numel()) for d in _destinations(landing))


def _landing_view(landing: Landing, chunk: Chunk, s: Segment) -> torch.Tensor:
    """Where segment `s` of `chunk` belongs: its place in a flat target, or its tensor."""
    if landing.target is not None:
        return landing.target[chunk.start + s.chunk_offset : chunk.start + s.chunk_offset + s.nbytes]
    return _destinations(landing)[s.index][s.start : s.stop]


class NcclReceivePath(ReceivePath):
    """A receiver's pipelined GPU path (see the module docstring)."""

    def __init__(self, party: Party, staging: StagingBuffers, gpu_trace: GpuTrace):
        self._party = party
        self._staging = staging
        self._trace = gpu_trace
        self._streams = Streams(party.device)
        self._plans = PlanCache()
        self._receiving: _PreparedReceive | None = None
        self._lead: _Lead | None = None
        self._lead_scratch = torch.empty(0, dtype=torch.uint8, device=party.device)
        self.pack_programs: int | None = nccl_options(party, "receive").pack_programs  # see NcclOptions.pack_programs

    @property
    def _group(self) -> NcclGroup:
        group = self._party.group
        if not isinstance(group, NcclGroup):
            raise TransferError(f"the nccl receive path needs an NcclGroup, not {type(group).__name__}")
        return group

    def lead(self, pieces: Sequence[int], chunk: Chunk | None, header: RoundHeader | None,
             loader_round: bool) -> None:
        """Receive the lead chunk into scratch memory, before this receiver's own checks: it is
        placed (copied and checksummed) once the round is agreed, dropped if it is refused.
        Without the header the pieces are only drained."""
        self._lead = None
        if not pieces:
            return
        device = self._party.device
        buffer_size = self._party.init.packed_buffer_size_bytes
        if header is not None and chunk is None:
            raise TransferError("the lead chunk of a round whose header this receiver holds came without the chunk")
        total = chunk.nbytes if chunk is not None and header is not None else sum(pieces)
        if total > buffer_size:
            raise TransferError(f"the trainer's first chunk of {total} bytes exceeds this receiver's "
                                f"packed_buffer_size_bytes ({buffer_size})")
        group = self._group
        current = torch.cuda.current_stream(device)
        direct = header is not None and is_direct(header, "receive")
        staging = header is not None and (not direct or loader_round)
        buffers = self._staging.buffers
        if staging and buffers and buffers[0].numel() >= total:
            # a staging receiver's chunk 0 lands where it always did (a loader's: where it is loaded)
            scratch = buffers[0]
            self._lead_scratch = torch.empty(0, dtype=torch.uint8, device=device)
        else:
            if self._lead_scratch.numel() < total:
                self._lead_scratch = torch.empty(0, dtype=torch.uint8, device=device)  # free it first
                self._lead_scratch = torch.empty(total, dtype=torch.uint8, device=device)
            scratch = self._lead_scratch
        if chunk is not None and direct:  # each piece where packing would put it
            views = [scratch[s.chunk_offset : s.chunk_offset + s.nbytes] for s in chunk.segments if s.nbytes]
        else:
            views = [scratch[o : o + n] for o, n in zip(accumulate(pieces, initial=0), pieces, strict=False)]
        group.stream.wait_stream(current)  # the last round's placing of the scratch is done
        self._trace.mark("first piece starts", group.stream)
        group.broadcast_pieces(views)
        mark("lead chunk called")
        landed = torch.cuda.Event()
        landed.record(group.stream)
        self._lead = _Lead(scratch[:total], landed)

    def lead_landed(self, staged: StagedLoad) -> Pending | None:
        """A loader round's lead chunk, received at the staging's start (`lead`) as the chunk is
        laid out: where the plan places a piece elsewhere, it is copied there."""
        lead, self._lead = self._lead, None
        if lead is None:
            return None
        group = self._group
        chunk = staged.chunks[0]
        moves = [(lead.scratch[s.chunk_offset : s.chunk_offset + s.nbytes], piece)
                 for s, piece in zip([s for s in chunk.segments if s.nbytes], staged.pieces[0], strict=True)]
        moves = [(src, dst) for src, dst in moves if src.data_ptr() != dst.data_ptr()]
        if not moves:
            return EventPending(lead.landed, group.comm, "the chunk sent ahead of the agreement")
        current = torch.cuda.current_stream(self._party.device)
        current.wait_event(lead.landed)
        for src, dst in moves:  # in order: a piece is never moved onto one not yet moved (see the plan)
            dst.copy_(src, non_blocking=True)
        placed = torch.cuda.Event()
        placed.record(current)
        return EventPending(placed, group.comm, "the chunk sent ahead of the agreement")

    def post_chunk(self, staged: StagedLoad, number: int, header: RoundHeader) -> Pending:
        """A loader round's chunk into its staging place: one broadcast, or (direct) its pieces."""
        group = self._group
        if not is_direct(header, "receive"):
            return group.broadcast(staged.view(number))
        group.after_current()  # the staging bytes it overwrites were checksummed and loaded
        group.broadcast_pieces(staged.pieces[number])
        mark(f"chunk {number} called")
        return group.event("broadcast")

    def side_programs(self) -> int | None:
        return self.pack_programs

    def abandon(self) -> None:
        lead, self._lead = self._lead, None
        self._receiving = None
        if lead is not None:
            wait_event(lead.landed, self._group.comm, "the chunk sent ahead of the agreement")

    def prepare(self, chunks: Sequence[Chunk], header: RoundHeader, digest: StreamDigest | None,
                landing: Landing) -> None:
        """While the others' verdicts come in: streams, partial checksums and plans, so that the
        receives can be enqueued the moment the round is agreed."""
        device = self._party.device
        count = header.num_buffers
        verify = digest is not None
        current = torch.cuda.current_stream(device)
        streams = self._streams.get("place", count)
        parts: list[StreamDigest | None] = [StreamDigest(device) for _ in range(count)] if verify else [None] * count
        for stream in streams:
            stream.wait_stream(current)
        memory = _memory(landing)
        lead_plan = self._lead_plan(chunks, landing, memory, verify) if self._lead is not None else None
        if is_direct(header, "receive"):  # every piece lands where it belongs; checksum it there
            pieces, plans = self._direct_plans(chunks, landing, memory, verify)
            self._receiving = _PreparedReceive(streams, parts, plans, lead_plan, pieces=pieces)
            return
        plans, buffers = self._packed_plans(chunks, landing, memory, verify, count)
        self._receiving = _PreparedReceive(streams, parts, plans, lead_plan, buffers=buffers)

    def _lead_plan(self, chunks: Sequence[Chunk], landing: Landing, memory: tuple[object, ...],
                   verify: bool) -> RegionPlan:
        """The copy of the lead chunk from scratch to where it belongs, checksummed."""
        if self._lead is None:
            raise TransferError("the lead chunk is placed only once it was received")
        lead_chunk, scratch = chunks[0], self._lead.scratch
        return self._plans.get("lead", chunks, (memory, scratch.data_ptr(), verify), lambda: [
            RegionPlan([Region(scratch[s.chunk_offset : s.chunk_offset + s.nbytes],
                               _landing_view(landing, lead_chunk, s), lead_chunk.start + s.chunk_offset)
                        for s in lead_chunk.segments if s.nbytes], copy=True, digest=verify)])[0]

    def _direct_plans(self, chunks: Sequence[Chunk], landing: Landing, memory: tuple[object, ...],
                      verify: bool) -> tuple[list[list[torch.Tensor]], list[RegionPlan] | None]:
        """A direct round's landing pieces, chunk by chunk, and (verified) the checksums of what
        landed there."""
        view = _landing_view
        pieces = self._plans.get("receive pieces", chunks, (memory,), lambda: [
            [view(landing, c, s) for s in c.segments if s.nbytes] for c in chunks])
        plans = self._plans.get("landed", chunks, (memory,), lambda: [RegionPlan(
            [Region(view(landing, c, s), None, c.start + s.chunk_offset) for s in c.segments if s.nbytes],
            copy=False) for c in chunks]) if verify else None
        return pieces, plans

    def _packed_plans(self, chunks: Sequence[Chunk], landing: Landing, memory: tuple[object, ...], verify: bool,
                      count: int) -> tuple[list[RegionPlan] | None, list[torch.Tensor] | None]:
        """A packed round's plans: received in place into a flat target, the checksums of what
        landed (verified only); else the unpacking of each staging buffer into the tensors,
        with the buffers."""
        target, destinations = landing.target, landing.destinations
        if target is not None:
            plans = self._plans.get("landed", chunks, memory, lambda: [
                RegionPlan(landed_regions(c, target), copy=False) for c in chunks]) if verify else None
            return plans, None
        buffers = self._staging.get(count)
        destinations = _destinations(landing)
        key = (verify, memory, tuple(b.data_ptr() for b in buffers))
        plans = self._plans.get("unpack", chunks, key, lambda: [
            RegionPlan(unpack_regions(c, buffers[c.number % count][: c.nbytes], destinations), copy=True,
                       digest=verify) for c in chunks])
        return plans, buffers

    def receive_payload(self, chunks: Sequence[Chunk], header: RoundHeader, digest: StreamDigest | None,
                        landing: Landing) -> None:
        device = self._party.device
        group = self._group
        prepared, self._receiving = self._receiving, None
        if prepared is None:
            raise TransferError("the nccl receive path receives a round's payload only once the round is prepared")
        group.stream.wait_stream(torch.cuda.current_stream(device))
        lead_placed = self._place_lead(prepared, len(chunks))
        receiving = _Receiving(chunks, prepared, 0 if lead_placed is None else 1, header.num_buffers,
                               digest is not None)
        if is_direct(header, "receive"):
            self._receive_direct(receiving)
        elif landing.target is not None:
            self._receive_flat(receiving, landing.target)
        else:
            self._receive_packed(receiving, lead_placed)
        join(device, group, prepared.streams, prepared.parts, digest)
        self._trace.mark("checksums done", torch.cuda.current_stream(device))

    def _place_lead(self, prepared: _PreparedReceive, total: int) -> torch.cuda.Event | None:
        """Once the lead chunk (received, or being received, into scratch) landed: place it on
        the first place stream; the event marks the end. None: no chunk came ahead."""
        if self._lead is None:
            return None
        streams, parts, lead_plan = prepared.streams, prepared.parts, prepared.lead_plan
        if lead_plan is None:
            raise TransferError("the lead chunk came ahead of the agreement, but the round was prepared "
                                "without its plan")
        landed, self._lead = self._lead.landed, None
        streams[0].wait_event(landed)
        with torch.cuda.stream(streams[0]):
            lead_plan.run(parts[0], None if total == 1 else self.pack_programs)
        lead_placed = torch.cuda.Event()
        lead_placed.record(streams[0])
        return lead_placed

    def _checksum_landed(self, receiving: _Receiving, chunk: Chunk) -> None:
        """Once the chunk landed, fold it into the checksum on a side stream."""
        prepared, count = receiving.prepared, receiving.num_buffers
        if prepared.plans is None:
            raise TransferError("a verified round was prepared without its checksum plans")
        landed = torch.cuda.Event()
        landed.record(self._group.stream)
        stream = prepared.streams[chunk.number % count]
        stream.wait_event(landed)
        last = chunk.number == len(receiving.chunks) - 1  # nothing left to share with: full speed
        with torch.cuda.stream(stream):
            prepared.plans[chunk.number].run(prepared.parts[chunk.number % count], None if last else self.pack_programs)

    def _receive_direct(self, receiving: _Receiving) -> None:
        """Each chunk's pieces straight where they belong (one NCCL group per chunk)."""
        group, first = self._group, receiving.first
        if not first:
            self._trace.mark("first piece starts", group.stream)
        pieces = receiving.prepared.pieces  # each chunk's landing pieces
        if pieces is None:
            raise TransferError("a direct round was prepared without its landing pieces")
        for chunk, views in zip(receiving.chunks[first:], pieces[first:], strict=True):
            group.broadcast_pieces(views)
            mark(f"chunk {chunk.number} called")
            if receiving.verify:
                self._checksum_landed(receiving, chunk)
        self._trace.mark("last piece landed", group.stream)

    def _receive_flat(self, receiving: _Receiving, target: torch.Tensor) -> None:
        """Each chunk in place into the flat target, laid out as the stream."""
        group = self._group
        for chunk in receiving.chunks[receiving.first:]:
            group.broadcast_on_stream(target[chunk.start : chunk.stop])
            mark(f"chunk {chunk.number} called")
            if receiving.verify:
                self._checksum_landed(receiving, chunk)

    def _receive_packed(self, receiving: _Receiving, lead_placed: torch.cuda.Event | None) -> None:
        """Each chunk into staging buffer `number % count`, unpacked (and checksummed) on that
        buffer's place stream; a buffer is received into again only once it was unpacked."""
        group, count, first, prepared = self._group, receiving.num_buffers, receiving.first, receiving.prepared
        streams, parts, buffers, plans = prepared.streams, prepared.parts, prepared.buffers, prepared.plans
        if buffers is None or plans is None:
            raise TransferError("a staged round was prepared without its staging buffers and unpack plans")
        placed: list[torch.cuda.Event | None] = [None] * count
        placed[0] = lead_placed  # a packed lead chunk sits in buffer 0
        for chunk, plan in zip(receiving.chunks[first:], plans[first:], strict=True):
            b = chunk.number % count
            free = placed[b]
            if free is not None:
                group.stream.wait_event(free)  # buffer b is free once unpacked
            group.broadcast_on_stream(buffers[b][: chunk.nbytes])
            landed = torch.cuda.Event()
            landed.record(group.stream)
            streams[b].wait_event(landed)
            last = chunk.number == len(receiving.chunks) - 1
            with torch.cuda.stream(streams[b]):
                plan.run(parts[b], None if last else self.pack_programs)
            unpacked = torch.cuda.Event()
            unpacked.record(streams[b])
            placed[b] = unpacked

    def close(self) -> None:
        for stream in self._streams.all():
            stream.synchronize()
        self._plans.clear()
