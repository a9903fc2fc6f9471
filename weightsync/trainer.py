"""Trainer-side API: join the transfer group as rank 0, then send weights each round.

Three forms (see docs/library.md, "Trainers"):
- one process, plain tensors: `send_weights(model.named_parameters())`;
- one process or many, a source (`weightsync.source`): metadata first, then one materialized
  tensor at a time, so a round holds no second copy of the model (`send_weights(ModuleSource(model))`);
- a sharded trainer (FSDP2 / DTensor): every trainer rank calls `WeightSender.init(...,
  process_group=...)` and `send_weights(source)`. With `init_info.trainer_ranks` (the cpu
  backend) every rank joins the transfer group and sends only what it owns, nothing gathered
  (`weightsync.planned_api`); without it rank 0 alone joins and sends, the others materialize
  with it and return the round's outcome (`weightsync.sharded`), and rank 0 warns of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from weightsync.protocol import InitInfo, parse
from weightsync.source import WeightSource, adapt, as_source, is_source
from weightsync.transports import RoundStats, SparsePatch, Transport, default_device, get_transport

if TYPE_CHECKING:
    from weightsync.planned import PlannedParty
    from weightsync.sharded import TrainerGroup


class WeightSender:
    """The trainer's end of a transfer group.

    >>> sender = WeightSender.init({"backend": "cpu", "master_address": "127.0.0.1",
    ...                             "master_port": 29600, "world_size": 3})   # doctest: +SKIP
    >>> sender.send_weights(model.named_parameters())                           # doctest: +SKIP
    """

    def __init__(self, transport: Transport | None, trainer_group: TrainerGroup | None = None,
                 planned: PlannedParty | None = None):
        self.transport = transport  # None on a sharded trainer's ranks other than 0, and when planned
        self.trainer_group = trainer_group  # weightsync.sharded.TrainerGroup, or None
        self.planned = planned  # every rank's membership of a planned group (init_info.trainer_ranks)

    @classmethod
    def init(cls, init_info: InitInfo | dict[str, Any], backend: str | None = None,
             device: torch.device | str | None = None, *, process_group: torch.distributed.ProcessGroup | None = None,
             sharded: bool = False) -> "WeightSender":
        """Host the rendezvous and wait (up to the init timeout) for every receiver to join.

        A sharded trainer calls this on every rank with `sharded=True` (the default process
        group) or its `process_group`: that group's rank 0 joins the transfer group, the other
        ranks join nothing and only take part in each round's materialization. With
        `init_info.trainer_ranks` (the trainer group's size; the cpu backend) every rank joins a
        planned group instead and sends what it owns (`weightsync.planned_api`)."""
        info = init_info if isinstance(init_info, InitInfo) else parse(InitInfo, init_info, "init_info")
        name = backend or info.backend or "cpu"
        trainer_group = None
        if sharded or process_group is not None:
            from weightsync.planned_api import trainer_party
            from weightsync.sharded import TrainerGroup

            trainer_group = TrainerGroup(process_group)
            planned = trainer_party(info, name, trainer_group)
            if planned is not None:
                return cls(None, trainer_group, planned)
            if trainer_group.rank != 0:
                return cls(None, trainer_group)
        transport_cls = get_transport(name)
        target = torch.device(device) if device is not None else default_device(name)
        return cls(transport_cls.connect(info, 0, target), trainer_group)

    @property
    def is_sender(self) -> bool:
        return self.transport is not None or self.planned is not None  # planned: every rank sends

    @property
    def sending(self) -> Transport:
        """The transport this rank sends with (rank 0 of a sharded trainer, or the only rank)."""
        if self.transport is None:
            raise RuntimeError("this trainer rank sends nothing: rank 0 of its trainer group sends")
        return self.transport

    def send_weights(self, weights: WeightSource | Iterable[tuple[str, torch.Tensor]]) -> RoundStats:
        """Send every tensor to every receiver; returns what moved. The manifest is checked by
        all receivers first, so a mismatch raises ManifestMismatch and changes nothing.

        `weights`: (name, tensor) pairs, or a source (`metadata()` + iteration, e.g.
        `ModuleSource(model)`), which streams: one tensor materialized at a time. A source whose
        iteration disagrees with its metadata fails the round (SourceMismatch naming the
        parameter) on every party. On a sharded trainer every rank calls this each round."""
        weights = adapt(weights)  # a vLLM 0.33 source reads through its iter_full()
        with torch.no_grad():
            if self.planned is not None:
                from weightsync.planned_api import send_owned

                return send_owned(self.planned, as_source(weights))
            if self.trainer_group is not None:
                from weightsync.sharded import send_sharded

                return send_sharded(self.transport, self.trainer_group, as_source(weights))
            if is_source(weights):
                return self.sending.send_source(weights)
            return self.sending.send(weights)

    def send_sparse(self, patches: Iterable[SparsePatch]) -> RoundStats:
        with torch.no_grad():
            return self.sending.send_sparse(patches)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.planned is not None:
            self.planned.close()

    def __enter__(self) -> "WeightSender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
