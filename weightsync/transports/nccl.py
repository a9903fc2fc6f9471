"""The nccl transport: the collective round over an NCCL communicator of its own, on GPUs.

The group's communicator comes from its own rendezvous (the trainer's TCPStore, or a unique id
the trainer minted itself, `nccl_unique_id_b64`), never from torch.distributed's default group,
so a training job's own collectives and several weight-sync groups in one process never meet.

The payload pipeline is fully asynchronous on the GPU: the host enqueues every step of the round
and waits once, at the final agreement.

  trainer:   pack stream[b]  ── packs chunk k (+ checksum) into buffer b ──┐ event
             comm stream     ── waits, broadcasts buffer b ────────────────┘ event → buffer b free
  receiver:  comm stream     ── broadcasts chunk k straight into the weight store (or buffer b)
             place stream[b] ── waits, checksums (or unpacks + checksums) chunk k

So packing, sending and placing overlap; every wait the host does is bounded by the group's
timeout, and a timeout aborts the communicator, which cancels its kernels: a dead peer makes the
survivors fail instead of hanging. The chunk sizes ramp up at the start and down at the end so
the pipeline fills and drains in small steps. The first chunk is broadcast while the group agrees
on the header, into the receivers' scratch memory (placed once the round is agreed, dropped if it
is refused), so the agreement's host round trips overlap the transfer instead of preceding it.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import time
from collections.abc import Sequence
from itertools import accumulate
from typing import Annotated, Literal

import torch
from pydantic import Field

from weightsync.errors import TransferError
from weightsync.integrity import StreamDigest
from weightsync.kernels import warm_up
from weightsync.layout import Chunk
from weightsync.packing import Region, RegionPlan, landed_regions, pack_regions, unpack_regions
from weightsync.protocol import InitInfo, RoundHeader
from weightsync.rendezvous import open_store
from weightsync.transports import collective, register
from weightsync.transports.collective import (
    LEAD_MAX_PIECES, CollectiveOptions, CollectiveTransport, Group, Pending, agree_options_over_group, mark,
)
from weightsync.transports.nccl_lib import Communicator, new_unique_id
from weightsync.transports.options import env_default, flag
from weightsync.transports.waits import wait_event_until

_UNIQUE_ID_KEY = "nccl_unique_id"


class NcclOptions(CollectiveOptions):
    """The nccl transport's init_info.options; every party must join with the same values."""

    # Chunk sizes ramp up and down, so the GPU pipeline fills and drains in small steps.
    ramp: bool = True
    # Always pack: never broadcast tensors from where they live (a direct round; contiguous
    # tensors on the trainer's GPU are sent that way unless this is set). Default:
    # $WEIGHTSYNC_NCCL_PACKED, else false.
    packed: bool = Field(default_factory=env_default("WEIGHTSYNC_NCCL_PACKED", flag, False))
    # Move the first chunk while the group agrees on the header, into the receivers' scratch
    # memory (placed once agreed, dropped if refused), so the agreement's host round trips
    # overlap the transfer. Default: $WEIGHTSYNC_NCCL_LEAD, else true.
    lead: bool = Field(default_factory=env_default("WEIGHTSYNC_NCCL_LEAD", flag, True))
    # Where the control steps (header, agreements) travel: "store", the rendezvous TCPStore, host
    # to host (a fraction of a collective's launch and completion round trip); or "communicator",
    # as collectives (for comparison; a group formed from nccl_unique_id_b64 has no store and
    # always uses the communicator). Default: $WEIGHTSYNC_CONTROL (store, or nccl meaning
    # communicator), else store.
    control: Literal["store", "communicator"] = Field(
        default_factory=env_default("WEIGHTSYNC_CONTROL", lambda raw: _control(raw), "store"))
    # GPU programs that pack (trainer) or checksum/unpack (receiver) a chunk at once; None: one
    # program per block. Fewer than the chunk's blocks leave memory bandwidth to the broadcast
    # running beside them: on 2 x H200 a 15 GB round took 44.6 ms with 64 programs against
    # 45.7-49 ms with one program per block (and 47.9 ms with 128).
    pack_programs: Annotated[int, Field(ge=1, le=65536)] | None = 64
    # GPU programs of the trainer's checksum of a direct round, which runs beside the whole
    # transfer: this few read the set in well under the transfer's time and leave the memory
    # bandwidth to the broadcasts.
    source_sum_programs: Annotated[int, Field(ge=1, le=65536)] = 32
    # (diagnosis) A blocking NCCL communicator instead of a non-blocking one.
    blocking: bool = False


