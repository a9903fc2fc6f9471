"""The planned round (`weightsync.planned`) behind the public API: `WeightSender` and `get_transport`.

Why a typed option agreed at init (`InitInfo.trainer_ranks`) rather than a switch decided per
round: a planned group holds the M trainer ranks at ranks 0..M-1 and the receivers after them,
while the single-sender group holds trainer rank 0 and the receivers from rank 1. Which of the two
a party joins is fixed at rendezvous, before any round, and every party must know it: the
receivers cannot learn M later, and a sender cannot fall back from one group to the other
mid-life. So the init says it, every party reads the same value, and the same `init_info` that
today makes a sharded trainer gather makes it send from every rank once it carries
`trainer_ranks` (on the cpu backend, gloo, the only one with a planned round yet):

- trainer side (`WeightSender.init(info, sharded=True)` or `process_group=`): with
  `trainer_ranks` equal to the trainer group's size, every trainer rank joins the planned group
  (`PlannedParty`) and `send_weights(ModuleSource(model))` sends that rank's own shards
  (`to_local()`; nothing is gathered). Without `trainer_ranks` it keeps the gathering round and
  says so in a warning: the receivers were not told of the trainer's ranks.
- receiver side (`get_transport("cpu").connect(info, rank)` at rank >= trainer_ranks, then
  `receive(store, update_info)` per round): the planned round into a store that holds every
  tensor (whole tensors), as a daemon's does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from weightsync.errors import WeightSyncError
from weightsync.planned import PlannedParty, PlannedStats, receive_planned, send_planned
from weightsync.protocol import InitInfo, UpdateInfo
from weightsync.source import ModuleSource, TensorsSource, WeightSource
from weightsync.store import WeightStore
from weightsync.transports.base import RoundStats, Transport

if TYPE_CHECKING:
    from weightsync.landing import Sink
    from weightsync.sharded import TrainerGroup

log = logging.getLogger("weightsync.planned")


def trainer_party(info: InitInfo, backend: str, trainer: "TrainerGroup") -> PlannedParty | None:
    """This trainer rank's membership of a planned group, when the init agreed on one; None
    (the gathering round, with a warning on rank 0) when it did not."""
    if info.trainer_ranks is None:
        if trainer.rank == 0 and trainer.size > 1:
            log.warning("sharded trainer of %d ranks: init_info has no trainer_ranks, so the receivers expect "
                        "one sender; every round gathers each tensor (full_tensor) and rank 0 alone sends it "
                        "(set trainer_ranks=%d, cpu backend, for every rank to send only what it owns)",
                        trainer.size, trainer.size)
        return None
    if backend != "cpu":
        raise WeightSyncError(f"init_info.trainer_ranks (a planned round) runs over the cpu backend only, "
                              f"not {backend!r}")
    if info.trainer_ranks != trainer.size:
        raise WeightSyncError(f"init_info.trainer_ranks is {info.trainer_ranks}, the trainer group has "
                              f"{trainer.size} ranks")
    return PlannedParty(info, trainer.rank, trainer.size)


def _owned(source: WeightSource) -> Iterable[tuple[str, torch.Tensor]]:
    """The source's tensors as they are held (DTensors stay DTensors: nothing is materialized)."""
    if isinstance(source, ModuleSource):
        dtype = source.dtype
        return ((name, p.detach() if dtype is None else p.detach().to(dtype))  # a DTensor casts its shard
                for name, p in source.module.named_parameters())
    if isinstance(source, TensorsSource):
        return ((name, tensor.detach()) for name, tensor in source.named)
    raise WeightSyncError(f"a planned round sends each trainer rank's own shards: pass ModuleSource(model) or "
                          f"(name, tensor) pairs, not a {type(source).__name__}, whose iteration materializes "
                          f"full tensors")


def send_owned(party: PlannedParty, source: WeightSource) -> RoundStats:
    """One planned round from this trainer rank: what it owns of `source`, as the plan says."""
    return round_stats(party, send_planned(party, _owned(source)))


def round_stats(party: PlannedParty, stats: PlannedStats) -> RoundStats:
    return RoundStats(round_id=f"planned-{party.rounds}", update_kind="dense", num_tensors=stats.num_tensors,
                      payload_bytes=stats.moved, num_chunks=0, seconds=stats.seconds, planned=stats)


class PlannedReceiver(Transport):
    """A receiver of a planned group, as the cpu transport's `connect` returns it when
    `init.trainer_ranks` is set: each round lands every tensor of its store, whole, verified
    stream by stream (and with `atomic`, switched in only once verified)."""

    name = "cpu"

    def __init__(self, init: InitInfo, rank: int, party: PlannedParty):
        super().__init__(init, rank, torch.device("cpu"))
        self.party = party

    @classmethod
    def connect(cls, init: InitInfo, rank: int, device: torch.device | None = None) -> "PlannedReceiver":
        trainers = init.trainer_ranks
        if trainers is None or rank < trainers:
            raise WeightSyncError(f"rank {rank} is not a receiver of a planned group of {trainers} trainer ranks")
        return cls(init, rank, PlannedParty(init, rank, trainers))

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> RoundStats:
        raise WeightSyncError("a planned group's trainer ranks send with WeightSender(sharded=True)")

    def receive(self, sink: "Sink", info: UpdateInfo) -> RoundStats:
        if not isinstance(sink, WeightStore) or not sink.manifest.tensors:
            raise WeightSyncError("a planned round's receiver states its needs from its store: it needs a "
                                  "WeightStore holding every tensor (WeightStore.from_manifest), not "
                                  f"{'an empty store' if isinstance(sink, WeightStore) else type(sink).__name__}")
        return round_stats(self.party, receive_planned(self.party, sink))

    def close(self) -> None:
        self.party.close()

