"""The data of a planned round: one byte stream per (trainer rank, receiver), moved point to point.

A plan lists, per tensor, boxes sent by one trainer rank to one or more receivers. Every party
derives the same streams from it: the boxes from sender s to receiver r, in the plan's order,
each box's elements row-major, back to back. A stream moves in chunks of at most the buffer
size, `num_buffers` of them in flight per stream, so a trainer rank holds its shards plus
(receivers x num_buffers) buffers and a receiver (senders x num_buffers): bounded, never the
model at once.

Each side folds every chunk into a checksum of its stream (`integrity.region_sums` at the
chunk's stream position): the sender what it packed, the receiver what it received and landed.
The round compares the two per stream before anything is committed.

Each stream runs on a thread of its own: it keeps its window of sends or receives posted and
waits for the oldest (each wait bounded by the group's timeout). Streams never wait on one
another, so no order of completions can deadlock (one thread waiting on one stream could wait on
a peer that waits on another). The first failure (a peer died: gloo sees the connection close;
or a wait timed out) aborts the group, so every other stream's wait ends at once, and the round
fails naming that stream's peer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Protocol

import torch

from weightsync.errors import TransferError
from weightsync.integrity import StreamDigest
from weightsync.plan import Box, Plan
from weightsync.protocol import DTYPE_SIZES


class Polled(Protocol):
    """A started point-to-point operation (gloo's, see `GlooGroup.send`); `wait` is bounded."""

    def wait(self) -> None: ...


@dataclass(frozen=True)
class Segment:
    """One box of one tensor in a stream."""

    name: str
    box: Box
    nbytes: int


@dataclass(frozen=True)
class StreamPlan:
    """The boxes one trainer rank sends one receiver, in order, and their total size."""

    sender: int
    receiver: int
    segments: tuple[Segment, ...]
    nbytes: int


def streams_of(plan: Plan) -> dict[tuple[int, int], StreamPlan]:
    """Every (sender, receiver) stream of `plan` that carries bytes, in the plan's order."""
    segments: dict[tuple[int, int], list[Segment]] = {}
    for tensor in plan.tensors:
        size = DTYPE_SIZES[tensor.dtype]
        for transfer in tensor.transfers:
            if not transfer.nbytes:
                continue
            for receiver in transfer.receivers:
                segments.setdefault((transfer.source, receiver), []).append(
                    Segment(tensor.name, transfer.box, transfer.box.numel * size))
    return {key: StreamPlan(key[0], key[1], tuple(items), sum(s.nbytes for s in items))
            for key, items in sorted(segments.items())}


def region(tensor: torch.Tensor, at: Box, box: Box) -> torch.Tensor:
    """The elements `box` of a tensor whose `tensor` holds region `at` (a view)."""
    index = tuple(slice(lo - base, hi - base) for lo, hi, base in zip(box.start, box.stop, at.start, strict=True))
    return tensor[index]


def flat_bytes(view: torch.Tensor) -> torch.Tensor:
    """A contiguous view's bytes (uint8, flat; a 0-d tensor's too)."""
    return view.reshape(-1).view(torch.uint8)


@dataclass
class _Cursor:
    """Where a stream's chunking stands: its segment, the byte within it, its region's bytes."""

    index: int = 0
    offset: int = 0
    data: torch.Tensor | None = None  # the current segment's bytes (a view, or a staged copy)


@dataclass
class Stream:
    """One stream at one party: its chunks, posted `window` at a time, each folded into `digest`."""

    plan: StreamPlan
    peer: int  # the other party's rank
    buffers: list[torch.Tensor]
    post: Callable[[torch.Tensor], Polled]  # start moving one filled (or to-be-filled) buffer
    fill: Callable[[torch.Tensor, int], None] | None = None  # sender: pack chunk bytes at a position
    drain: Callable[[torch.Tensor, int], None] | None = None  # receiver: land received bytes
    digest: StreamDigest = field(default_factory=lambda: StreamDigest("cpu"))
    next_chunk: int = 0
    pending: deque[tuple[int, Polled]] = field(default_factory=deque)
    moved: int = 0

    @property
    def chunk_bytes(self) -> int:
        return self.buffers[0].numel()

    @property
    def chunks(self) -> int:
        return -(-self.plan.nbytes // self.chunk_bytes)

    def _span(self, number: int) -> tuple[int, torch.Tensor]:
        position = number * self.chunk_bytes
        size = min(self.chunk_bytes, self.plan.nbytes - position)
        return position, self.buffers[number % len(self.buffers)][:size]

    def start_next(self) -> None:
        position, buffer = self._span(self.next_chunk)
        if self.fill is not None:
            self.fill(buffer, position)
            self.digest.update(buffer, position)
        self.pending.append((self.next_chunk, self.post(buffer)))
        self.next_chunk += 1

    def finish_oldest(self) -> None:
        number, work = self.pending.popleft()
        work.wait()
        position, buffer = self._span(number)
        if self.drain is not None:
            self.digest.update(buffer, position)
            self.drain(buffer, position)
        self.moved += buffer.numel()

    def run(self) -> None:
        """Move the whole stream: the window posted, the oldest waited for, until the end."""
        while self.next_chunk < self.chunks or self.pending:
            while len(self.pending) < len(self.buffers) and self.next_chunk < self.chunks:
                self.start_next()
            self.finish_oldest()


class Packer:
    """Sender: a stream's bytes, packed chunk by chunk from the local shards (views where the
    box is contiguous in the shard, else one copy of that box)."""

    def __init__(self, segments: Sequence[Segment], region_of: Callable[[Segment], torch.Tensor]):
        self._segments = segments
        self._region_of = region_of
        self._cursor = _Cursor()

    def __call__(self, buffer: torch.Tensor, position: int) -> None:
        del position  # chunks are packed in order
        written = 0
        cursor = self._cursor
        while written < buffer.numel():
            segment = self._segments[cursor.index]
            if cursor.data is None:
                cursor.data = flat_bytes(self._region_of(segment).contiguous())
            take = min(buffer.numel() - written, segment.nbytes - cursor.offset)
            buffer[written:written + take].copy_(cursor.data[cursor.offset:cursor.offset + take])
            written += take
            cursor.offset += take
            if cursor.offset == segment.nbytes:
                self._cursor = cursor = _Cursor(cursor.index + 1)


class Unpacker:
    """Receiver: a stream's bytes landed chunk by chunk into the target tensors (straight into
    the box where it is contiguous there, else into a copy of the box put in place once whole)."""

    def __init__(self, segments: Sequence[Segment], target_of: Callable[[Segment], torch.Tensor]):
        self._segments = segments
        self._target_of = target_of
        self._cursor = _Cursor()
        self._target: torch.Tensor | None = None

    def __call__(self, buffer: torch.Tensor, position: int) -> None:
        del position
        read = 0
        cursor = self._cursor
        while read < buffer.numel():
            segment = self._segments[cursor.index]
            if cursor.data is None:
                self._target = self._target_of(segment)
                cursor.data = flat_bytes(self._target) if self._target.is_contiguous() else \
                    torch.empty(segment.nbytes, dtype=torch.uint8)
            take = min(buffer.numel() - read, segment.nbytes - cursor.offset)
            cursor.data[cursor.offset:cursor.offset + take].copy_(buffer[read:read + take])
            read += take
            cursor.offset += take
            if cursor.offset == segment.nbytes:
                assert self._target is not None
                if not self._target.is_contiguous():
                    self._target.copy_(cursor.data.view(self._target.dtype).view(self._target.shape))
                self._cursor = cursor = _Cursor(cursor.index + 1)


def drive(streams: Sequence[Stream], describe: Callable[[int], str], abort: Callable[[str], None]) -> None:
    """Move every stream to its end, each on a thread. Raises TransferError naming the peer of
    the first stream that failed; `abort` (given that failure) ends the others' waits at once."""
    if not streams:
        return
    with ThreadPoolExecutor(max_workers=len(streams), thread_name_prefix="weightsync-stream") as pool:
        futures = {pool.submit(stream.run): stream for stream in streams}
        first: tuple[Stream, BaseException] | None = None
        for future in as_completed(futures):
            error = future.exception()
            if error is not None and first is None:
                first = (futures[future], error)
                abort(_failed(describe(futures[future].peer), error))
    if first is not None:
        stream, error = first
        raise TransferError(_failed(describe(stream.peer), error)) from error


def _failed(peer: str, error: BaseException) -> str:
    return f"the stream with {peer} failed: {error}"


def moved_by(streams: Sequence[Stream]) -> Mapping[int, int]:
    """Bytes moved per peer."""
    return {stream.peer: stream.moved for stream in streams}
