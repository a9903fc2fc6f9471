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

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from weightsync.errors import TransferError
from weightsync.kernels import warm_up
from weightsync.layout import Chunk
from weightsync.landing import Sink
from weightsync.protocol import InitInfo, RoundHeader, UpdateInfo
from weightsync.transports.collective import (
    LEAD_MAX_PIECES, CollectiveTransport, RoundRules, agree_options_over_group,
)
from weightsync.transports.base import RoundStats, SparsePatch
from weightsync.transports.collective.buffers import StagingBuffers
from weightsync.transports.nccl_group import UNIQUE_ID_KEY, NcclGroup
from weightsync.transports.nccl_options import NcclOptions
from weightsync.transports.nccl_pipeline import GpuTrace
from weightsync.transports.nccl_receive import NcclReceivePath
from weightsync.transports.nccl_send import NcclSendPath

__all__ = ["NcclOptions", "NcclRoundHeader", "NcclTransport"]  # NcclOptions: defined in nccl_options


class NcclRoundHeader(RoundHeader):
    """The round header of the nccl transport: the core header plus how this round moves."""

    # Each chunk's tensor pieces move from where they live to where they belong, one collective
    # call per piece in one NCCL group, instead of through a packed buffer.
    direct: bool = False
    # The first chunk moves while the group agrees, into the receivers' scratch memory, and is
    # placed only once the round is agreed (see NcclRoundRules.lead_pieces).
    lead: bool = False


class NcclRoundRules(RoundRules["NcclRoundHeader"]):
    """How an nccl round moves, as its header says: directly from where the tensors live when
    they can (options.packed packs anyway), and with its first chunk ahead of the agreement
    (options.lead); both ends derive the same lead pieces from the header."""

    header_model = NcclRoundHeader

    def __init__(self, options: NcclOptions):
        self._options = options

    def header_fields(self, lendable: bool, streamed: bool) -> dict[str, Any]:
        """Tensors that are contiguous on this GPU are broadcast from where they live: nothing is
        packed, no staging buffer is needed (options.packed packs anyway). The first chunk moves
        while the group agrees, so the agreement's host round trips overlap the transfer instead
        of preceding it (options.lead false waits instead; a streamed round never leads)."""
        return {"direct": lendable and not self._options.packed, "lead": not streamed and self._options.lead}

    def is_direct(self, header: NcclRoundHeader) -> bool:
        return header.direct

    def lead_pieces(self, chunks: Sequence[Chunk], header: NcclRoundHeader) -> list[int]:
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

    def round_rules(self) -> NcclRoundRules:
        options = self.options
        assert isinstance(options, NcclOptions)  # options_model
        return NcclRoundRules(options)

    def send_path(self, staging: StagingBuffers, rules: RoundRules[Any]) -> NcclSendPath:
        return NcclSendPath(self.party, staging, rules, self._gpu_trace)

    def receive_path(self, staging: StagingBuffers, rules: RoundRules[Any]) -> NcclReceivePath:
        return NcclReceivePath(self.party, staging, self._gpu_trace)

    @property
    def gpu_trace(self) -> list[tuple[str, torch.cuda.Event]]:
        """(diagnosis) when the GPU reached each step of the last round (see `GpuTrace`)."""
        return self._gpu_trace.marks

    def _forget_keys(self) -> None:
        """Trainer: remove this group's keys from the rendezvous store, which may outlive the
        group (a trainer's store server is shared by the groups on its port), so that a later
        group of the same name never reads a stale unique id or control step."""
        group = self.group
        assert isinstance(group, NcclGroup)  # connect forms one
        store = group.control_store or group.rendezvous_store
        if self.sender is None or store is None:
            return
        for key in [UNIQUE_ID_KEY] + self.sender.agreement.recent_keys(8):
            try:
                store.delete_key(key)
            except Exception:  # noqa: BLE001 - best effort: the store may already be gone
                return

    # Every CUDA call of a round runs with this transport's GPU current (a daemon's worker thread
    # starts on device 0, and kernels launch on the current device).
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> RoundStats:
        with torch.cuda.device(self.device):
            return super().send(named_tensors)

    def send_sparse(self, patches: Iterable[SparsePatch]) -> RoundStats:
        with torch.cuda.device(self.device):
            return super().send_sparse(patches)

    def receive(self, sink: Sink, info: UpdateInfo) -> RoundStats:
        with torch.cuda.device(self.device):
            return super().receive(sink, info)

    def close(self) -> None:
        self._forget_keys()
        super().close()  # aborting cancels any collective still queued, so the streams' syncs end
