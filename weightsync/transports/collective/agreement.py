"""The agreement steps of a round: every party's verdict (and checksum), seen by every party.

A step is one all-gather of fixed-size slots, each a party's objection (empty: none) and its
stream checksum. When the group has a control store (nccl over its rendezvous TCPStore) the
slots travel as store keys instead, host to host, in two halves (`post`, then `collect`) so that
a party can work between making its verdict known and reading the others'. Every party sees the
same facts, so every party reaches the same outcome without a further step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.errors import TransferError
from weightsync.integrity import DIGEST_BYTES, StreamDigest, format_digest
from weightsync.rendezvous import agree_options
from weightsync.transports.collective.group import Group, Party
from weightsync.transports.collective.trace import mark
from weightsync.transports.options import TransportOptions

VERDICT_BYTES = 1024  # room for one party's error message in an agreement step
SLOT_BYTES = VERDICT_BYTES + DIGEST_BYTES  # one party's share of an agreement: message, checksum
KEPT_STEPS = 6  # the trainer deletes the control keys of steps older than this many


@dataclass(frozen=True)
class Verdicts:
    """What one agreement step told every party: each rank's objection and checksum."""

    messages: list[str]
    digests: list[str | None]

    def objections(self) -> list[str]:
        by_message: dict[str, list[int]] = {}
        for rank, message in enumerate(self.messages):
            if message:
                by_message.setdefault(message, []).append(rank)
        return [f"rank {', '.join(map(str, ranks))}: {message}" for message, ranks in by_message.items()]

    def checksum_mismatches(self) -> list[int]:
        """Receivers whose checksum differs from the trainer's (rank 0's)."""
        sent = self.digests[0]
        if sent is None:
            return []
        return [rank for rank, got in enumerate(self.digests) if rank and got != sent]

    def checksum_failures(self) -> list[str]:
        """One line per receiver whose checksum differs from the trainer's."""
        return [f"rank {rank}: checksum mismatch: received {self.digests[rank]}, trainer sent {self.digests[0]}"
                for rank in self.checksum_mismatches()]


def encode_slot(message: str | None, digest: bytes = bytes(DIGEST_BYTES)) -> bytes:
    """One party's share of an agreement step: its objection (NUL-padded), then its checksum."""
    return (message or "").encode()[: VERDICT_BYTES - 1].ljust(VERDICT_BYTES, b"\0") + digest


def decode_slots(rows: Sequence[bytes], with_digest: bool) -> Verdicts:
    messages, digests = [], []
    for raw in rows:
        if len(raw) != SLOT_BYTES:
            raise TransferError(f"an agreement step carried {len(raw)} bytes, not {SLOT_BYTES}")
        messages.append(raw[:VERDICT_BYTES].split(b"\0", 1)[0].decode(errors="replace"))
        digests.append(format_digest(raw[VERDICT_BYTES:]) if with_digest else None)
    return Verdicts(messages, digests)


def agree_options_over_group(group: Group, options: TransportOptions) -> None:
    """For a group without a rendezvous store (nccl from a trainer-minted id): all-gather every
    party's options over the group itself and compare them as `open_store` does."""
    body = json.dumps(options.agreed(), sort_keys=True)
    if len(body.encode()) >= VERDICT_BYTES:
        raise TransferError(f"the transport options take {len(body)} bytes, more than an agreement slot holds")
    slot = group.to_device(torch.frombuffer(bytearray(encode_slot(body)), dtype=torch.uint8))
    rows = group.gather_to_host(slot)
    agree_options([json.loads(message) if message else None
                   for message in decode_slots([row.numpy().tobytes() for row in rows], False).messages])


@dataclass(frozen=True)
class StoreEntry:
    """One more key set on the control store in the same call as a party's verdict (the trainer's
    round header rides with its first verdict: one round trip instead of two)."""

    key: str
    value: bytes


@dataclass(frozen=True)
class GroupTicket:
    """A posted verdict that travels as an all-gather over the group, at `collect`."""

    message: str | None
    digest: StreamDigest | None


@dataclass(frozen=True)
class StoreTicket:
    """A posted verdict already on the control store: `collect` reads every party's key."""

    keys: list[str]
    with_digest: bool


Ticket = GroupTicket | StoreTicket


