"""The trainer side of a lent round: what it lends, how it stages what it cannot lend, batches."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.errors import ProtocolError, TransferError
from weightsync.layout import DEFAULT_ALIGNMENT, Layout, align_up
from weightsync.packing import RegionPlan, as_bytes
from weightsync.protocol import InitInfo, TensorSpec, UpdateKind
from weightsync.transports.base import RoundStats, SparsePatch
from weightsync.transports.lending.checksums import Coverage, DigestPublisher
from weightsync.transports.lending.header import HandleExporter, RoundFlags


@dataclass(frozen=True)
class StreamItem:
    """One entry of the manifest and the tensors of the stream it stands for (a dense tensor:
    itself; a sparse patch: its indices, then its values)."""

    name: str
    shaped: torch.Tensor  # what the manifest describes (dtype, shape)
    tensors: list[torch.Tensor]


class BatchCursor:
    """A round in progress on the trainer: what is left to send, batch by batch."""

    def __init__(self, kind: UpdateKind, items: Iterator[StreamItem], repeat_key: tuple[Any, ...] | None = None):
        self.kind = kind
        self.items = items
        self.pending: StreamItem | None = None  # an item that did not fit the last batch
        self.round_id = uuid.uuid4().hex[:24]
        self.batch = 0
        self.repeat_key = repeat_key  # set for dense rounds: what a repeat of this round looks like
        self.all_lent = True  # nothing needed staging

    def next(self) -> StreamItem | None:
        if self.pending is not None:
            item, self.pending = self.pending, None
            return item
        return next(self.items, None)


@dataclass
class RepeatLending:
    """A trainer round that can be repeated as is: same tensors, same storages, same handles."""

    key: tuple[Any, ...]
    views: list[torch.Tensor]
    specs: list[TensorSpec]
    body: dict[str, Any]  # its update_info, but for the round's flags
    nbytes: int
    digest: RegionPlan | None = None
    coverage: Coverage | None = None  # what `digest` covers


class StagingArea:
    """The trainer's only extra memory: what cannot be lent as it is (a non-contiguous view, a
    tensor on another device) is copied here, at most packed_num_buffers x
    packed_buffer_size_bytes, allocated once and reused batch after batch."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._buffer: torch.Tensor | None = None

    def buffer(self, size: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() != size:
            self._buffer = torch.empty(size, dtype=torch.uint8, device=self._device)
        return self._buffer

    def release(self) -> None:
        self._buffer = None


class IpcSender:
    """Trainer side of an ipc or p2p group: lend the round's tensors to the receivers.

    Contiguous tensors on the trainer's GPU are lent as they are; anything else goes through the
    bounded `StagingArea`, and a round that does not fit continues in batches (`more`). Lent
    views stay alive until the round ends. A dense round of the very same tensors as the last
    one is a `RepeatLending`: same handles, new values, nothing rebuilt. With `init.verify`, the
    `DigestPublisher` checksums (per `coverage`) and publishes what was lent."""

    def __init__(self, init: InitInfo, device: torch.device, coverage: Coverage, publisher: DigestPublisher):
        self.init = init  # read each round (a benchmark swaps it to turn verify off between rounds)
        self.device = device
        self._coverage = coverage  # what the checksum covers when the round is verified
        self._publisher = publisher
        self._header = HandleExporter(device)
        self._staging = StagingArea(device)
        self._lent: list[torch.Tensor] = []
        self._cursor: BatchCursor | None = None
        self._repeat: RepeatLending | None = None

    @property
    def in_round(self) -> bool:
        """Whether a round that continues in further batches is in progress."""
        return self._cursor is not None

    def reset(self) -> None:
        """A round starts or ended: nothing is in progress, nothing lent need stay alive."""
        self._cursor = None
        self._lent = []

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> RoundStats:
        if self._cursor is None:
            named = list(named_tensors)
            key = tuple((name, t.data_ptr(), t.dtype, t.shape, t.is_contiguous()) for name, t in named)
            if self._repeat is not None and self._repeat.key == key:
                return self._send_repeat(self._repeat)
            self._start("dense", (StreamItem(name, t, [t]) for name, t in named), key)
        return self._send_batch()

    def send_sparse(self, patches: Iterable[SparsePatch]) -> RoundStats:
        if self._cursor is None:
            def items() -> Iterator[StreamItem]:
                for p in patches:
                    if p.indices.shape != p.values.shape or p.indices.dim() != 1:
                        raise ProtocolError(f"patches[{p.name}]", "indices and values must be 1-D and equally long")
                    yield StreamItem(p.name, p.values, [p.indices.to(torch.int64), p.values])
            self._start("sparse_flat", items())
        return self._send_batch()

    def _start(self, kind: UpdateKind, items: Iterable[StreamItem], repeat_key: tuple[Any, ...] | None = None
               ) -> None:
        self._lent = []  # the previous round is over: its tensors may go
        self._cursor = BatchCursor(kind, iter(items), repeat_key)

    def _lendable(self, tensor: torch.Tensor) -> bool:
        return tensor.device == self.device and tensor.is_contiguous()

    def _round_coverage(self) -> Coverage | None:
        """What this round's checksum covers; None when the round is not verified."""
        return self._coverage if self.init.verify else None

    def _flags(self, round_id: str, more: bool) -> RoundFlags:
        return RoundFlags(round_id, more, self.init.verify, self._round_coverage() is Coverage.SAMPLE)

    def _digest_plan(self, views: list[torch.Tensor], coverage: Coverage) -> RegionPlan:
        """What the trainer checksums of the lent `views`."""
        return coverage.plan(views, Layout.of_sizes([v.numel() for v in views]).offsets)

    def _send_batch(self) -> RoundStats:
        try:
            return self._next_batch()
        except BaseException:
            self._cursor = None  # a failed round is over; the next send starts afresh
            raise

    def _next_batch(self) -> RoundStats:
        started = time.perf_counter()
        cursor = self._cursor
        if cursor is None:
            raise TransferError("no round in progress on the trainer: nothing to send")
        specs, views = self._fill_batch(cursor)
        more = cursor.pending is not None
        round_id = f"{cursor.round_id}-{cursor.batch}"
        first = cursor.batch == 0
        cursor.batch += 1
        if not more:
            self._cursor = None
        self._lent.extend(views)
        torch.cuda.current_stream(self.device).synchronize()  # lent bytes are final before anyone reads
        info = self._header.update_info(cursor.kind, specs, views, self._flags(round_id, more))
        digest = None
        coverage = self._round_coverage()
        if coverage is not None:
            digest = self._digest_plan(views, coverage)
            self._publisher.publish(round_id, digest)
        nbytes = sum(v.numel() for v in views)
        if cursor.repeat_key is not None and first and not more and cursor.all_lent:  # next: skip all this
            self._repeat = RepeatLending(cursor.repeat_key, views, specs, self._header.body, nbytes, digest,
                                         coverage)
        return RoundStats(round_id, cursor.kind, len(specs), nbytes, 0,
                          time.perf_counter() - started, update_info=info, more=more)

    def _fill_batch(self, cursor: BatchCursor) -> tuple[list[TensorSpec], list[torch.Tensor]]:
        """The next batch's specs and lent views: the cursor's items, each tensor lent as it is
        where it can be (contiguous, on this device), else copied into the staging; a batch
        ends where the next item's copies would overflow packed_num_buffers x
        packed_buffer_size_bytes (the item waits in `cursor.pending`). ProtocolError when a
        single item needs more staging than that."""
        specs: list[TensorSpec] = []
        views: list[torch.Tensor] = []
        fill = 0
        capacity = self.init.packed_num_buffers * self.init.packed_buffer_size_bytes
        while (item := cursor.next()) is not None:
            staged = [t for t in item.tensors if not self._lendable(t)]
            need = sum(align_up(t.numel() * t.element_size(), DEFAULT_ALIGNMENT) for t in staged)
            if staged and fill + need > capacity:
                if specs:  # the rest goes in the next batch
                    cursor.pending = item
                    break
                raise ProtocolError("init_info.packed_buffer_size_bytes",
                                    f"parameter {item.name!r} needs {need} bytes of staging, more than the "
                                    f"{capacity} of packed_num_buffers x packed_buffer_size_bytes")
            for t in item.tensors:
                if self._lendable(t):
                    view = as_bytes(t)
                else:
                    cursor.all_lent = False
                    source = as_bytes(t.to(self.device))
                    view = self._staging.buffer(capacity)[fill : fill + source.numel()]
                    view.copy_(source)
                    fill += align_up(source.numel(), DEFAULT_ALIGNMENT)
                views.append(view)
            specs.append(self._header.spec(item.name, item.shaped))
        return specs, views

    def _send_repeat(self, lending: RepeatLending) -> RoundStats:
        """The same tensors in the same storages as the last round: same handles, new values."""
        started = time.perf_counter()
        round_id = f"{uuid.uuid4().hex[:24]}-0"
        self._lent = list(lending.views)
        torch.cuda.current_stream(self.device).synchronize()
        info = self._header.compose(lending.body, self._flags(round_id, False))
        coverage = self._round_coverage()
        if coverage is not None:
            if lending.digest is None or lending.coverage is not coverage:
                lending.digest, lending.coverage = self._digest_plan(lending.views, coverage), coverage
            self._publisher.publish(round_id, lending.digest)
        return RoundStats(round_id, "dense", len(lending.specs), lending.nbytes, 0,
                          time.perf_counter() - started, update_info=info)

    def close(self) -> None:
        self._publisher.close()
        self._cursor, self._lent, self._repeat = None, [], None
        self._staging.release()
        self._header.close()