def _control(raw: str) -> str:
    """$WEIGHTSYNC_CONTROL's spellings: store, communicator, or nccl (the communicator)."""
    value = {"nccl": "communicator"}.get(raw.strip().lower(), raw.strip().lower())
    if value not in ("store", "communicator"):
        raise ValueError("expected store, communicator or nccl")
    return value


class NcclRoundHeader(RoundHeader):
    """The round header of the nccl transport: the core header plus how this round moves."""

    # Each chunk's tensor pieces move from where they live to where they belong, one collective
    # call per piece in one NCCL group, instead of through a packed buffer.
    direct: bool = False
    # The first chunk moves while the group agrees, into the receivers' scratch memory, and is
    # placed only once the round is agreed (see NcclTransport._lead_pieces).
    lead: bool = False


def wait_event(event: torch.cuda.Event, comm: Communicator, what: str) -> None:
    """Wait for `event` at most the group's timeout; on a failure or timeout abort `comm`
    (which cancels its kernels, so nothing stays queued behind a dead peer)."""
    if comm.aborted:
        raise TransferError(f"{what}: the group was aborted after an earlier failure; init it again")
    last_check = [time.monotonic()]

    def check_peers(now: float) -> None:
        if now - last_check[0] > 0.05:  # a remote failure may be known to NCCL before any timeout
            last_check[0] = now
            state = comm.async_error()
            if state not in (0, 7):
                comm.abort()
                raise TransferError(f"{what}: NCCL reported error {state} (a peer failed); the group was aborted")

    try:
        wait_event_until(event, time.monotonic() + comm.timeout, what, check_peers)
    except TransferError as error:
        if not comm.aborted:
            comm.abort()
            raise TransferError(f"{error} (a peer is missing or stopped); the group was aborted") from None
        raise


class _EventPending(Pending):
    def __init__(self, event: torch.cuda.Event, comm: Communicator, what: str):
        self._event, self._comm, self._what = event, comm, what

    def wait(self) -> None:
        wait_event(self._event, self._comm, self._what)


