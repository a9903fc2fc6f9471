"""What the nccl data paths share: side streams, plans cached while their memory stays the same,
the GPU-side trace, and the join that ends a pipelined round on the caller's stream."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from weightsync.errors import TransferError
from weightsync.integrity import StreamDigest
from weightsync.layout import Chunk
from weightsync.protocol import RoundHeader
from weightsync.transports.collective import Party, trace
from weightsync.transports.nccl_group import NcclGroup
from weightsync.transports.nccl_options import NcclOptions


class Streams:
    """Per-buffer side streams of one data path, created once."""

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


_Plan = TypeVar("_Plan")


@dataclass(frozen=True)
class _CachedPlans:
    key: tuple[Any, ...]
    plans: list[Any]
    chunks: Sequence[Chunk]  # kept alive, so that the ids in `key` stay unique
    keep: tuple[Any, ...] = field(default=())


class PlanCache:
    """One list of plans per kind (pack, unpack, landed pieces, ...), reused while the chunks and
    the memory they point at stay the same (building them costs host time before the payload)."""

    def __init__(self) -> None:
        self._plans: dict[str, _CachedPlans] = {}

    def get(self, kind: str, chunks: Sequence[Chunk], key: tuple[Any, ...], build: Callable[[], list[_Plan]],
            keep: tuple[Any, ...] = ()) -> list[_Plan]:
        """The plans for `chunks` (a cached list: the entry keeps it, and `keep`, alive, so their
        ids are stable) whose memory is identified by `key`; built on first use."""
        key = (id(chunks), *(id(k) for k in keep), *key)
        cached = self._plans.get(kind)
        if cached is not None and cached.key == key:
            return cached.plans
        self._plans.pop(kind, None)  # release the old plan's memory before building anew
        plans = build()
        self._plans[kind] = _CachedPlans(key, plans, chunks, keep)
        return plans

    def clear(self) -> None:
        self._plans.clear()


class GpuTrace:
    """(diagnosis, while `collective.trace.TRACE` records) when the GPU reached each step of the
    last round, as timing events; the trainer's and a receiver's paths both mark it."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, torch.cuda.Event]] = []

    def mark(self, label: str, stream: torch.cuda.Stream) -> None:
        if trace.TRACE is None:
            self.marks = []
            return
        if label == "first piece starts":
            self.marks = []
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        self.marks.append((label, event))


def join(device: torch.device, group: NcclGroup, streams: Sequence[torch.cuda.Stream],
         parts: Sequence[StreamDigest | None], digest: StreamDigest | None) -> None:
    """Make the caller's stream wait for every side stream, then fold the partial checksums."""
    current = torch.cuda.current_stream(device)
    for stream in streams:
        current.wait_stream(stream)
    current.wait_stream(group.stream)
    if digest is not None:
        for part in parts:
            assert part is not None  # a checksummed round has a partial checksum per stream
            digest.add(part.sums)


def nccl_options(party: Party, path: str) -> NcclOptions:
    """The party's options, which the nccl transport sets to its own (NcclOptions); `path` names
    the data path that needs them (send, receive) in the error."""
    options = party.options
    if not isinstance(options, NcclOptions):
        raise TransferError(f"the nccl {path} path needs the nccl options, not {type(options).__name__}")
    return options


def is_direct(header: RoundHeader, path: str) -> bool:
    """The nccl header's `direct` field (its model, NcclRoundHeader, lives in the nccl transport,
    a layer above the data paths, which cannot import it)."""
    direct = getattr(header, "direct", None)
    if not isinstance(direct, bool):
        raise TransferError(f"the nccl {path} path was given a round header without nccl's `direct` field")
    return direct
