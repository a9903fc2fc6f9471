"""The nccl trainer's data path: pack on side streams, broadcast on the group's stream.

  pack stream[b]  ── packs chunk k (+ checksum) into buffer b ──┐ event
  comm stream     ── waits, broadcasts buffer b ────────────────┘ event → buffer b free

A direct round packs nothing: each chunk's tensor pieces are broadcast from where they live (one
NCCL group per chunk), and the checksum of the sources runs beside them on one side stream. The
first chunk may go while the receivers check the header (the lead chunk, into their scratch).
The host enqueues every step and waits once, at the final agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.errors import TransferError
from weightsync.integrity import StreamDigest
from weightsync.layout import Chunk
from weightsync.packing import Region, RegionPlan, pack_regions
from weightsync.protocol import RoundHeader
from weightsync.transports.collective import Party, RoundRules, SendPath, mark
from weightsync.transports.collective.buffers import StagingBuffers
from weightsync.transports.nccl_group import NcclGroup, wait_event
from weightsync.transports.nccl_pipeline import GpuTrace, PlanCache, Streams, is_direct, join, nccl_options


@dataclass
class _PreparedSend:
    """A send made ready ahead of its agreement."""

    streams: list[torch.cuda.Stream]  # side streams: packing per buffer, or the direct round's checksum
    parts: list[StreamDigest | None]  # their partial checksums
    plans: list[RegionPlan] | None = None  # packed: each chunk's pack plan
    packed: list[torch.cuda.Event] | None = None  # packed: the chunks packed before the agreement
    pieces: list[list[torch.Tensor]] | None = None  # direct: each chunk's source pieces


class NcclSendPath(SendPath):
    """The trainer's pipelined GPU path (see the module docstring)."""

    def __init__(self, party: Party, staging: StagingBuffers, rules: RoundRules[Any], gpu_trace: GpuTrace):
        self._party = party
        self._staging = staging
        self._rules = rules
        self._trace = gpu_trace
        self._streams = Streams(party.device)
        self._plans = PlanCache()
        self._sending: _PreparedSend | None = None
        self._lead_sent: torch.cuda.Event | None = None  # the lead chunk's broadcast is done
        self._views_cached = False  # this round's sources are the sender's cached views
        self.pack_programs: int | None = nccl_options(party, "send").pack_programs  # see NcclOptions.pack_programs

    @property
    def _group(self) -> NcclGroup:
        group = self._party.group
        if not isinstance(group, NcclGroup):
            raise TransferError(f"the nccl send path needs an NcclGroup, not {type(group).__name__}")
        return group

    def _send_lead(self, chunks: Sequence[Chunk], header: RoundHeader) -> None:
        """Right after the header: broadcast the first chunk (receivers take it into scratch
        memory whatever their verdict, so the collective always completes)."""
        self._lead_sent = None
        if not self._rules.lead_pieces(chunks, header):
            return
        group = self._group
        group.stream.wait_stream(torch.cuda.current_stream(self._party.device))
        self._trace.mark("first piece starts", group.stream)
        prepared = self._sending
        if prepared is None:
            raise TransferError("the nccl send path sends its lead chunk only once the round is prepared")
        if is_direct(header, "send"):
            if prepared.pieces is None:
                raise TransferError("a direct round was prepared without its pieces")
            group.broadcast_pieces(prepared.pieces[0])
        else:
            if prepared.packed is None:
                raise TransferError("a packed round was prepared without its packed chunks")
            group.stream.wait_event(prepared.packed[0])  # chunk 0 packed into buffer 0
            group.broadcast_pieces([self._staging.get(header.num_buffers)[0][: chunks[0].nbytes]])
        mark("lead chunk called")
        self._lead_sent = torch.cuda.Event()
        self._lead_sent.record(group.stream)

    def _source_key(self, sources: Sequence[torch.Tensor]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """(key, keep) identifying the memory behind `sources` for the plan cache."""
        if self._views_cached:
            return (), (sources,)  # the same cached views: the same memory
        return tuple((s.data_ptr(), s.numel()) for s in sources), ()

    def _prepare_direct(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor],
                        header: RoundHeader, digest: StreamDigest | None) -> None:
        """Direct round: start the trainer's checksum of every source on a side stream (it runs
        beside the broadcasts) and line up each chunk's pieces."""
        device = self._party.device
        key, keep = self._source_key(sources)
        pieces = self._plans.get("send pieces", chunks, key, lambda: [
            [sources[s.index][s.start : s.stop] for s in c.segments if s.nbytes] for c in chunks], keep)
        if digest is None:
            self._sending = _PreparedSend([], [], pieces=pieces)
            self._send_lead(chunks, header)
            return
        plan = self._plans.get("source sum", chunks, key, lambda: [RegionPlan(
            [Region(sources[s.index][s.start : s.stop], None, c.start + s.chunk_offset)
             for c in chunks for s in c.segments if s.nbytes], copy=False)], keep)[0]
        part = StreamDigest(device)
        stream = self._streams.get("source sum", 1)[0]
        stream.wait_stream(torch.cuda.current_stream(device))
        self._sending = _PreparedSend([stream], [part], pieces=pieces)
        self._send_lead(chunks, header)  # the bytes first, then the checksum beside them
        with torch.cuda.stream(stream):
            plan.run(part, nccl_options(self._party, "send").source_sum_programs)

    def _pack_plans(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor], header: RoundHeader
                    ) -> list[RegionPlan]:
        count = header.num_buffers
        buffers = self._staging.get(count)
        verify = header.verify
        key, keep = self._source_key(sources)
        key = (verify, key, tuple(b.data_ptr() for b in buffers))
        return self._plans.get("pack", chunks, key, lambda: [
            RegionPlan(pack_regions(c, sources, buffers[c.number % count]), copy=True, digest=verify)
            for c in chunks], keep)

    def prepare(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor], header: RoundHeader,
                digest: StreamDigest | None, views_cached: bool) -> None:
        """While the receivers check the header: pack the first chunk of every buffer and send
        the lead chunk (which lands in the receivers' scratch memory only)."""
        self._views_cached = views_cached
        if is_direct(header, "send"):
            self._prepare_direct(chunks, sources, header, digest)
            return
        device = self._party.device
        count = header.num_buffers
        plans = self._pack_plans(chunks, sources, header)
        current = torch.cuda.current_stream(device)
        streams = self._streams.get("pack", count)
        parts: list[StreamDigest | None] = (
            [StreamDigest(device) for _ in range(count)] if digest is not None else [None] * count)
        for stream in streams:
            stream.wait_stream(current)  # the sources (and the zeroed checksums) were written there
        packed: list[torch.cuda.Event] = []
        for chunk, plan in zip(chunks[:count], plans, strict=False):
            stream = streams[chunk.number % count]
            with torch.cuda.stream(stream):
                plan.run(parts[chunk.number % count], self.pack_programs)
            packed.append(torch.cuda.Event())
            packed[-1].record(stream)
        self._sending = _PreparedSend(streams, parts, plans=plans, packed=packed)
        self._send_lead(chunks, header)

    def abandon(self) -> None:
        lead, self._lead_sent = self._lead_sent, None
        if lead is not None:  # every receiver takes the lead chunk, whatever its verdict
            wait_event(lead, self._group.comm, "the chunk sent ahead of the agreement")
        if self._sending is not None:
            for stream in self._sending.streams:
                stream.synchronize()  # local packing or checksumming only: finishes on its own
        self._sending = None

    def send_payload(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor], header: RoundHeader,
                     digest: StreamDigest | None) -> None:
        device = self._party.device
        group = self._group
        lead, self._lead_sent = self._lead_sent, None
        first = 0 if lead is None else 1  # the lead chunk is on its way
        prepared, self._sending = self._sending, None
        if prepared is None:
            raise TransferError("the nccl send path sends a round's payload only once the round is prepared")
        if is_direct(header, "send"):
            if prepared.pieces is None:
                raise TransferError("a direct round was prepared without its pieces")
            group.stream.wait_stream(torch.cuda.current_stream(device))
            if lead is None:
                self._trace.mark("first piece starts", group.stream)
            for chunk, views in zip(chunks[first:], prepared.pieces[first:], strict=True):
                group.broadcast_pieces(views)
                mark(f"chunk {chunk.number} called")
            self._trace.mark("last piece sent", group.stream)
            join(device, group, prepared.streams, prepared.parts, digest)
            self._trace.mark("checksums done", torch.cuda.current_stream(device))
            return
        count = header.num_buffers
        buffers = self._staging.get(count)
        plans, streams, parts, packed = prepared.plans, prepared.streams, prepared.parts, prepared.packed
        if plans is None or packed is None:
            raise TransferError("a packed round was prepared without its pack plans and packed chunks")
        group.stream.wait_stream(torch.cuda.current_stream(device))
        sent: list[torch.cuda.Event | None] = [None] * count
        sent[0] = lead
        for chunk, plan in zip(chunks[first:], plans[first:], strict=True):
            b = chunk.number % count
            stream = streams[b]
            if chunk.number >= count:  # the first `count` chunks were packed before the agreement
                free = sent[b]
                if free is None:
                    raise TransferError(f"chunk {chunk.number}: buffer {b} was never broadcast before")
                stream.wait_event(free)  # buffer b is free once its last broadcast is done
                with torch.cuda.stream(stream):
                    plan.run(parts[b], self.pack_programs)
                ready = torch.cuda.Event()
                ready.record(stream)
            else:
                ready = packed[chunk.number]
            group.stream.wait_event(ready)
            group.broadcast_on_stream(buffers[b][: chunk.nbytes])
            mark(f"chunk {chunk.number} called")
            broadcast = torch.cuda.Event()
            broadcast.record(group.stream)
            sent[b] = broadcast
        join(device, group, streams, parts, digest)

    def close(self) -> None:
        for stream in self._streams.all():
            stream.synchronize()
        self._plans.clear()