class NcclGroup(Group):
    """Broadcast and all-gather over one NCCL communicator, on a dedicated high-priority stream."""

    def __init__(self, init: InitInfo, rank: int, device: torch.device, options: NcclOptions | None = None):
        if device.type != "cuda":
            raise TransferError(f"the nccl transport needs a CUDA device, not {device}")
        options = NcclOptions.of(init) if options is None else options
        self._options = options
        self.rank, self.world_size = rank, init.world_size
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self._store = None
        with torch.cuda.device(self.device):
            unique_id = self._unique_id(init, rank)
            # The control steps (header, agreements) go over the rendezvous store when there is one:
            # host to host, they cost a fraction of a collective's launch and completion round trip.
            # (options.control "communicator" keeps them on the communicator, for comparison.)
            use_store = self._store is not None and options.control == "store"
            self.control_store = self._store if use_store else None
            if self._store is not None:  # from now on a control step waits at most the group's timeout
                self._store.set_timeout(datetime.timedelta(seconds=init.timeout_seconds))
            self.comm = Communicator(unique_id, rank, init.world_size, init.timeout_seconds, options.blocking)
            # Collectives jump ahead of packing and checksum kernels when both wait for SMs.
            self.stream = torch.cuda.Stream(self.device, priority=-1)
            if init.nccl_unique_id_b64 is not None:
                self._warm_up()  # trainers that mint the id issue this first (vLLM's convention)

    def _unique_id(self, init: InitInfo, rank: int) -> bytes:
        if init.nccl_unique_id_b64 is not None:
            try:
                return base64.b64decode(init.nccl_unique_id_b64, validate=True)
            except (binascii.Error, ValueError):
                raise TransferError("init_info.nccl_unique_id_b64 is not standard base64") from None
        self._store = open_store(init, rank, self._options.agreed())
        if rank == 0:
            self._store.set(_UNIQUE_ID_KEY, base64.b64encode(new_unique_id()))
            return base64.b64decode(self._store.get(_UNIQUE_ID_KEY))
        try:
            return base64.b64decode(self._store.get(_UNIQUE_ID_KEY))
        except Exception as error:  # the store raises on its timeout
            raise TransferError(f"rank {rank} got no NCCL unique id from the trainer: {error}") from error

    def _warm_up(self) -> None:
        one = torch.zeros(1, dtype=torch.float32, device=self.device)
        self._after_current()
        self.comm.all_reduce_float(one.data_ptr(), 1, self.stream.cuda_stream)
        self._event("warm-up all_reduce").wait()

    def _after_current(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def _event(self, what: str) -> _EventPending:
        event = torch.cuda.Event()
        event.record(self.stream)
        return _EventPending(event, self.comm, what)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Pending:
        self._after_current()
        self.comm.broadcast(tensor.data_ptr(), tensor.numel() * tensor.element_size(), src, self.stream.cuda_stream)
        tensor.record_stream(self.stream)
        return self._event("broadcast")

    def broadcast_on_stream(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Enqueue a broadcast on the group's stream with no dependency on the current stream
        (the payload pipeline orders it with events) and no host wait."""
        self.comm.broadcast(tensor.data_ptr(), tensor.numel() * tensor.element_size(), src, self.stream.cuda_stream)

    def broadcast_pieces(self, pieces: Sequence[torch.Tensor], src: int = 0) -> None:
        """Enqueue one broadcast per piece as one NCCL group (a single launch) on the group's
        stream, ordered like `broadcast_on_stream`."""
        self.comm.group_start()
        try:
            for piece in pieces:
                self.comm.broadcast(piece.data_ptr(), piece.numel() * piece.element_size(), src,
                                    self.stream.cuda_stream)
        finally:
            self.comm.group_end()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        out = self._all_gather(tensor)
        return list(out.view(self.world_size, -1))

    def gather_to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_gather(tensor).view(self.world_size, -1).cpu()

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        out = torch.empty(self.world_size * tensor.numel(), dtype=tensor.dtype, device=self.device)
        self._after_current()
        self.comm.all_gather(tensor.data_ptr(), out.data_ptr(), nbytes, self.stream.cuda_stream)
        mark("all_gather called")
        tensor.record_stream(self.stream)
        out.record_stream(self.stream)
        self._event("all_gather").wait()
        return out

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)

    def synchronize(self) -> None:
        self._after_current()
        self._event("synchronize").wait()

    def check_usable(self) -> None:
        if self.comm.aborted:
            raise TransferError("the group was aborted after an earlier failure; init it again")

    def fail(self) -> None:
        self.comm.abort()  # later steps then fail at once, saying the group was aborted

    def close(self) -> None:
        self.comm.abort()  # local teardown; never waits for peers
        self._store = self.control_store = None


class _Streams:
    """Per-buffer side streams of one transport, created once."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pools: dict[str, list[torch.cuda.Stream]] = {}

    def get(self, kind: str, count: int) -> list[torch.cuda.Stream]:
        pool = self._pools.setdefault(kind, [])
        while len(pool) < count:
            pool.append(torch.cuda.Stream(self.device))
        return pool[:count]

    def all(self) -> list[torch.cuda.Stream]:
        return [s for pool in self._pools.values() for s in pool]


@register
class NcclTransport(CollectiveTransport):
    name = "nccl"
    options_model = NcclOptions
    header_model = NcclRoundHeader

    def __init__(self, init, rank, device, group: NcclGroup):
        super().__init__(init, rank, device, group)
        self._streams = _Streams(device)
        self._plans: dict[str, tuple[tuple, list[RegionPlan]]] = {}
        # A send made ready ahead of its agreement: (pack plans or direct pieces per chunk,
        # side streams, partial checksums, packed-chunk events or None).
        self._sending: tuple | None = None
        self._receiving: tuple | None = None  # a receive made ready ahead of its agreement
        self._lead_sent: torch.cuda.Event | None = None  # trainer: the lead chunk's broadcast is done
        self._lead: tuple[torch.Tensor, torch.cuda.Event] | None = None  # receiver: lead in scratch, landed
        self._lead_scratch = torch.empty(0, dtype=torch.uint8, device=device)
        self.gpu_trace: list[tuple[str, torch.cuda.Event]] = []  # see _gpu_mark
        self.pack_programs: int | None = self.options.pack_programs  # see NcclOptions.pack_programs

    @classmethod
    def connect(cls, init: InitInfo, rank: int, device: torch.device | None = None) -> "NcclTransport":
        if not torch.cuda.is_available():
            raise TransferError("the nccl transport needs CUDA, and none is available here")
        if device is None or device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        options = cls.options_model.of(init)  # refused before joining when invalid
        group = NcclGroup(init, rank, device, options)
        if group._store is None:  # a trainer-minted id: no store, so the options travel as a collective
            try:
                with torch.cuda.device(group.device):
                    agree_options_over_group(group, options)
            except BaseException:
                group.close()
                raise
        transport = cls(init, rank, device, group)
        warm_up(device)
        return transport

    def _forget_keys(self) -> None:
        """Trainer: remove this group's keys from the rendezvous store, which may outlive the
        group (a trainer's store server is shared by the groups on its port), so that a later
        group of the same name never reads a stale unique id or control step."""
        store = self.group.control_store or self.group._store
        if self.rank != 0 or store is None:
            return
        keys = [_UNIQUE_ID_KEY] + [f"ctl/{seq}/{suffix}" for seq in range(max(1, self._control_seq - 8),
                                                                            self._control_seq + 1)
                                   for suffix in ("header", *range(self.group.world_size))]
        for key in keys:
            try:
                store.delete_key(key)
            except Exception:  # noqa: BLE001 - best effort: the store may already be gone
                return

    # Every CUDA call of a round runs with this transport's GPU current (a daemon's worker thread
    # starts on device 0, and kernels launch on the current device).
    def send(self, named_tensors):
        with torch.cuda.device(self.device):
            return super().send(named_tensors)

    def send_sparse(self, patches):
        with torch.cuda.device(self.device):
            return super().send_sparse(patches)

    def receive(self, store, info):
        with torch.cuda.device(self.device):
            return super().receive(store, info)

    # -- plans, cached while the memory they point at stays the same -----------------------
    def _cached_plans(self, kind: str, chunks: Sequence[Chunk], key: tuple, build, keep=()) -> list[RegionPlan]:
        """The plans for `chunks` (a cached list: the entry keeps it, and `keep`, alive, so their
        ids are stable) whose memory is identified by `key`; built on first use."""
        key = (id(chunks), *(id(k) for k in keep), *key)
        cached = self._plans.get(kind)
        if cached is not None and cached[0] == key:
            return cached[1]
        self._plans.pop(kind, None)  # release the old plan's memory before building anew
        plans = build()
        self._plans[kind] = (key, plans, chunks, keep)
        return plans

    # -- trainer ------------------------------------------------------------------------------
    def _header_fields(self, lendable: bool, streamed: bool) -> dict:
        """Tensors that are contiguous on this GPU are broadcast from where they live: nothing is
        packed, no staging buffer is needed (options.packed packs anyway). The first chunk moves
        while the group agrees, so the agreement's host round trips overlap the transfer instead
        of preceding it (options.lead false waits instead; a streamed round never leads)."""
        return {"direct": lendable and not self.options.packed, "lead": not streamed and self.options.lead}

    def _is_direct(self, header: NcclRoundHeader) -> bool:
        return header.direct

    def _lead_pieces(self, chunks: Sequence[Chunk], header: RoundHeader) -> list[int]:
        """The first chunk: one broadcast when packed, one per tensor piece when direct (unless
        it has more pieces than a header may name)."""
        if not header.lead or not chunks:
            return []
        if not header.direct:
            return [chunks[0].nbytes]
        pieces = [s.nbytes for s in chunks[0].segments if s.nbytes]
        return pieces if len(pieces) <= LEAD_MAX_PIECES else []

    def _send_lead(self, chunks: Sequence[Chunk], header: RoundHeader) -> None:
        """Trainer, right after the header: broadcast the first chunk (receivers take it into
        scratch memory whatever their verdict, so the collective always completes)."""
        self._lead_sent = None
        if not self._lead_pieces(chunks, header):
            return
        group: NcclGroup = self.group
        group.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._gpu_mark("first piece starts", group.stream)
        prepared = self._sending
        if header.direct:
            group.broadcast_pieces(prepared[0][0])
        else:
            group.stream.wait_event(prepared[3][0])  # chunk 0 packed into buffer 0
            group.broadcast_pieces([self._staging_buffers(header.num_buffers)[0][: chunks[0].nbytes]])
        mark("lead chunk called")
        self._lead_sent = torch.cuda.Event()
        self._lead_sent.record(group.stream)

    def _source_key(self, sources: Sequence[torch.Tensor]) -> tuple[tuple, tuple]:
        """(key, keep) identifying the memory behind `sources` for `_cached_plans`."""
        if sources is (self._repeat[2] if self._repeat is not None else None):
            return (), (sources,)  # the same cached views: the same memory
        return tuple((s.data_ptr(), s.numel()) for s in sources), ()

    def _prepare_direct_send(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor],
                             header: RoundHeader, digest: StreamDigest | None) -> None:
        """Direct round: start the trainer's checksum of every source on a side stream (it runs
        beside the broadcasts) and line up each chunk's pieces."""
        key, keep = self._source_key(sources)
        pieces = self._cached_plans("send pieces", chunks, key, lambda: [
            [sources[s.index][s.start : s.stop] for s in c.segments if s.nbytes] for c in chunks], keep)
        if digest is None:
            self._sending = (pieces, [], [], None)
            self._send_lead(chunks, header)
            return
        plan = self._cached_plans("source sum", chunks, key, lambda: [RegionPlan(
            [Region(sources[s.index][s.start : s.stop], None, c.start + s.chunk_offset)
             for c in chunks for s in c.segments if s.nbytes], copy=False)], keep)[0]
        part = StreamDigest(self.device)
        stream = self._streams.get("source sum", 1)[0]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        self._sending = (pieces, [stream], [part], None)
        self._send_lead(chunks, header)  # the bytes first, then the checksum beside them
        with torch.cuda.stream(stream):
            plan.run(part, self.options.source_sum_programs)

    def _pack_plans(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor], header: RoundHeader
                    ) -> list[RegionPlan]:
        count = header.num_buffers
        buffers = self._staging_buffers(count)
        verify = header.verify
        key, keep = self._source_key(sources)
        key = (verify, key, tuple(b.data_ptr() for b in buffers))
        return self._cached_plans("pack", chunks, key, lambda: [
            RegionPlan(pack_regions(c, sources, buffers[c.number % count]), copy=True, digest=verify)
            for c in chunks], keep)

    def _prepare_send(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor], header: RoundHeader,
                      digest: StreamDigest | None) -> None:
        """While the receivers check the header: pack the first chunk of every buffer and send
        the lead chunk (which lands in the receivers' scratch memory only)."""
        if header.direct:
            self._prepare_direct_send(chunks, sources, header, digest)
            return
        count = header.num_buffers
        plans = self._pack_plans(chunks, sources, header)
        current = torch.cuda.current_stream(self.device)
        streams = self._streams.get("pack", count)
        parts = [StreamDigest(self.device) for _ in range(count)] if digest is not None else [None] * count
        for stream in streams:
            stream.wait_stream(current)  # the sources (and the zeroed checksums) were written there
        packed: list[torch.cuda.Event] = []
        for chunk, plan in zip(chunks[:count], plans):
            stream = streams[chunk.number % count]
            with torch.cuda.stream(stream):
                plan.run(parts[chunk.number % count], self.pack_programs)
            packed.append(torch.cuda.Event())
            packed[-1].record(stream)
        self._sending = (plans, streams, parts, packed)
        self._send_lead(chunks, header)

    def _abandon_send(self) -> None:
        lead, self._lead_sent = self._lead_sent, None
        if lead is not None:  # every receiver takes the lead chunk, whatever its verdict
            wait_event(lead, self.group.comm, "the chunk sent ahead of the agreement")
        if self._sending is not None:
            for stream in self._sending[1]:
                stream.synchronize()  # local packing or checksumming only: finishes on its own
        self._sending = None

    def _send_payload(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor], header: RoundHeader,
                      digest: StreamDigest | None) -> None:
        group: NcclGroup = self.group
        lead, self._lead_sent = self._lead_sent, None
        first = 0 if lead is None else 1  # the lead chunk is on its way
        if header.direct:
            pieces, streams, parts, _ = self._sending
            self._sending = None
            group.stream.wait_stream(torch.cuda.current_stream(self.device))
            if lead is None:
                self._gpu_mark("first piece starts", group.stream)
            for chunk, views in zip(chunks[first:], pieces[first:]):
                group.broadcast_pieces(views)
                mark(f"chunk {chunk.number} called")
            self._gpu_mark("last piece sent", group.stream)
            self._join(streams, parts, digest)
            self._gpu_mark("checksums done", torch.cuda.current_stream(self.device))
            return
        count = header.num_buffers
        buffers = self._staging_buffers(count)
        plans, streams, parts, packed = self._sending
        self._sending = None
        group.stream.wait_stream(torch.cuda.current_stream(self.device))
        sent: list[torch.cuda.Event | None] = [None] * count
        sent[0] = lead
        for chunk, plan in zip(chunks[first:], plans[first:]):
            b = chunk.number % count
            stream = streams[b]
            if chunk.number >= count:  # the first `count` chunks were packed before the agreement
                stream.wait_event(sent[b])  # buffer b is free once its last broadcast is done
                with torch.cuda.stream(stream):
                    plan.run(parts[b], self.pack_programs)
                ready = torch.cuda.Event()
                ready.record(stream)
            else:
                ready = packed[chunk.number]
            group.stream.wait_event(ready)
            group.broadcast_on_stream(buffers[b][: chunk.nbytes])
            mark(f"chunk {chunk.number} called")
            sent[b] = torch.cuda.Event()
            sent[b].record(group.stream)
        self._join(streams, parts, digest)

    def _join(self, streams, parts, digest: StreamDigest | None) -> None:
        """Make the caller's stream wait for every side stream, then fold the partial checksums."""
        current = torch.cuda.current_stream(self.device)
        for stream in streams:
            current.wait_stream(stream)
        current.wait_stream(self.group.stream)
        if digest is not None:
            for part in parts:
                digest.add(part.sums)

    # -- receiver -----------------------------------------------------------------------------
    def _receive_lead(self, pieces: Sequence[int], chunk: Chunk | None, header: RoundHeader | None) -> None:
        """Receive the lead chunk into scratch memory, before this receiver's own checks: it is
        placed (copied and checksummed) once the round is agreed, dropped if it is refused.
        Without the header the pieces are only drained."""
        self._lead = None
        if not pieces:
            return
        total = chunk.nbytes if header is not None else sum(pieces)
        if total > self.init.packed_buffer_size_bytes:
            raise TransferError(f"the trainer's first chunk of {total} bytes exceeds this receiver's "
                                f"packed_buffer_size_bytes ({self.init.packed_buffer_size_bytes})")
        group: NcclGroup = self.group
        current = torch.cuda.current_stream(self.device)
        staging = header is not None and (not header.direct or self._loader_round)
        if staging and self._buffers and self._buffers[0].numel() >= total:
            # a staging receiver's chunk 0 lands where it always did (a loader's: where it is loaded)
            scratch = self._buffers[0]
            self._lead_scratch = torch.empty(0, dtype=torch.uint8, device=self.device)
        else:
            if self._lead_scratch.numel() < total:
                self._lead_scratch = torch.empty(0, dtype=torch.uint8, device=self.device)  # free it first
                self._lead_scratch = torch.empty(total, dtype=torch.uint8, device=self.device)
            scratch = self._lead_scratch
        if header is not None and header.direct:  # each piece where packing would put it
            views = [scratch[s.chunk_offset : s.chunk_offset + s.nbytes] for s in chunk.segments if s.nbytes]
        else:
            views = [scratch[o : o + n] for o, n in zip(accumulate(pieces, initial=0), pieces)]
        group.stream.wait_stream(current)  # the last round's placing of the scratch is done
        self._gpu_mark("first piece starts", group.stream)
        group.broadcast_pieces(views)
        mark("lead chunk called")
        landed = torch.cuda.Event()
        landed.record(group.stream)
        self._lead = (scratch[:total], landed)

    def _lead_landed(self, staged):
        """A loader round's lead chunk, received at the staging's start (`_receive_lead`) as the
        chunk is laid out: where the plan places a piece elsewhere, it is copied there."""
        lead, self._lead = self._lead, None
        if lead is None:
            return None
        scratch, landed = lead
        group: NcclGroup = self.group
        chunk = staged.chunks[0]
        moves = [(scratch[s.chunk_offset : s.chunk_offset + s.nbytes], piece)
                 for s, piece in zip([s for s in chunk.segments if s.nbytes], staged.pieces[0])]
        moves = [(src, dst) for src, dst in moves if src.data_ptr() != dst.data_ptr()]
        if not moves:
            return _EventPending(landed, group.comm, "the chunk sent ahead of the agreement")
        current = torch.cuda.current_stream(self.device)
        current.wait_event(landed)
        for src, dst in moves:  # in order: a piece is never moved onto one not yet moved (see the plan)
            dst.copy_(src, non_blocking=True)
        placed = torch.cuda.Event()
        placed.record(current)
        return _EventPending(placed, group.comm, "the chunk sent ahead of the agreement")

    def _post_chunk(self, staged, number: int, header: RoundHeader):
        """A loader round's chunk into its staging place: one broadcast, or (direct) its pieces."""
        if not header.direct:
            return self.group.broadcast(staged.view(number))
        group: NcclGroup = self.group
        group._after_current()  # the staging bytes it overwrites were checksummed and loaded
        group.broadcast_pieces(staged.pieces[number])
        mark(f"chunk {number} called")
        return group._event("broadcast")

    def _side_programs(self) -> int | None:
        return self.pack_programs

    def _abandon_receive(self) -> None:
        lead, self._lead = self._lead, None
        self._receiving = None
        if lead is not None:
            wait_event(lead[1], self.group.comm, "the chunk sent ahead of the agreement")

    @staticmethod
    def _landing_view(landing, chunk: Chunk, s) -> torch.Tensor:
        """Where segment `s` of `chunk` belongs: its place in a flat target, or its tensor."""
        if landing.target is not None:
            return landing.target[chunk.start + s.chunk_offset : chunk.start + s.chunk_offset + s.nbytes]
        return landing.destinations[s.index][s.start : s.stop]

    def _prepare_receive(self, chunks: Sequence[Chunk], header: RoundHeader, digest: StreamDigest | None,
                         landing) -> None:
        """While the others' verdicts come in: streams, partial checksums and plans, so that the
        receives can be enqueued the moment the round is agreed."""
        count = header.num_buffers
        verify = digest is not None
        target, destinations = landing.target, landing.destinations
        current = torch.cuda.current_stream(self.device)
        streams = self._streams.get("place", count)
        parts = [StreamDigest(self.device) for _ in range(count)] if verify else [None] * count
        for stream in streams:
            stream.wait_stream(current)
        memory = (target.data_ptr(), target.numel()) if target is not None else \
            tuple((d.data_ptr(), d.numel()) for d in destinations)
        lead_plan = None
        if self._lead is not None:  # copy the lead chunk from scratch to where it belongs, checksummed
            lead_chunk, scratch = chunks[0], self._lead[0]
            lead_plan = self._cached_plans("lead", chunks, (memory, scratch.data_ptr(), verify), lambda: [
                RegionPlan([Region(scratch[s.chunk_offset : s.chunk_offset + s.nbytes],
                                   self._landing_view(landing, lead_chunk, s), lead_chunk.start + s.chunk_offset)
                            for s in lead_chunk.segments if s.nbytes], copy=True, digest=verify)])[0]
        if header.direct:  # every piece lands where it belongs; checksum it there
            view = self._landing_view
            pieces = self._cached_plans("receive pieces", chunks, (memory,), lambda: [
                [view(landing, c, s) for s in c.segments if s.nbytes] for c in chunks])
            plans = self._cached_plans("landed", chunks, (memory,), lambda: [RegionPlan(
                [Region(view(landing, c, s), None, c.start + s.chunk_offset) for s in c.segments if s.nbytes],
                copy=False) for c in chunks]) if verify else None
            self._receiving = (streams, parts, plans, pieces, lead_plan)
            return
        if target is not None:
            plans = self._cached_plans("landed", chunks, memory, lambda: [
                RegionPlan(landed_regions(c, target), copy=False) for c in chunks]) if verify else None
            buffers = None
        else:
            buffers = self._staging_buffers(count)
            key = (verify, memory, tuple(b.data_ptr() for b in buffers))
            plans = self._cached_plans("unpack", chunks, key, lambda: [
                RegionPlan(unpack_regions(c, buffers[c.number % count][: c.nbytes], destinations), copy=True,
                           digest=verify) for c in chunks])
        self._receiving = (streams, parts, plans, buffers, lead_plan)

    def _receive_payload(self, chunks: Sequence[Chunk], header: RoundHeader, digest: StreamDigest | None,
                         landing) -> None:
        group: NcclGroup = self.group
        count = header.num_buffers
        verify = digest is not None
        target = landing.target
        streams, parts, plans, buffers, lead_plan = self._receiving
        self._receiving = None
        group.stream.wait_stream(torch.cuda.current_stream(self.device))
        first, lead_placed = 0, None
        if self._lead is not None:  # the lead chunk is (being) received into scratch: place it
            landed, self._lead = self._lead[1], None
            streams[0].wait_event(landed)
            with torch.cuda.stream(streams[0]):
                lead_plan.run(parts[0], None if len(chunks) == 1 else self.pack_programs)
            lead_placed = torch.cuda.Event()
            lead_placed.record(streams[0])
            first = 1

        def checksum_landed(chunk: Chunk) -> None:
            """Once the chunk landed, fold it into the checksum on a side stream."""
            landed = torch.cuda.Event()
            landed.record(group.stream)
            stream = streams[chunk.number % count]
            stream.wait_event(landed)
            last = chunk.number == len(chunks) - 1  # nothing left to share with: full speed
            with torch.cuda.stream(stream):
                plans[chunk.number].run(parts[chunk.number % count], None if last else self.pack_programs)

        if header.direct:
            if not first:
                self._gpu_mark("first piece starts", group.stream)
            for chunk, views in zip(chunks[first:], buffers[first:]):  # (direct: each chunk's landing pieces)
                group.broadcast_pieces(views)
                mark(f"chunk {chunk.number} called")
                if verify:
                    checksum_landed(chunk)
            self._gpu_mark("last piece landed", group.stream)
        elif target is not None:
            for chunk in chunks[first:]:
                group.broadcast_on_stream(target[chunk.start : chunk.stop])
                mark(f"chunk {chunk.number} called")
                if verify:
                    checksum_landed(chunk)
        else:
            placed: list[torch.cuda.Event | None] = [None] * count
            placed[0] = lead_placed  # a packed lead chunk sits in buffer 0
            for chunk, plan in zip(chunks[first:], plans[first:]):
                b = chunk.number % count
                if placed[b] is not None:
                    group.stream.wait_event(placed[b])  # buffer b is free once unpacked
                group.broadcast_on_stream(buffers[b][: chunk.nbytes])
                landed = torch.cuda.Event()
                landed.record(group.stream)
                streams[b].wait_event(landed)
                last = chunk.number == len(chunks) - 1
                with torch.cuda.stream(streams[b]):
                    plan.run(parts[b], None if last else self.pack_programs)
                placed[b] = torch.cuda.Event()
                placed[b].record(streams[b])
        self._join(streams, parts, digest)
        self._gpu_mark("checksums done", torch.cuda.current_stream(self.device))

    def _gpu_mark(self, label: str, stream: torch.cuda.Stream) -> None:
        """(diagnosis, while collective.TRACE records) when the GPU reached this step."""
        if collective.TRACE is None:
            self.gpu_trace = []
            return
        if label == "first piece starts":
            self.gpu_trace = []
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        self.gpu_trace.append((label, event))

    def close(self) -> None:
        self._forget_keys()
        self.group.close()  # aborting cancels any collective still queued, so the syncs end
        for stream in self._streams.all():
            stream.synchronize()
        self._plans.clear()
        self._buffers.clear()
        self._staging_flat = None
        self._shadow.clear()
