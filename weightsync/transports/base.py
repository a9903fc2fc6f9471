"""What every transport offers: a trainer-side sender and a receiver-side engine.

A transport is one module that defines a `Transport` subclass and registers it under a name
(see `weightsync.transports.register`). The daemon and the trainer only ever talk to this
interface, so adding a transport touches nothing else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from weightsync.protocol import InitInfo, UpdateInfo, UpdateKind
from weightsync.transports.options import TransportOptions

if TYPE_CHECKING:
    from weightsync.landing import Sink
    from weightsync.source import WeightSource


@dataclass(frozen=True)
class SparsePatch:
    """An in-place patch of one existing parameter: flat indices and their new values."""

    name: str
    indices: torch.Tensor  # int64, flat positions into the parameter
    values: torch.Tensor  # the parameter's dtype, same length as indices


@dataclass(frozen=True)
class RoundStats:
    """What one round moved, as seen by one party."""

    round_id: str
    update_kind: UpdateKind
    num_tensors: int
    payload_bytes: int
    num_chunks: int
    seconds: float
    in_place: bool = False  # landed straight in the weights, without an unpack copy
    direct: bool = False  # nccl: sent from where the tensors live, without packing
    checksum: str | None = None  # the round's stream checksum, verified by every receiver
    # Trainer side of transports whose receivers read the trainer's memory (ipc, p2p): what the
    # coordinator must hand every receiver's /update_weights, and whether another batch follows.
    update_info: dict[str, Any] | None = None
    more: bool = False
    # A planned round (weightsync.planned_api): its weightsync.planned.PlannedStats, the bytes per
    # trainer rank and per receiver (typed loosely: the transports import no planned round).
    planned: Any = None


class Transport(ABC):
    """One party's membership in a transfer group: rank 0 sends, every other rank receives."""

    name: str = ""
    # Whether the receiver needs something from the trainer's HTTP answer (IPC handles) before
    # it can receive; collective transports receive while the trainer sends.
    needs_trainer_update_info: bool = False
    # Whether the group may form from a trainer-minted NCCL unique id (init_info.nccl_unique_id_b64)
    # instead of the rendezvous at master_address/master_port.
    joins_by_unique_id: bool = False
    # The typed model of this transport's `init_info.options` (see weightsync.transports.options).
    options_model: type[TransportOptions] = TransportOptions

    def __init__(self, init: InitInfo, rank: int, device: torch.device):
        self.init = init
        self.rank = rank
        self.device = device
        self.options = self.options_model.of(init)  # fixed for the group's life: agreed at init

    @classmethod
    @abstractmethod
    def connect(cls, init: InitInfo, rank: int, device: torch.device) -> "Transport":
        """Join the group (blocking until every party has joined or the timeout passes)."""

    @abstractmethod
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> RoundStats:
        """Trainer side: send a dense update of these tensors to every receiver."""

    @abstractmethod
    def receive(self, sink: Sink, info: UpdateInfo) -> RoundStats:
        """Receiver side: take one update into `sink` (a WeightStore the tensors land in, or a
        LoaderSink handing them to an engine's loader, as vLLM's), after checking its manifest."""

    def send_source(self, source: "WeightSource", on_iterate: Callable[[], None] | None = None) -> RoundStats:
        """Trainer side: send a dense update from a source (`weightsync.source`). Collective
        transports stream it; this default, for transports whose receivers read the trainer's
        memory during the round (ipc, p2p), needs every tensor resident until the round ends, so
        it materializes the whole source first (checked against its metadata) and sends that.
        `on_iterate` is called right before the source is iterated (see `weightsync.sharded`)."""
        from weightsync.source import resident

        if on_iterate is not None:
            on_iterate()
        _, named = resident(source)
        return self.send(named)

    def refuse_round(self, reason: str) -> None:  # noqa: B027 (an optional hook: the default does nothing)
        """Refuse the round in progress, naming `reason` (e.g. a receiver's /update_weights body
        failed validation): where the round is a collective that needs every party (cpu, nccl),
        this party still takes its place in the round's first agreement, only to object, so every
        party ends the round at once with the reason, no collective is left half-joined, and the
        next round runs on the same group. Raises ManifestMismatch naming every objection.
        This default is for transports whose receivers take no part in the trainer's transfer
        (ipc, p2p: they read the trainer's memory): nothing waits on this party, nothing to do."""

    def send_sparse(self, patches: Iterable[SparsePatch]) -> RoundStats:
        raise NotImplementedError(f"the {self.name} transport does not support sparse updates")

    def begin_round(self) -> None:  # noqa: B027 (an optional hook: the default does nothing)
        """A round starts (start_weight_update); transports that keep per-round state reset it."""

    def end_round(self) -> None:  # noqa: B027 (an optional hook: the default does nothing)
        """The round is over (finished or aborted): memory lent to receivers may be released."""

    @abstractmethod
    def close(self) -> None:
        """Leave the group and free its resources; safe to call twice."""
