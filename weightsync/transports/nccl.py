"""The nccl transport: the collective round over an NCCL communicator of its own, on GPUs.

The group's communicator comes from its own rendezvous (the trainer's TCPStore, or a unique id
the trainer minted itself, `nccl_unique_id_b64`), never from torch.distributed's default group,
so a training job's own collectives and several weight-sync groups in one process never meet.

The payload pipeline is fully asynchronous on the GPU: the host enqueues every step of the round
and waits once, at the final agreement (`nccl_send.NcclSendPath`, `nccl_receive.NcclReceivePath`).
Packing, sending and placing overlap; every wait the host does is bounded by the group's timeout,
and a timeout aborts the communicator, which cancels its kernels: a dead peer makes the survivors
fail instead of hanging (`nccl_group.NcclGroup`). The chunk sizes ramp up at the start and down
at the end so the pipeline fills and drains in small steps. The first chunk is broadcast while
the group agrees on the header, into the receivers' scratch memory (placed once the round is
agreed, dropped if it is refused), so the agreement's host round trips overlap the transfer
instead of preceding it.

This module holds what the nccl round agrees on (its options, its header, its `RoundRules`) and
the `Transport` facade that composes the group, the rules and the two data paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field

from weightsync.errors import TransferError
from weightsync.kernels import warm_up
from weightsync.layout import Chunk
from weightsync.protocol import InitInfo, RoundHeader
from weightsync.transports.collective import (
    LEAD_MAX_PIECES, CollectiveOptions, CollectiveTransport, RoundRules, agree_options_over_group,
)
from weightsync.transports.collective.buffers import StagingBuffers
from weightsync.transports.nccl_group import UNIQUE_ID_KEY, NcclGroup
from weightsync.transports.nccl_pipeline import GpuTrace
from weightsync.transports.nccl_receive import NcclReceivePath
from weightsync.transports.nccl_send import NcclSendPath
from weightsync.transports.options import env_default, flag

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
    # placed only once the round is agreed (see NcclRoundRules.lead_pieces).
    lead: bool = False


class NcclRoundRules(RoundRules):
    """How an nccl round moves, as its header says: directly from where the tensors live when
    they can (options.packed packs anyway), and with its first chunk ahead of the agreement
    (options.lead); both ends derive the same lead pieces from the header."""

    header_model = NcclRoundHeader

    def __init__(self, options: NcclOptions):
        self._options = options

    def header_fields(self, lendable: bool, streamed: bool) -> dict:
        """Tensors that are contiguous on this GPU are broadcast from where they live: nothing is
        packed, no staging buffer is needed (options.packed packs anyway). The first chunk moves
        while the group agrees, so the agreement's host round trips overlap the transfer instead
        of preceding it (options.lead false waits instead; a streamed round never leads)."""
        return {"direct": lendable and not self._options.packed, "lead": not streamed and self._options.lead}

    def is_direct(self, header: NcclRoundHeader) -> bool:
        return header.direct

    def lead_pieces(self, chunks: Sequence[Chunk], header: RoundHeader) -> list[int]:
        """The first chunk: one broadcast when packed, one per tensor piece when direct (unless
        it has more pieces than a header may name)."""
        if not header.lead or not chunks:
            return []
        if not header.direct:
            return [chunks[0].nbytes]
        pieces = [s.nbytes for s in chunks[0].segments if s.nbytes]
        return pieces if len(pieces) <= LEAD_MAX_PIECES else []


class NcclTransport(CollectiveTransport):
    """The collective round over an `NcclGroup`, with the nccl rules and the pipelined GPU paths."""

    name = "nccl"
    options_model = NcclOptions
    joins_by_unique_id = True
    header_model = NcclRoundRules.header_model

    def __init__(self, init: InitInfo, rank: int, device: torch.device, group: NcclGroup):
        self._gpu_trace = GpuTrace()  # both paths mark it (diagnosis)
        super().__init__(init, rank, device, group)

    @classmethod
    def connect(cls, init: InitInfo, rank: int, device: torch.device | None = None) -> "NcclTransport":
        if not torch.cuda.is_available():
            raise TransferError("the nccl transport needs CUDA, and none is available here")
        if device is None or device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        options = cls.options_model.of(init)  # refused before joining when invalid
        group = NcclGroup(init, rank, device, options)
        if group.rendezvous_store is None:  # a trainer-minted id: no store, so the options travel as a collective
            try:
                with torch.cuda.device(group.device):
                    agree_options_over_group(group, options)
            except BaseException:
                group.close()
                raise
        transport = cls(init, rank, device, group)
        warm_up(device)
        return transport

    def round_rules(self) -> RoundRules:
        return NcclRoundRules(self.options)

    def send_path(self, staging: StagingBuffers, rules: RoundRules) -> NcclSendPath:
        return NcclSendPath(self.party, staging, rules, self._gpu_trace)

    def receive_path(self, staging: StagingBuffers, rules: RoundRules) -> NcclReceivePath:
        return NcclReceivePath(self.party, staging, self._gpu_trace)

    @property
    def gpu_trace(self) -> list[tuple[str, torch.cuda.Event]]:
        """(diagnosis) when the GPU reached each step of the last round (see `GpuTrace`)."""
        return self._gpu_trace.marks

    def _forget_keys(self) -> None:
        """Trainer: remove this group's keys from the rendezvous store, which may outlive the
        group (a trainer's store server is shared by the groups on its port), so that a later
        group of the same name never reads a stale unique id or control step."""
        store = self.group.control_store or self.group.rendezvous_store
        if self.sender is None or store is None:
            return
        for key in [UNIQUE_ID_KEY] + self.sender.agreement.recent_keys(8):
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

    def close(self) -> None:
        self._forget_keys()
        super().close()  # aborting cancels any collective still queued, so the streams' syncs end
