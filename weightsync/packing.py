"""Copying tensor bytes into bounded uint8 buffers and back out, following a Layout.

`RegionPlan` is the workhorse: a fixed list of byte regions (source, optional destination,
position in the round's stream) that is copied and/or folded into the stream checksum in one
pass. It is built once per manifest and reused every round; on a GPU it is one batched kernel
launch (`weightsync.kernels`), elsewhere plain torch copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from weightsync.integrity import StreamDigest, region_sums, sample_ranges
from weightsync.kernels import block_table, run_blocks, triton_usable
from weightsync.layout import Chunk


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's bytes (contiguous copy only if it is not already)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


@dataclass(frozen=True)
class Region:
    """`src` bytes (flat uint8) at byte `position` of the stream, copied to `dst` if given."""

    src: torch.Tensor
    dst: torch.Tensor | None
    position: int


class RegionPlan:
    """Copy and/or checksum a fixed list of regions in as few launches as possible."""

    def __init__(self, regions: Sequence[Region], copy: bool = True, digest: bool = True):
        self.copy, self.digest = copy, digest
        self.regions = tuple(regions)  # keeps every region's memory alive while the plan lives
        self.nbytes = sum(r.src.numel() for r in self.regions)
        device = self.regions[0].src.device if self.regions else torch.device("cpu")
        kernel = triton_usable(device)
        usable: list[Region] = []
        self._slow: list[Region] = []
        for region in self.regions:
            src, dst = region.src, region.dst if copy else None
            if copy and (dst is None or dst.numel() != src.numel()):
                raise ValueError("a copied region needs a destination of the same size")
            aligned = (src.data_ptr() % 8 == 0 and region.position % 8 == 0
                       and (dst is None or (dst.data_ptr() % 8 == 0 and dst.device == src.device)))
            if kernel and aligned and src.device == device:
                usable.append(Region(src, dst, region.position))
            else:
                self._slow.append(Region(src, dst, region.position))
        # 16-byte accesses when every region starts 16-byte aligned (the usual case: allocations are).
        self._aligned = all(r.src.data_ptr() % 16 == 0 and (r.dst is None or r.dst.data_ptr() % 16 == 0)
                            for r in usable)
        fast: list[tuple[int, int, int, int]] = []
        for region in usable:
            src, dst = region.src, region.dst
            words = src.numel() // 8
            if self._aligned:
                words -= words % 2  # even word counts too; an odd last word goes the plain way
            fast.append((src.data_ptr(), dst.data_ptr() if dst is not None else 0, words, region.position // 8))
            if words * 8 != src.numel():  # the rest (a partial or odd last word) goes the plain way
                cut = words * 8
                self._slow.append(Region(src[cut:], dst[cut:] if dst is not None else None, region.position + cut))
        self._table = block_table(fast, device, self._aligned) if fast else None

    def run(self, digest: StreamDigest | None = None, programs: int | None = None) -> None:
        """Enqueue the copies (and the checksum) on the current stream; `programs` caps how many
        GPU programs do it at once (see `kernels.run_blocks`)."""
        want = self.digest and digest is not None
        if self._table is not None:
            sums = run_blocks(self._table, self.copy, want, self._aligned, programs)
            if want:
                digest.add(sums)
        for region in self._slow:
            if self.copy:
                region.dst.copy_(region.src, non_blocking=True)
            if want:
                digest.add(region_sums(region.src, region.position))


def pack_regions(chunk: Chunk, sources: Sequence[torch.Tensor], buffer: torch.Tensor) -> list[Region]:
    """The regions that fill `buffer` with the chunk's bytes from `sources` (flat uint8 views)."""
    return [Region(sources[s.index][s.start : s.stop], buffer[s.chunk_offset : s.chunk_offset + s.nbytes],
                   chunk.start + s.chunk_offset) for s in chunk.segments]


def unpack_regions(chunk: Chunk, buffer: torch.Tensor, destinations: Sequence[torch.Tensor]) -> list[Region]:
    """The regions that scatter a received chunk (in `buffer`) into `destinations`."""
    return [Region(buffer[s.chunk_offset : s.chunk_offset + s.nbytes], destinations[s.index][s.start : s.stop],
                   chunk.start + s.chunk_offset) for s in chunk.segments]


def landed_regions(chunk: Chunk, target: torch.Tensor) -> list[Region]:
    """The regions of a chunk received in place into a flat `target` laid out as the stream
    (checksum only: the bytes are already where they belong; padding is left out)."""
    return [Region(target[chunk.start + s.chunk_offset : chunk.start + s.chunk_offset + s.nbytes], None,
                   chunk.start + s.chunk_offset) for s in chunk.segments]


def sampled_regions(flats: Sequence[torch.Tensor], offsets: Sequence[int]) -> list[Region]:
    """The regions of the stream's tensors (flat uint8, at `offsets`) that a sampled checksum
    covers (`integrity.sample_ranges`); checksum only."""
    return [Region(flats[i][start:stop], None, offsets[i] + start)
            for i, start, stop in sample_ranges([t.numel() for t in flats], offsets)]

