"""A planned round: every trainer rank sends the bytes it owns; each receiver takes what it needs.

The group (gloo, `GlooGroup`) holds the M trainer ranks as ranks 0..M-1 and the N receivers as
ranks M..M+N-1. A round, on every party:
  1. layouts: every party all-gathers its layout as JSON (a trainer rank: every tensor's
     placements over its mesh, from the live DTensors; a receiver: the region of each tensor it
     needs, whole tensors for a store); every party decodes the same facts;
  2. the plan: every party derives `weightsync.plan.plan` from them (`PlanCache`: once per
     layout) and one all-gather carries every party's objection and plan fingerprint. A trainer
     rank that describes a tensor differently, a need no trainer rank holds, a receiver whose
     store disagrees, or two different fingerprints (then named per tensor with `plan_mismatch`)
     fail the round on every party with `ManifestMismatch`, before any byte moves;
  3. data: one stream per (trainer rank, receiver) that the plan gives bytes
     (`weightsync.planned_streams`), point to point, from the local shards (`to_local()`:
     nothing is gathered) into the receiver's store, or with `atomic` into scratch copies
     switched in only once verified;
  4. verdict: one all-gather of every party's objection and its per-stream checksums; a
     receiver commits only when every stream's checksum matches its sender's. Every party sees
     the same facts and reaches the same outcome.

Every wait is bounded by the group's timeout. A trainer rank that dies mid-round: the streams
from it fail at the receivers (naming it) and the final all-gather fails on every party; the
group is then aborted (`PlannedParty.close`) and a new one is needed. A refused round leaves
the group usable.

Broadcasts where several receivers need the same box go point to point to each of them here
(gloo); the plan already says where a broadcast applies, for a transport that has them.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.errors import IntegrityError, ManifestMismatch, TransferError
from weightsync.integrity import DIGEST_BYTES, format_digest
from weightsync.plan import Box, Need, Plan, PlanCache, ReceiverLayout, full_box, plan_digests, plan_mismatch
from weightsync.planned_layout import (
    TrainerHoldings, decode_receiver, decode_trainer, holdings, receiver_message, trainer_message, trainers_disagree,
    whole_needs,
)
from weightsync.planned_streams import Packer, Polled, Segment, Stream, StreamPlan, Unpacker, drive, region, streams_of
from weightsync.protocol import InitInfo, Manifest, TensorSpec
from weightsync.store import WeightStore
from weightsync.transports.collective.agreement import VERDICT_BYTES, encode_slot
from weightsync.transports.cpu import GlooGroup


@dataclass(frozen=True)
class PlannedStats:
    """What one planned round moved, as every party derived it (and this party measured)."""

    fingerprint: str
    num_tensors: int
    sent: Mapping[int, int]  # bytes on the wire per trainer rank, from the plan's streams
    received: Mapping[int, int]  # bytes on the wire per receiver rank, from the plan's streams
    moved: int  # bytes this party sent (trainer) or received (receiver), counted as they moved
    seconds: float


@dataclass(frozen=True)
class _Agreed:
    plan: Plan
    streams: dict[tuple[int, int], StreamPlan]


class PlannedParty:
    """One party's membership in a planned group: trainer ranks 0..trainers-1, then receivers."""

    def __init__(self, init: InitInfo, rank: int, trainers: int):
        if not 0 < trainers < init.world_size:
            raise ValueError(f"{trainers} trainer ranks in a group of {init.world_size}")
        self.init = init
        self.rank = rank
        self.trainers = trainers
        self.group = GlooGroup(init, rank)
        self._plans = PlanCache()
        self._streams: tuple[Plan, dict[tuple[int, int], StreamPlan]] | None = None
        self.rounds = 0  # rounds begun: the key under which a failed round's reason is told
        self._scratch: dict[str, torch.Tensor] = {}  # an atomic receiver's landing copies, kept
        self._buffers: dict[int, list[torch.Tensor]] = {}  # staging buffers per peer, kept

    def scratch(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """An atomic receiver's landing copy of tensor `name`, reused from round to round."""
        kept = self._scratch.get(name)
        if kept is None or kept.shape != like.shape or kept.dtype != like.dtype:
            kept = self._scratch[name] = torch.empty_like(like)
        return kept

    @property
    def is_trainer(self) -> bool:
        return self.rank < self.trainers

    def describe(self, rank: int) -> str:
        return f"trainer rank {rank}" if rank < self.trainers else f"receiver {rank}"

    def close(self) -> None:
        self.group.close()

    def _failure_key(self) -> str:
        return f"planned/{self.rounds}/failure"

    def tell_failure(self, reason: str) -> None:
        """The round's first failure, on the group's store (the first teller's stays), for the
        parties whose own wait failed only because a peer gave up (its abort) or went missing
        from the final all-gather: they name the cause, not just the peer they waited for."""
        store = self.group.store
        if store is not None:
            try:
                store.compare_set(self._failure_key(), "", f"{self.describe(self.rank)}: {reason}"[:2000])
            except Exception:  # noqa: BLE001 - the store's host (trainer rank 0) is gone: they fail anyway
                pass

    def hear_failure(self, wait_seconds: float = 2.0) -> str:
        """What another party told of this round's failure (waiting briefly for it), or why nobody
        can tell: the store lives on trainer rank 0, so an unreachable store means it is gone."""
        store = self.group.store
        deadline = time.monotonic() + wait_seconds
        while store is not None:
            try:
                if store.check([self._failure_key()]):
                    return store.get(self._failure_key()).decode(errors="replace")
            except Exception:  # noqa: BLE001 - the store is unreachable
                return "the group's store, hosted by trainer rank 0, is unreachable: trainer rank 0 is gone"
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return "no party told why"

    # -- steps shared by both sides -------------------------------------------------------------
    def exchange_json(self, payload: bytes) -> list[bytes]:
        """Every party's bytes (any length): an all-gather of the lengths, then of the padded bytes."""
        sizes = [int(t.item()) for t in self.group.all_gather(torch.tensor([len(payload)], dtype=torch.int64))]
        padded = torch.zeros(max(max(sizes), 1), dtype=torch.uint8)
        if payload:
            padded[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        rows = self.group.all_gather(padded)
        return [row[:size].numpy().tobytes() for row, size in zip(rows, sizes, strict=True)]

    def agree(self, message: bytes, problem: str | None) -> _Agreed:
        """Steps 1 and 2: exchange layouts, derive the plan, compare verdicts and fingerprints.
        Raises ManifestMismatch (on every party alike) before any byte moves."""
        messages = [json.loads(raw) for raw in self.exchange_json(message)]
        derived: Plan | None = None
        if problem is None:
            try:
                derived = self._derive(messages)
            except ValueError as error:
                problem = str(error)
        fingerprint = bytes.fromhex(derived.fingerprint)[:DIGEST_BYTES] if derived else bytes(DIGEST_BYTES)
        rows = self.group.gather_to_host(torch.frombuffer(bytearray(encode_slot(problem, fingerprint)),
                                                          dtype=torch.uint8))
        verdicts = [(row[:VERDICT_BYTES].numpy().tobytes().split(b"\0", 1)[0].decode(errors="replace"),
                     row[VERDICT_BYTES:].numpy().tobytes()) for row in rows]
        objections: dict[str, list[int]] = {}
        for rank, (text, _) in enumerate(verdicts):
            if text:
                objections.setdefault(text, []).append(rank)
        if objections:
            raise ManifestMismatch("; ".join(f"{self._ranks(ranks)}: {text}" for text, ranks in objections.items()))
        if len({digest for _, digest in verdicts}) > 1:
            raise ManifestMismatch(self._which_tensor(derived))
        assert derived is not None
        return _Agreed(derived, self._streams_of(derived))

    def _ranks(self, ranks: list[int]) -> str:
        if len(ranks) == self.group.world_size:
            return "every party"
        return ", ".join(self.describe(rank) for rank in ranks)

    def _derive(self, messages: list[dict[str, Any]]) -> Plan:
        trainers = {rank: m["tensors"] for rank, m in enumerate(messages) if m["role"] == "trainer"}
        if sorted(trainers) != list(range(self.trainers)):
            raise ValueError(f"the trainer ranks are {sorted(trainers)}, expected 0..{self.trainers - 1}")
        disagreement = trainers_disagree(trainers)
        if disagreement is not None:
            raise ValueError(disagreement)
        receivers: dict[int, ReceiverLayout] = {rank: decode_receiver(m["tensors"])
                                                for rank, m in enumerate(messages) if m["role"] == "receiver"}
        return self._plans.get(decode_trainer(trainers[0]), receivers)

    def _which_tensor(self, mine: Plan | None) -> str:
        """Fingerprints differ: every party's per-tensor digests, compared with trainer rank 0's."""
        digests = [] if mine is None else plan_digests(mine)
        rows = [json.loads(raw) for raw in self.exchange_json(json.dumps(digests).encode())]
        for rank, theirs in enumerate(rows[1:], start=1):
            mismatch = plan_mismatch(rows[0], self.describe(0), theirs, self.describe(rank))
            if mismatch is not None:
                return mismatch
        return "the parties derived plans with different fingerprints"

    def _streams_of(self, derived: Plan) -> dict[tuple[int, int], StreamPlan]:
        if self._streams is None or self._streams[0] is not derived:
            self._streams = (derived, streams_of(derived))
        return self._streams[1]

    def buffers(self, peer: int) -> list[torch.Tensor]:
        """The staging buffers of the stream with `peer` (the init's count and size, a multiple
        of 8 bytes so that every chunk starts on a checksum word), kept from round to round."""
        size = self.init.packed_buffer_size_bytes - self.init.packed_buffer_size_bytes % 8
        kept = self._buffers.get(peer)
        if kept is None or len(kept) != self.init.packed_num_buffers or kept[0].numel() != size:
            kept = self._buffers[peer] = [torch.empty(size, dtype=torch.uint8)
                                          for _ in range(self.init.packed_num_buffers)]
        return kept

    def verdict(self, streams: list[Stream], problem: str | None) -> list[tuple[str, bytes]]:
        """Step 4: every party's objection and its checksum per stream (a row per sender, a
        column per receiver), all-gathered."""
        world = self.group.world_size
        digests = bytearray(world * world * DIGEST_BYTES)
        for stream in streams:
            sender, receiver = stream.plan.sender, stream.plan.receiver
            at = (sender * world + receiver) * DIGEST_BYTES
            digests[at:at + DIGEST_BYTES] = stream.digest.as_bytes().numpy().tobytes()
        slot = encode_slot(problem) + bytes(digests)
        try:
            rows = self.group.gather_to_host(torch.frombuffer(bytearray(slot), dtype=torch.uint8))
        except TransferError as error:
            self.group.abort()
            raise TransferError(f"the round's final agreement failed ({self.hear_failure()}): {error}") from error
        return [(row[:VERDICT_BYTES].numpy().tobytes().split(b"\0", 1)[0].decode(errors="replace"),
                 row[VERDICT_BYTES + DIGEST_BYTES:].numpy().tobytes()) for row in rows]

    def judge(self, rows: list[tuple[str, bytes]], agreed: _Agreed) -> None:
        """Raise on any objection or any stream whose receiver's checksum differs from its sender's."""
        problems = [f"{self.describe(rank)}: {text}" for rank, (text, _) in enumerate(rows) if text]
        world = self.group.world_size
        for sender, receiver in agreed.streams:
            at = (sender * world + receiver) * DIGEST_BYTES
            sent, got = rows[sender][1][at:at + DIGEST_BYTES], rows[receiver][1][at:at + DIGEST_BYTES]
            if sent != got:
                raise IntegrityError(f"round not applied: the stream from {self.describe(sender)} to "
                                     f"{self.describe(receiver)} arrived with checksum {format_digest(got)}, "
                                     f"sent with {format_digest(sent)}")
        if problems:
            raise TransferError("round not applied: " + "; ".join(problems))

    def stats(self, agreed: _Agreed, moved: int, started: float) -> PlannedStats:
        """The round's bytes per party as its streams carry them (a box several receivers need is
        sent to each: the plan's `sent` counts it once, as a broadcast would carry it)."""
        sent = dict.fromkeys(range(self.trainers), 0)
        received = dict.fromkeys(range(self.trainers, self.group.world_size), 0)
        for (sender, receiver), stream in agreed.streams.items():
            sent[sender] += stream.nbytes
            received[receiver] += stream.nbytes
        return PlannedStats(agreed.plan.fingerprint, len(agreed.plan.tensors), sent, received, moved,
                            time.perf_counter() - started)


def send_planned(party: PlannedParty, named: Iterable[tuple[str, torch.Tensor]]) -> PlannedStats:
    """Trainer rank `party.rank`: send what it owns of `named` (DTensors or plain tensors, the
    same names and order on every trainer rank) as the round's plan says. Never calls
    `full_tensor()`: each DTensor's bytes come from `to_local()`."""
    if not party.is_trainer:
        raise ValueError(f"rank {party.rank} is a receiver of this group")
    started = time.perf_counter()
    problem, held = None, TrainerHoldings([], {})
    try:
        held = holdings(named, party.rank)
        message = trainer_message(held, party.trainers)
    except ValueError as error:
        problem, message = str(error), json.dumps({"role": "trainer", "tensors": []}).encode()
    party.rounds += 1
    agreed = party.agree(message, problem)

    def source_of(segment: Segment) -> torch.Tensor:
        shard = held.shards[segment.name]
        return region(shard.tensor, shard.box, segment.box)

    streams = [Stream(stream_plan, receiver, party.buffers(receiver),
                      post=functools.partial(_send, party.group, to=receiver),
                      fill=Packer(stream_plan.segments, source_of))
               for (sender, receiver), stream_plan in agreed.streams.items() if sender == party.rank]
    _move(party, streams)
    party.judge(party.verdict(streams, None), agreed)
    return party.stats(agreed, sum(s.moved for s in streams), started)


def _send(group: GlooGroup, buffer: torch.Tensor, to: int) -> Polled:
    return group.send(buffer, to)


def _recv(group: GlooGroup, buffer: torch.Tensor, src: int) -> Polled:
    return group.recv(buffer, src)


def _move(party: PlannedParty, streams: list[Stream]) -> None:
    """Step 3, bounded; on a failure the group is aborted, so the peers' waits end at once."""
    def fail(reason: str) -> None:  # told before the abort, so the first teller is the cause
        party.tell_failure(reason)
        party.group.abort()

    try:
        drive(streams, party.describe, fail)
    except TransferError as error:
        first = party.hear_failure(0.5)
        party.close()
        if first.startswith(party.describe(party.rank) + ":"):
            raise
        raise TransferError(f"{error} (the round's first failure: {first})") from error


def receive_planned(party: PlannedParty, store: WeightStore, atomic: bool | None = None,
                    needs: Mapping[str, Need] | None = None) -> PlannedStats:
    """Receiver `party.rank`: state its needs (default: every tensor of `store`, whole), take the
    round's streams, verify them and only then commit. With `atomic` (default: the init's) the
    bytes land in scratch copies switched into `store` after verification, so a failed round
    leaves the store as it was; without it they land in place (a failure sets `weights_touched`)."""
    if party.is_trainer:
        raise ValueError(f"rank {party.rank} is a trainer rank of this group")
    started = time.perf_counter()
    atomic = party.init.atomic if atomic is None else atomic
    wanted = dict(whole_needs(store.manifest) if needs is None else needs)
    problem = store.mismatch(_manifest_of(wanted)) if needs is not None else None
    party.rounds += 1
    agreed = party.agree(receiver_message(wanted), problem)
    mine = [(key, plan) for key, plan in agreed.streams.items() if key[1] == party.rank]
    targets: dict[str, torch.Tensor] = {}
    for _, stream_plan in mine:
        for segment in stream_plan.segments:
            if segment.name not in targets:
                live = store[segment.name]
                targets[segment.name] = party.scratch(segment.name, live) if atomic else live

    def target_of(segment: Segment) -> torch.Tensor:
        tensor = targets[segment.name]
        return region(tensor, _full(tensor), segment.box)

    streams = [Stream(plan, key[0], party.buffers(key[0]), post=functools.partial(_recv, party.group, src=key[0]),
                      drain=Unpacker(plan.segments, target_of)) for key, plan in mine]
    try:
        _move(party, streams)
        party.judge(party.verdict(streams, None), agreed)
    except TransferError as error:
        error.weights_touched = bool(streams) and not atomic
        raise
    if atomic:
        with store.lock:
            for _, stream_plan in mine:
                for segment in stream_plan.segments:
                    live = store[segment.name]
                    region(live, _full(live), segment.box).copy_(target_of(segment))
    return party.stats(agreed, sum(s.moved for s in streams), started)


def _full(tensor: torch.Tensor) -> Box:
    return full_box(tuple(tensor.shape))


def _manifest_of(needs: Mapping[str, Need]) -> Manifest:
    return Manifest(tensors=tuple(TensorSpec(name=name, dtype=need.dtype, shape=need.shape)
                                  for name, need in needs.items()))
