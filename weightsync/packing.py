"""Copying tensor bytes into bounded uint8 buffers and back out, following a Layout."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightsync.layout import Chunk


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's bytes (contiguous copy only if it is not already)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def pack_chunk(chunk: Chunk, sources: Sequence[torch.Tensor], buffer: torch.Tensor) -> torch.Tensor:
    """Fill `buffer` with the chunk's bytes from `sources` (flat uint8 views); return the used part."""
    for seg in chunk.segments:
        buffer[seg.chunk_offset : seg.chunk_offset + seg.nbytes].copy_(
            sources[seg.index][seg.start : seg.stop], non_blocking=True
        )
    return buffer[: chunk.nbytes]


def unpack_chunk(chunk: Chunk, buffer: torch.Tensor, destinations: Sequence[torch.Tensor]) -> None:
    """Scatter a received chunk's bytes into `destinations` (flat uint8 views)."""
    for seg in chunk.segments:
        destinations[seg.index][seg.start : seg.stop].copy_(
            buffer[seg.chunk_offset : seg.chunk_offset + seg.nbytes], non_blocking=True
        )
