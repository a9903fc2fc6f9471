"""A cheap, position-sensitive checksum of the bytes a round moves, computed where they live.

Two 64-bit sums over the stream's 8-byte words: the plain sum and a position-weighted sum. Any
single changed byte changes the first; a reordering of words changes the second. Both are plain
tensor reductions, so on a GPU they cost one extra read of the data and no host copy. Work goes in
bounded slices, so the extra memory stays small whatever the chunk size.
"""

from __future__ import annotations

import torch

SLICE_WORDS = 1 << 21  # 16 MiB of int64 per reduction step
_WEIGHT_PERIOD = 65_521  # a prime: weights cycle through 1..65521


class StreamDigest:
    """Accumulates the checksum of a byte stream fed chunk by chunk, in order."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sum = torch.zeros((), dtype=torch.int64, device=device)
        self._weighted = torch.zeros((), dtype=torch.int64, device=device)
        self._position = 0  # words seen so far
        self._tail = b""  # bytes not yet forming a whole word are folded in at the end

    def update(self, data: torch.Tensor) -> None:
        """Fold in a flat uint8 tensor; call with chunks in stream order."""
        usable = data.numel() - data.numel() % 8
        if usable:
            words = data[:usable].view(torch.int64)
            for start in range(0, words.numel(), SLICE_WORDS):
                part = words[start : start + SLICE_WORDS]
                first = self._position + start
                weights = torch.arange(first, first + part.numel(), dtype=torch.int64, device=self.device)
                weights.remainder_(_WEIGHT_PERIOD).add_(1)
                self._sum += part.sum()
                self._weighted += (part * weights).sum()
            self._position += words.numel()
        if usable != data.numel():
            # Only the stream's last chunk can end mid-word (chunks are whole buffers).
            self._tail += bytes(data[usable:].cpu().tolist())

    def hexdigest(self) -> str:
        tail = int.from_bytes(self._tail.ljust(8, b"\0"), "little", signed=True) if self._tail else 0
        total = (int(self._sum.item()) + tail) & (2**64 - 1)
        weighted = int(self._weighted.item()) & (2**64 - 1)
        return f"{total:016x}{weighted:016x}"
