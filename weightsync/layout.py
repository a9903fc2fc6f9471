"""Where each tensor's bytes sit in the flat stream a round sends, and how it is cut into buffers.

A round lays every tensor of the manifest end to end (each start aligned, so a receiver can
view its slice of a contiguous weight store as the right dtype) and cuts that byte stream into
chunks of exactly `buffer_size` bytes. A tensor larger than a buffer simply spans several
chunks, so every buffer stays bounded whatever the model looks like.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from weightsync.protocol import Manifest

DEFAULT_ALIGNMENT = 256


RAMP_STEPS = 2  # a ramped stream starts with chunks of 1/4 and 1/2 of a buffer (each chunk
RAMP_MIN_BYTES = 1 << 20  # costs a collective call; never smaller than this)


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def ramp_sizes(total: int, buffer_size: int) -> list[int]:
    """Chunk sizes for a ramped stream of `total` bytes: growing head, full middle, shrinking tail.

    Sizes stay multiples of 256 (so chunk boundaries keep every tensor's cut 8-byte aligned)
    and never exceed `buffer_size`.
    """
    def step(size: int) -> int:
        return max(size // 256 * 256, 256)

    head = [step(buffer_size >> k) for k in range(RAMP_STEPS, 0, -1)
            if (buffer_size >> k) >= RAMP_MIN_BYTES]
    sizes: list[int] = []
    remaining = total
    for size in head:
        if remaining <= 0:
            return sizes
        sizes.append(min(size, remaining))
        remaining -= sizes[-1]
    while remaining > buffer_size:
        sizes.append(buffer_size)
        remaining -= buffer_size
    floor = max(step(buffer_size >> RAMP_STEPS), RAMP_MIN_BYTES)
    while remaining > 2 * floor:  # the tail halves until it is small
        half = step(remaining // 2)
        sizes.append(half)
        remaining -= half
    if remaining > 0:
        sizes.append(remaining)
    return sizes


@dataclass(frozen=True)
class Segment:
    """Bytes [start, stop) of tensor `index`, which land at `chunk_offset` in their chunk."""

    index: int
    start: int
    stop: int
    chunk_offset: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Chunk:
    """One buffer's worth of the stream: bytes [start, stop) and the tensor pieces inside."""

    number: int
    start: int
    stop: int
    segments: tuple[Segment, ...]

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Layout:
    """Byte offsets of a list of tensor sizes in an aligned flat stream."""

    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    total_bytes: int
    alignment: int

    @classmethod
    def of_sizes(cls, sizes: list[int] | tuple[int, ...], alignment: int = DEFAULT_ALIGNMENT) -> "Layout":
        offsets: list[int] = []
        cursor = 0
        for size in sizes:
            cursor = align_up(cursor, alignment)
            offsets.append(cursor)
            cursor += size
        return cls(tuple(sizes), tuple(offsets), cursor, alignment)

    @classmethod
    def of_manifest(cls, manifest: Manifest, alignment: int = DEFAULT_ALIGNMENT) -> "Layout":
        return cls.of_sizes([t.nbytes for t in manifest.tensors], alignment)

    def chunks(self, buffer_size: int, ramp: bool = False) -> list[Chunk]:
        """Cut the stream into chunks of at most `buffer_size` bytes, skipping trailing space.

        Without `ramp` every chunk but the last is exactly one buffer. With `ramp` (pipelined GPU
        transports) the first chunks grow from a quarter of a buffer and the last ones shrink,
        so the pipeline fills and drains in small steps; no chunk exceeds a buffer either way.
        """
        sizes = ramp_sizes(self.total_bytes, buffer_size) if ramp else None
        chunks: list[Chunk] = []
        start = 0
        while start < self.total_bytes:
            size = sizes[len(chunks)] if sizes is not None else buffer_size
            stop = min(start + size, self.total_bytes)
            chunks.append(Chunk(len(chunks), start, stop, tuple(self._segments(start, stop))))
            start = stop
        return chunks

    def _segments(self, start: int, stop: int) -> Iterator[Segment]:
        # First tensor whose bytes may reach into [start, stop).
        first = max(bisect.bisect_right(self.offsets, start) - 1, 0)
        for index in range(first, len(self.sizes)):
            begin = self.offsets[index]
            if begin >= stop:
                break
            end = begin + self.sizes[index]
            lo, hi = max(begin, start), min(end, stop)
            if lo < hi:
                yield Segment(index, lo - begin, hi - begin, lo - start)