class Agreement:
    """One party's agreement steps over its group, and the numbering of its control steps.

    Why its own object: the sender and the receiver both agree, the round header shares the step
    numbering with the verdicts (over a store, each is a key `ctl/<step>/...`), and the trainer
    must delete old keys; so the sequence lives here once and nothing else counts steps."""

    def __init__(self, party: Party):
        self._party = party
        self._steps = 0  # steps taken over the control store (when the group uses one)
        self._forgotten = 0  # trainer: steps whose keys are deleted
        self._digest_host: torch.Tensor | None = None  # pinned landing place of the final checksum

    @property
    def _store(self) -> Any:  # the group's torch.distributed store, or None
        return getattr(self._party.group, "control_store", None)

    def next_header_key(self) -> str:
        """A new control step for a round header (over the store): its key."""
        self._steps += 1
        return f"ctl/{self._steps}/header"

    def recent_keys(self, depth: int) -> list[str]:
        """The keys of the last `depth` control steps and the current one (for a trainer that
        removes its keys from a store that outlives the group)."""
        return [f"ctl/{step}/{suffix}" for step in range(max(1, self._steps - depth), self._steps + 1)
                for suffix in ("header", *range(self._party.group.world_size))]

    def exchange(self, message: str | None, digest: StreamDigest | None = None) -> Verdicts:
        """One agreement step: all-gather every rank's objection (and checksum, if any)."""
        return self.collect(self.post(message, digest))

    def post(self, message: str | None, digest: StreamDigest | None = None, gpu_done: bool = True,
             with_entry: StoreEntry | None = None) -> Ticket:
        """First half of an agreement step: make this rank's verdict known (over the store, at
        once; over the group, at `collect`). The caller may work in between.

        `gpu_done`: the verdict vouches for GPU work, so wait for it first (the header checks
        before the payload need not). `with_entry`: the trainer's header, posted in the same
        store call as its verdict."""
        control = self._store
        if control is None:
            return GroupTicket(message, digest)
        group = self._party.group
        copied = self._digest_to_host(digest) if digest is not None else None
        if gpu_done:
            group.synchronize()  # bounded wait
            mark("exchange: synchronized")
        slot = encode_slot(message, bytes(DIGEST_BYTES) if copied is None else copied.numpy().tobytes())
        self._steps += 1
        keys = [f"ctl/{self._steps}/{rank}" for rank in range(group.world_size)]
        if with_entry is None:
            control.set(keys[group.rank], slot)
        else:
            control.multi_set([with_entry.key, keys[group.rank]], [with_entry.value, slot])
        mark("exchange: posted")
        return StoreTicket(keys, digest is not None)

    def collect(self, ticket: Ticket) -> Verdicts:
        """Second half of an agreement step: every rank's verdict."""
        if isinstance(ticket, GroupTicket):
            return self._exchange_over_group(ticket.message, ticket.digest)
        try:  # blocks until every key is there, at most the group's timeout (one round trip)
            rows = self._store.multi_get(ticket.keys)
        except Exception as error:  # the store raises on its timeout
            self._party.group.fail()
            raise TransferError(f"agreement step timed out after {self._party.init.timeout_seconds:g}s "
                                f"(a party is missing or stopped): {error}") from error
        mark("exchange: gathered")
        return decode_slots(rows, ticket.with_digest)

    def _digest_to_host(self, digest: StreamDigest) -> torch.Tensor:
        """Start copying the checksum to host memory behind the GPU work it sums, so that reading
        it after the wait costs no further GPU call (the wait itself is the synchronisation)."""
        if digest.device.type != "cuda":
            return digest.as_bytes().cpu()
        if self._digest_host is None:
            self._digest_host = torch.empty(DIGEST_BYTES, dtype=torch.uint8, pin_memory=True)
        self._digest_host.copy_(digest.as_bytes(), non_blocking=True)
        return self._digest_host

    def forget_old_steps(self) -> None:
        """Trainer: delete the control keys of rounds ago (every party has read them). Called
        while the payload moves, when the host has nothing else to do."""
        store = self._store
        if store is None or self._party.group.rank != 0:
            return
        while self._forgotten < self._steps - KEPT_STEPS:
            self._forgotten += 1
            for suffix in ("header", *range(self._party.group.world_size)):
                store.delete_key(f"ctl/{self._forgotten}/{suffix}")

    def _exchange_over_group(self, message: str | None, digest: StreamDigest | None) -> Verdicts:
        group = self._party.group
        slot = group.to_device(torch.frombuffer(bytearray(encode_slot(message)), dtype=torch.uint8))
        if digest is not None:
            slot[VERDICT_BYTES:].copy_(digest.as_bytes())
        mark("exchange: slot on device")
        rows = group.gather_to_host(slot)
        mark("exchange: gathered")
        return decode_slots([row.numpy().tobytes() for row in rows], digest is not None)
