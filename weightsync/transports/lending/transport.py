"""The `Transport` facade of the ipc and p2p transports: one party's membership in the group."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

import torch

from weightsync.errors import TransferError
from weightsync.kernels import warm_up
from weightsync.landing import Sink
from weightsync.protocol import InitInfo, UpdateInfo
from weightsync.rendezvous import open_store
from weightsync.source import WeightSource
from weightsync.transports.base import RoundStats, SparsePatch, Transport
from weightsync.transports.lending.checksums import Coverage, DigestBoard, DigestPublisher
from weightsync.transports.lending.receiver import CopyStrategy, IpcReceiver
from weightsync.transports.lending.sender import IpcSender


class _LendingOptions(Protocol):
    """What the lending family reads of its transports' options (ipc's, p2p's)."""

    @property
    def source_sum_programs(self) -> int | None: ...


class LendingTransport(Transport):
    """A party of a group whose receivers read the trainer's lent memory.

    Its one job is membership: it joins the group on the rendezvous store (every party agrees on
    the options there; the store is then the `DigestBoard`) and holds one side of the protocol,
    by rank: rank 0 an `IpcSender`, every other rank an `IpcReceiver`. A transport of this
    family says only what differs: what its checksum covers (`coverage`) and how its receivers
    move bytes (`copy_strategy`)."""

    needs_trainer_update_info = True

    def __init__(self, init: InitInfo, rank: int, device: torch.device):
        self._role: IpcSender | IpcReceiver | None = None
        super().__init__(init, rank, device)
        self.digests = DigestBoard(open_store(init, rank, self.options.agreed()))
        side = torch.cuda.Stream(device)  # checksums (and ipc's copy) run here, off the round's stream
        if rank == 0:
            options = cast(_LendingOptions, self.options)  # each lending transport's options model has it
            publisher = DigestPublisher(self.digests, device, side, init.timeout_seconds,
                                        options.source_sum_programs)
            self._role = IpcSender(init, device, self.coverage(), publisher)
        else:
            self._role = IpcReceiver(self.name, init, device, self.digests, side, self.copy_strategy(side))

    def coverage(self) -> Coverage:
        """What the trainer's checksum covers when a round is verified."""
        return Coverage.FULL

    def copy_strategy(self, side: torch.cuda.Stream) -> CopyStrategy[Any]:
        """How this transport's receivers move the trainer's bytes (`side`: the checksum stream)."""
        raise NotImplementedError

    @property
    def init(self) -> InitInfo:
        return self._init

    @init.setter
    def init(self, value: InitInfo) -> None:
        # The sender reads it each round (a benchmark swaps it to turn verify off between rounds).
        self._init = value
        if self._role is not None:
            self._role.init = value

    @classmethod
    def connect(cls, init: InitInfo, rank: int, device: torch.device | None = None) -> "LendingTransport":
        if not torch.cuda.is_available():
            raise TransferError(f"the {cls.name} transport needs CUDA, and none is available here")
        if device is None or device.type != "cuda" or device.index is None:
            device = torch.device("cuda", torch.cuda.current_device() if device is None or device.index is None
                                  else device.index)
        warm_up(device)
        return cls(init, rank, device)

    def _sender(self) -> IpcSender:
        if not isinstance(self._role, IpcSender):
            raise TransferError(f"rank {self.rank} of a {self.name} group receives; rank 0 sends")
        return self._role

    def _receiver(self) -> IpcReceiver:
        if not isinstance(self._role, IpcReceiver):
            raise TransferError(f"rank {self.rank} of a {self.name} group sends; the other ranks receive")
        return self._role

    # == trainer ==================================================================================
    def begin_round(self) -> None:
        if isinstance(self._role, IpcSender):
            self._role.reset()

    def end_round(self) -> None:
        self.begin_round()

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> RoundStats:
        sender = self._sender()
        with torch.cuda.device(self.device):  # a daemon's worker thread starts on device 0
            return sender.send(named_tensors)

    def send_source(self, source: WeightSource, on_iterate: Callable[[], None] | None = None) -> RoundStats:
        """Receivers read the lent tensors during the whole round, so a source cannot stream
        here: it is materialized whole (required resident; a sharded model's full tensors then
        all live on rank 0 until the round ends: use cpu or nccl to stream). A round that
        continues in further batches (`more`) goes on from what the first call materialized."""
        if self._sender().in_round:
            return self.send(())
        return super().send_source(source, on_iterate)

    def send_sparse(self, patches: Iterable[SparsePatch]) -> RoundStats:
        sender = self._sender()
        with torch.cuda.device(self.device):
            return sender.send_sparse(patches)

    # == receiver =================================================================================
    def receive(self, sink: Sink, info: UpdateInfo) -> RoundStats:
        """`sink`: a `WeightStore` or a `LoaderSink` (see `weightsync.landing`)."""
        receiver = self._receiver()
        with torch.cuda.device(self.device):  # a daemon's worker thread starts on device 0
            return receiver.receive(sink, info)

    def close(self) -> None:
        if self._role is not None:
            self._role.close()
        if self.digests.store is not None:
            self.digests.close()
