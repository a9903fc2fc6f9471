"""Memory and layouts one party reuses from round to round: its staging buffers and the
chunking of a stream."""

from __future__ import annotations

from typing import Any

import torch

from weightsync.layout import Chunk, Layout
from weightsync.protocol import RoundHeader
from weightsync.transports.collective.group import Party


class StagingBuffers:
    """The party's reusable uint8 staging buffers of the packed size, allocated once per group as
    consecutive slices of one area: the trainer packs into them, a receiver unpacks from them,
    and a loader round stages across the whole area (see `weightsync.landing`). One object owns
    the allocation so that the sender or receiver and its data path share it, never copy it."""

    def __init__(self, party: Party):
        self._party = party
        self.buffers: list[torch.Tensor] = []
        self.flat: torch.Tensor | None = None  # the one allocation `buffers` are slices of

    def get(self, count: int) -> list[torch.Tensor]:
        """`count` buffers of the packed size (init.packed_buffer_size_bytes)."""
        size = self._party.init.packed_buffer_size_bytes
        if self.buffers and (self.buffers[0].numel() != size or len(self.buffers) < count):
            self.buffers = []
            self.flat = None  # free it before allocating anew
        if not self.buffers:
            self.flat = torch.empty(count * size, dtype=torch.uint8, device=self._party.device)
            self.buffers = [self.flat[k * size : (k + 1) * size] for k in range(count)]
        return self.buffers[:count]

    def area(self, count: int) -> torch.Tensor:
        """The `count` staging buffers as one flat area."""
        self.get(count)
        assert self.flat is not None  # get() allocated it
        return self.flat[: count * self._party.init.packed_buffer_size_bytes]

    def clear(self) -> None:
        self.buffers.clear()
        self.flat = None


class Chunking:
    """Where each chunk of a stream ends, cached per stream shape: both ends cut the same stream
    the same way (options.ramp decides the ramp; agreed at init)."""

    def __init__(self, party: Party):
        self._party = party
        self._layouts: dict[tuple[Any, ...], tuple[Layout, list[Chunk]]] = {}

    def of(self, sizes: tuple[int, ...], header: RoundHeader) -> tuple[Layout, list[Chunk]]:
        options = self._party.options
        assert options is not None  # the transport's, set at init
        ramp = options.ramp
        key = (sizes, header.alignment, header.buffer_size_bytes, ramp)
        if key not in self._layouts:
            if len(self._layouts) > 8:
                self._layouts.clear()
            layout = Layout.of_sizes(list(sizes), header.alignment)
            self._layouts[key] = (layout, layout.chunks(header.buffer_size_bytes, ramp=ramp))
        return self._layouts[key]
