"""The collective transports' `Transport`: a facade over one party's side of the round."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from weightsync.errors import TransferError
from weightsync.landing import Sink
from weightsync.protocol import InitInfo, UpdateInfo
from weightsync.source import WeightSource
from weightsync.transports.base import RoundStats, SparsePatch, Transport
from weightsync.transports.collective.buffers import StagingBuffers
from weightsync.transports.collective.group import Group, Party
from weightsync.transports.collective.paths import PackedReceivePath, PackedSendPath, ReceivePath, SendPath
from weightsync.transports.collective.receiver import CollectiveReceiver
from weightsync.transports.collective.rules import RoundRules
from weightsync.transports.collective.sender import CollectiveSender
from weightsync.transports.options import TransportOptions


class CollectiveOptions(TransportOptions):
    """Options of every collective transport (init_info.options)."""

    # Chunk sizes ramp up at the start of the stream and down at its end, so that a pipelined
    # transport fills and drains in small steps; off: every chunk is packed_buffer_size_bytes.
    # It decides where each chunk ends, so both ends must agree (they do, at init).
    ramp: bool = False


class CollectiveTransport(Transport):
    """One party's membership of a collective group, as the `Transport` API: rank 0 holds a
    `CollectiveSender` (trainer), every other rank a `CollectiveReceiver`; the facade only routes
    calls to that side. A transport chooses its `RoundRules` and data paths by overriding the
    three factories below (the composition), nothing else."""

    options_model = CollectiveOptions
    # How round headers decode, strictly (the rules' model; a transport with its own rules names theirs).
    header_model = RoundRules.header_model

    def __init__(self, init: InitInfo, rank: int, device: torch.device, group: Group):
        self.party = Party(init, rank, device, group)
        super().__init__(init, rank, device)
        staging = StagingBuffers(self.party)
        rules = self.round_rules()
        self.sender: CollectiveSender | None = None
        self.receiver: CollectiveReceiver | None = None
        if rank == 0:
            self.sender = CollectiveSender(self.party, rules, self.send_path(staging, rules), staging)
        else:
            self.receiver = CollectiveReceiver(self.party, rules, self.receive_path(staging, rules), staging)

    # -- the composition ----------------------------------------------------------------------
    def round_rules(self) -> RoundRules[Any]:
        """What this transport's header says about how a round moves."""
        return RoundRules()

    def send_path(self, staging: StagingBuffers, rules: RoundRules[Any]) -> SendPath:
        """The trainer's data path."""
        return PackedSendPath(self.party, staging)

    def receive_path(self, staging: StagingBuffers, rules: RoundRules[Any]) -> ReceivePath:
        """A receiver's data path."""
        return PackedReceivePath(self.party, staging)

    # -- the facts every part reads live in `party` (a benchmark swaps `init` between rounds) ---
    @property
    def init(self) -> InitInfo:
        return self.party.init

    @init.setter
    def init(self, value: InitInfo) -> None:
        self.party.init = value

    @property
    def options(self) -> CollectiveOptions:
        options = self.party.options
        assert options is not None  # set by Transport.__init__, before any other use
        return options

    @options.setter
    def options(self, value: TransportOptions) -> None:
        assert isinstance(value, CollectiveOptions)  # options_model
        self.party.options = value

    @property
    def group(self) -> Group:
        return self.party.group

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per phase of this party's last round."""
        return self._side().timings

    @timings.setter
    def timings(self, value: dict[str, float]) -> None:
        self._side().timings = value

    def _side(self) -> CollectiveSender | CollectiveReceiver:
        side = self.sender if self.sender is not None else self.receiver
        assert side is not None  # __init__ makes one of them
        return side

    def _trainer(self) -> CollectiveSender:
        if self.sender is None:
            raise TransferError(f"rank {self.rank} receives in this group; only rank 0 (the trainer) sends")
        return self.sender

    # -- the Transport API ----------------------------------------------------------------------
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> RoundStats:
        return self._trainer().send(named_tensors)

    def send_source(self, source: WeightSource, on_iterate: Callable[[], None] | None = None) -> RoundStats:
        """Stream a source: the header and manifest from its metadata, the payload from its
        iteration, one tensor materialized at a time; `on_iterate` is called once the receivers
        agreed, right before the iteration starts."""
        return self._trainer().send_source(source, on_iterate)

    def send_sparse(self, patches: Iterable[SparsePatch]) -> RoundStats:
        return self._trainer().send_sparse(patches)

    def receive(self, sink: Sink, info: UpdateInfo) -> RoundStats:
        """Check the header, land the payload, verify it, then commit (`CollectiveReceiver.receive`)."""
        if self.receiver is None:
            raise TransferError("rank 0 is the trainer of this group: it sends, it does not receive")
        return self.receiver.receive(sink, info)

    def refuse_round(self, reason: str) -> None:
        """Take this round's place only to object (`CollectiveSender.refuse`,
        `CollectiveReceiver.refuse`): every party raises ManifestMismatch naming `reason`."""
        self._side().refuse(reason)

    def close(self) -> None:
        self.group.close()  # aborting cancels any collective still queued
        self._side().close()
