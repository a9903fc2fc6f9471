"""Copying tensor bytes into bounded uint8 buffers and back out, following a Layout.

`RegionPlan` is the workhorse: a fixed list of byte regions (source, optional destination,
position in the round's stream) that is copied and/or folded into the stream checksum in one
pass. It is built once per manifest and reused every round; on a GPU it is one batched kernel
launch (`weightsync.kernels`), elsewhere plain torch copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

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


class _Row(NamedTuple):
    """One region as the kernel's block table reads it (`kernels.block_table`): the addresses of
    its source and destination (0: none), its whole 8-byte words, and its stream position in words."""

    src: int
    dst: int
    words: int
    word_position: int


def _kernel_fits(region: Region, device: torch.device) -> bool:
    """Whether the batched kernel can take `region`: it reads and writes whole 8-byte words, so
    every address and the stream position must be 8-byte aligned, all on the plan's device."""
    src, dst = region.src, region.dst
    return (src.data_ptr() % 8 == 0 and region.position % 8 == 0
            and (dst is None or (dst.data_ptr() % 8 == 0 and dst.device == src.device))
            and src.device == device)


def _split_by_path(regions: Sequence[Region], device: torch.device, copy: bool) -> tuple[list[Region], list[Region]]:
    """The regions the kernel takes and those copied the plain way (a checksum-only plan drops
    each destination). Checked here, once per plan, so `run` never meets a mismatched copy."""
    kernel = triton_usable(device)
    usable: list[Region] = []
    slow: list[Region] = []
    for region in regions:
        dst = region.dst if copy else None
        if copy and (dst is None or dst.numel() != region.src.numel()):
            raise ValueError("a copied region needs a destination of the same size")
        placed = Region(region.src, dst, region.position)
        (usable if kernel and _kernel_fits(placed, device) else slow).append(placed)
    return usable, slow


def _kernel_rows(usable: Sequence[Region], aligned: bool) -> tuple[list[tuple[int, int, int, int]], list[Region]]:
    """The kernel's rows for `usable` regions, and the tails it leaves to the plain way: a
    partial last word, or with `aligned` (16-byte accesses) an odd last word."""
    rows: list[tuple[int, int, int, int]] = []
    tails: list[Region] = []
    for region in usable:
        src, dst = region.src, region.dst
        words = src.numel() // 8
        if aligned:
            words -= words % 2  # even word counts too; an odd last word goes the plain way
        rows.append(_Row(src.data_ptr(), dst.data_ptr() if dst is not None else 0, words, region.position // 8))
        cut = words * 8
        if cut != src.numel():
            tails.append(Region(src[cut:], dst[cut:] if dst is not None else None, region.position + cut))
    return rows, tails


class RegionPlan:
    """Copy and/or checksum a fixed list of regions in as few launches as possible."""

    def __init__(self, regions: Sequence[Region], copy: bool = True, digest: bool = True):
        self.copy, self.digest = copy, digest
        self.regions = tuple(regions)  # keeps every region's memory alive while the plan lives
        self.nbytes = sum(r.src.numel() for r in self.regions)
        device = self.regions[0].src.device if self.regions else torch.device("cpu")
        usable, self._slow = _split_by_path(self.regions, device, copy)
        # 16-byte accesses when every region starts 16-byte aligned (the usual case: allocations are).
        self._aligned = all(r.src.data_ptr() % 16 == 0 and (r.dst is None or r.dst.data_ptr() % 16 == 0)
                            for r in usable)
        rows, tails = _kernel_rows(usable, self._aligned)
        self._slow.extend(tails)
        self._table = block_table(rows, device, self._aligned) if rows else None

    def run(self, digest: StreamDigest | None = None, programs: int | None = None) -> None:
        """Enqueue the copies (and the checksum) on the current stream; `programs` caps how many
        GPU programs do it at once (see `kernels.run_blocks`)."""
        target = digest if self.digest else None
        if self._table is not None:
            sums = run_blocks(self._table, self.copy, target is not None, self._aligned, programs)
            if target is not None and sums is not None:
                target.add(sums)
        for region in self._slow:
            if self.copy:
                assert region.dst is not None, "a copying plan's regions have destinations"
                region.dst.copy_(region.src, non_blocking=True)
            if target is not None:
                target.add(region_sums(region.src, region.position))


def pack_regions(chunk: Chunk, sources: Sequence[torch.Tensor] | Mapping[int, torch.Tensor], buffer: torch.Tensor
                 ) -> list[Region]:
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

