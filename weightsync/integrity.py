"""A cheap, position-sensitive checksum of the bytes a round moves, computed where they live.

The round's stream places every tensor at an aligned byte offset (see `layout.py`). The checksum
is two 64-bit sums over the stream's 8-byte words (little-endian; a tensor's last partial word is
padded with zeros; the padding between tensors is not part of it): the plain sum and a sum
weighted by each word's position, (position mod 65521) + 1. Any single changed byte changes the
first; words moved to another position change the second.

Because it is a sum, parts can be folded in any order, from any stream, chunk by chunk or tensor
by tensor: the trainer folds in what it packs, a receiver what it landed, and both arrive at the
same value. On a GPU the work is one batched kernel fused with the copy that moves the bytes
anyway (`weightsync.kernels`), so verifying costs no extra pass and no host synchronisation
until the value is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightsync.kernels import WEIGHT_PERIOD

SLICE_WORDS = 1 << 21  # 16 MiB of int64 per reduction step of the torch fallback
DIGEST_BYTES = 16  # the two sums, as they travel between parties
_MASK = 2**64 - 1


class StreamDigest:
    """Accumulates the checksum of a byte stream, part by part (any order), on `device`."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._acc = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._next = 0  # where an update without a position continues the stream

    def add(self, sums: torch.Tensor) -> None:
        """Fold in an int64 [2] (sum, weighted sum) computed elsewhere (e.g. by the batched kernel)."""
        self._acc += sums

    def update(self, data: torch.Tensor, position: int | None = None) -> None:
        """Fold in a flat uint8 tensor that sits at byte `position` of the stream (a multiple of
        8); without a position it continues right after the previous update."""
        position = self._next if position is None else position
        if position % 8:
            raise ValueError(f"stream position {position} is not a multiple of 8")
        self._acc += region_sums(data, position)
        self._next = position + data.numel()

    @property
    def sums(self) -> torch.Tensor:
        """The int64 [2] accumulator (sum, weighted sum), on the device."""
        return self._acc

    def as_bytes(self) -> torch.Tensor:
        """The 16 bytes of the two sums, on the device, without a host synchronisation."""
        return self._acc.view(torch.uint8)

    def hexdigest(self) -> str:
        return format_digest(self._acc.cpu())


def format_digest(value: torch.Tensor | bytes) -> str:
    """Hex form of the two sums, from their int64 [2] tensor or their 16 raw bytes."""
    if isinstance(value, torch.Tensor):
        value = bytes(value.reshape(-1).view(torch.uint8).cpu().tolist())
    total = int.from_bytes(value[:8], "little")
    weighted = int.from_bytes(value[8:16], "little")
    return f"{total & _MASK:016x}{weighted & _MASK:016x}"


def region_sums(data: torch.Tensor, position: int) -> torch.Tensor:
    """(sum, weighted sum) of one flat uint8 region at byte `position`, with plain torch
    operations: the reference the batched kernel must match, and the CPU path."""
    device = data.device
    out = torch.zeros(2, dtype=torch.int64, device=device)
    usable = data.numel() - data.numel() % 8
    if data.data_ptr() % 8:
        data = data.clone()  # a fresh allocation is aligned; views as int64 need that
    first_word = position // 8
    if usable:
        words = data[:usable].view(torch.int64)
        for start in range(0, words.numel(), SLICE_WORDS):
            part = words[start : start + SLICE_WORDS]
            first = first_word + start
            weights = torch.arange(first, first + part.numel(), dtype=torch.int64, device=device)
            weights.remainder_(WEIGHT_PERIOD).add_(1)
            out[0] += part.sum()
            out[1] += (part * weights).sum()
    if usable != data.numel():
        tail = torch.zeros(8, dtype=torch.uint8, device=device)
        tail[: data.numel() - usable] = data[usable:]
        word = tail.view(torch.int64)[0]
        out[0] += word
        out[1] += word * ((first_word + usable // 8) % WEIGHT_PERIOD + 1)
    return out


# -- a sampled checksum ----------------------------------------------------------------------
SAMPLE_WINDOW = 64 << 10  # bytes per sampled window
SAMPLE_STRIDE = 4 << 20  # one window at the start of every stride of the stream


def sample_ranges(sizes: Sequence[int], offsets: Sequence[int]) -> list[tuple[int, int, int]]:
    """The (tensor index, start, stop) byte ranges a sampled checksum covers, for a stream of
    tensors of `sizes` at `offsets`: each tensor's first and last window, and the window at the
    start of every SAMPLE_STRIDE of the stream (about 1/64 of a large stream in all).

    Both ends derive the same ranges from the same layout. What the sample catches is whatever
    moves every tensor or every stride: bytes read from the wrong memory, a tensor rewritten
    while it was read, a stale mapping."""
    out: list[tuple[int, int, int]] = []
    for index, (size, offset) in enumerate(zip(sizes, offsets, strict=True)):
        if size <= 2 * SAMPLE_WINDOW:
            if size:
                out.append((index, 0, size))
            continue
        windows = [(0, SAMPLE_WINDOW)]
        first = -(-offset // SAMPLE_STRIDE) * SAMPLE_STRIDE  # the first stride start inside the tensor
        for position in range(first, offset + size, SAMPLE_STRIDE):
            windows.append((position - offset, min(position - offset + SAMPLE_WINDOW, size)))
        windows.append((size - SAMPLE_WINDOW - (size - SAMPLE_WINDOW) % 8, size))  # 8-byte aligned start
        merged: list[tuple[int, int]] = []
        for start, stop in sorted(windows):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
            else:
                merged.append((start, stop))
        out += [(index, start, stop) for start, stop in merged]
    return out
