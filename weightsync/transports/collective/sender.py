"""The trainer side of a collective round (see `weightsync.transports.collective`)."""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.dtypes import tensors_manifest, tensor_spec
from weightsync.errors import ManifestMismatch, ProtocolError, SourceMismatch, TransferError
from weightsync.integrity import StreamDigest
from weightsync.layout import DEFAULT_ALIGNMENT, Chunk, Layout
from weightsync.packing import RegionPlan, as_bytes, pack_regions
from weightsync.protocol import Manifest, RoundHeader, UpdateKind
from weightsync.source import WeightSource, checked_items, manifest_of
from weightsync.transports.base import RoundStats, SparsePatch
from weightsync.transports.collective.agreement import Agreement
from weightsync.transports.collective.buffers import Chunking, StagingBuffers
from weightsync.transports.collective.group import Party, Pending
from weightsync.transports.collective.paths import SendPath
from weightsync.transports.collective.round_header import HeaderEncoder
from weightsync.transports.collective.rules import RoundRules
from weightsync.transports.collective.trace import mark, phases


@dataclass(frozen=True)
class _Repeated:
    """The last dense round whose tensors were the caller's own memory: if the next round names
    the same tensors at the same addresses, its manifest and byte views are reused."""

    key: tuple[Any, ...]
    manifest: Manifest
    views: list[torch.Tensor]


@dataclass(frozen=True)
class _Streamed:
    """A round whose payload comes from a source's iteration (`send_source`)."""

    source: WeightSource
    on_iterate: Callable[[], None] | None


@dataclass(frozen=True)
class SourceFailure:
    """Why a source failed its round, naming the parameter, and the error every party raises."""

    message: str
    kind: type[TransferError]


class _SourceTensors:
    """A streamed round's source as its chunks reach it (`CollectiveSender._send_streamed`): each
    tensor is materialized, flat on the trainer's device, once a chunk spans it and `held` until
    its last byte is packed. `failure`: the first reason the source failed the round, naming the
    parameter; from then on zeros stand in for its tensors, so that every chunk still goes out."""

    def __init__(self, manifest: Manifest, streamed: _Streamed,
                 to_device: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
        self._manifest = manifest
        self._to_device = to_device
        self._device = device
        self.failure: SourceFailure | None = None
        if streamed.on_iterate is not None:
            try:
                streamed.on_iterate()
            except Exception as error:  # noqa: BLE001 - e.g. a sharded trainer's rank is gone
                self.failure = SourceFailure(f"the source could not start: {type(error).__name__}: {error}",
                                             TransferError)
        self._iterator = iter(streamed.source)
        self._items = checked_items(manifest, self._iterator)
        self.held: dict[int, torch.Tensor] = {}
        self._ready = 0  # tensors materialized (or replaced by zeros) so far

    def materialize(self, upto: int) -> None:
        """Hold every tensor up to index `upto` (zeros for those the source failed to give)."""
        while self._ready <= upto:
            spec = self._manifest.tensors[self._ready]
            flat = self._next_flat(spec.name) if self.failure is None else None
            if flat is None:
                flat = torch.zeros(spec.nbytes, dtype=torch.uint8, device=self._device)
            self.held[self._ready] = flat
            self._ready += 1

    def _next_flat(self, name: str) -> torch.Tensor | None:
        """The source's next tensor, flat on the device; None once it failed (`failure` says why;
        after a disagreement its iteration is driven to its end)."""
        try:
            return as_bytes(self._to_device(next(self._items)))
        except SourceMismatch as error:
            self.failure = SourceFailure(str(error), SourceMismatch)
            _drain(self._iterator)
        except Exception as error:  # noqa: BLE001 - reported to every party
            self.failure = SourceFailure(f"parameter {name!r}: the source failed to materialize "
                                         f"it: {type(error).__name__}: {error}", TransferError)
        return None

    def finish(self) -> None:
        """After the last chunk: the trailing empty tensors (still checked), then whether the
        iteration yields more than the metadata names."""
        self.materialize(len(self._manifest.tensors) - 1)
        self.held.clear()
        if self.failure is not None:
            return
        try:
            next(self._items, None)  # raises if the iteration yields more than the metadata names
        except SourceMismatch as error:
            self.failure = SourceFailure(str(error), SourceMismatch)
            _drain(self._iterator)
        except Exception as error:  # noqa: BLE001
            self.failure = SourceFailure(f"the source failed after its last parameter: "
                                         f"{type(error).__name__}: {error}", TransferError)


class CollectiveSender:
    """The trainer (rank 0) of a collective group: sends each round's header, takes part in the
    agreements, and hands the payload to its `SendPath` once every receiver agreed.

    It owns the trainer's state only (manifest and byte-view caches, the header encoder); the
    receivers' state lives in `CollectiveReceiver`, so neither can touch the other's."""

    def __init__(self, party: Party, rules: RoundRules[Any], path: SendPath, staging: StagingBuffers):
        self._party = party
        self._rules = rules
        self.path = path
        self.staging = staging
        self.agreement = Agreement(party)
        self.headers = HeaderEncoder(party, self.agreement)
        self._chunking = Chunking(party)
        self._manifests: dict[tuple[Any, ...], Manifest] = {}  # manifest per (name, dtype, shape) key
        self._repeat: _Repeated | None = None
        self.timings: dict[str, float] = {}  # seconds per phase of the last round

    def _manifest_of(self, named: list[tuple[str, torch.Tensor]]) -> Manifest:
        key = tuple((name, t.dtype, tuple(t.shape)) for name, t in named)
        manifest = self._manifests.get(key)
        if manifest is None:
            if len(self._manifests) > 8:
                self._manifests.clear()
            manifest = self._manifests[key] = tensors_manifest(named)
        return manifest

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> RoundStats:
        named = list(named_tensors)
        # One pass over the tensors says whether this round repeats the last one (an optimizer
        # updates parameters in place): then its manifest and byte views are reused as they are.
        # Building them anew costs about a millisecond for hundreds of tensors, before the header.
        key = tuple((name, t.data_ptr(), t.dtype, t.shape, t.is_contiguous(), t.device) for name, t in named)
        repeat = self._repeat
        if repeat is not None and repeat.key == key:
            return self._send_round(repeat.manifest, repeat.views, "dense", True, views_cached=True)
        views, lendable = self._byte_views([t for _, t in named])
        manifest = self._manifest_of(named)
        # views of copies are not worth keeping
        self._repeat = _Repeated(key, manifest, views) if lendable else None
        return self._send_round(manifest, views, "dense", lendable, views_cached=lendable)

    def send_source(self, source: WeightSource, on_iterate: Callable[[], None] | None = None) -> RoundStats:
        """Stream a source: the header and manifest from its metadata, the payload from its
        iteration, one tensor materialized at a time (see `_send_streamed`); `on_iterate` is
        called once the receivers agreed, right before the iteration starts."""
        manifest = manifest_of(source)
        key = ("source", manifest.tensors)  # the same manifest object while the metadata holds,
        manifest = self._manifests.setdefault(key, manifest)  # so its header is sent by name
        if len(self._manifests) > 8:
            self._manifests.clear()
        return self._send_round(manifest, [], "dense", False, streamed=_Streamed(source, on_iterate))

    def send_sparse(self, patches: Iterable[SparsePatch]) -> RoundStats:
        patches = list(patches)
        specs, sources = [], []
        for p in patches:
            if p.indices.shape != p.values.shape or p.indices.dim() != 1:
                raise ProtocolError(f"patches[{p.name}]", "indices and values must be 1-D and equally long")
            # In a sparse manifest each entry's shape is the patch length [nnz]; dtype is the parameter's.
            specs.append(tensor_spec(p.name, p.values))
            sources += [p.indices.to(torch.int64), p.values]
        views, lendable = self._byte_views(sources)
        return self._send_round(Manifest(tensors=tuple(specs)), views, "sparse_flat", lendable)

    def refuse(self, reason: str) -> None:
        """Take the round's place only to refuse it (the trainer refused its own input, e.g. a
        body or a source that fails validation): send a header with no tensors, so that every
        receiver waiting in this round takes part in its first agreement, and post `reason`
        there. Every party raises ManifestMismatch naming it; the group stays in step."""
        self._party.group.check_usable()
        header = self._header(Manifest(tensors=()), "dense", lendable=False, streamed=True)
        entry = self.headers.send(header, [])
        ticket = self.agreement.post(reason, gpu_done=False, with_entry=entry)
        objections = self.agreement.collect(ticket).objections()
        self.headers.refused()
        raise ManifestMismatch("; ".join(objections) or reason)

    def _header(self, manifest: Manifest, kind: UpdateKind, lendable: bool, streamed: bool) -> RoundHeader:
        init = self._party.init
        return self._rules.header_model(
            round_id=uuid.uuid4().hex,
            update_kind=kind,
            manifest=manifest,
            buffer_size_bytes=init.packed_buffer_size_bytes,
            num_buffers=init.packed_num_buffers,
            alignment=DEFAULT_ALIGNMENT,
            verify=init.verify,
            **self._rules.header_fields(lendable, streamed),
        )

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self._party.device, non_blocking=True)

    def _byte_views(self, sources: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
        """Flat uint8 views of the stream's tensors on this device, and whether they are the
        caller's own memory (every tensor contiguous here) rather than copies."""
        lendable = all(t.is_contiguous() and t.device == self._party.device for t in sources)
        return [as_bytes(self._to_device(t)) for t in sources], lendable

    def _send_round(self, manifest: Manifest, flat_sources: list[torch.Tensor], kind: UpdateKind,
                    lendable: bool, streamed: _Streamed | None = None, views_cached: bool = False) -> RoundStats:
        """`flat_sources`: uint8 views of the stream's tensors on this device; `lendable`: they
        are the caller's own contiguous tensors (not copies), so they may move directly;
        `views_cached`: they are the cached views of a repeated round. `streamed` instead: sizes
        from the manifest, payload from the source's iteration (packed, nothing moves ahead of
        the agreement)."""
        party, group = self._party, self._party.group
        started = time.perf_counter()
        mark("send: start")
        group.check_usable()
        header = self._header(manifest, kind, lendable, streamed is not None)
        sizes = tuple(s.numel() for s in flat_sources) if streamed is None else \
            tuple(spec.nbytes for spec in manifest.tensors)
        layout, chunks = self._chunking.of(sizes, header)
        entry = self.headers.send(header, self._rules.lead_pieces(chunks, header))
        ticket = self.agreement.post(None, gpu_done=False, with_entry=entry)
        # Everything that needs no receiver happens while they check the header.
        marks = [("header+prepare", time.perf_counter())]
        digest = StreamDigest(party.device) if header.verify else None
        if streamed is None:  # e.g. pack, send the lead chunk
            self.path.prepare(chunks, flat_sources, header, digest, views_cached)
        mark("send: prepared")
        objections = self.agreement.collect(ticket).objections()
        marks.append(("header+agree", time.perf_counter()))
        if objections:
            self.headers.refused()  # the next header goes out whole
            self.path.abandon()
            raise ManifestMismatch("; ".join(objections))
        self.headers.agreed()
        failure = None
        if streamed is None:
            self.path.send_payload(chunks, flat_sources, header, digest)
        else:
            failure = self._send_streamed(chunks, layout, manifest, streamed, header, digest)
        mark("send: payload enqueued")
        self.agreement.forget_old_steps()
        marks.append(("enqueue", time.perf_counter()))
        # a source's failure fails the round everywhere
        outcome = self.agreement.exchange(failure.message if failure is not None else None, digest)
        marks.append(("payload+agree", time.perf_counter()))
        if failure is not None:
            raise failure.kind(f"round not applied: {failure.message}")
        self.timings = phases(started, marks)
        failures = outcome.objections() + outcome.checksum_failures()
        if failures:
            raise TransferError("receivers did not apply the round: " + "; ".join(failures))
        return RoundStats(header.round_id, kind, len(manifest.tensors), layout.total_bytes,
                          len(chunks), time.perf_counter() - started, checksum=outcome.digests[0],
                          direct=self._rules.is_direct(header))

    def _send_streamed(self, chunks: Sequence[Chunk], layout: Layout, manifest: Manifest,
                       streamed: _Streamed, header: RoundHeader,
                       digest: StreamDigest | None) -> SourceFailure | None:
        """Pack and broadcast each chunk, `num_buffers` in flight, materializing the source's
        tensors as the chunks reach them and dropping each once its last byte is packed: the
        trainer holds the buffers plus the tensor(s) the current chunk spans.

        Returns why the source failed the round (its iteration disagreed with its metadata:
        SourceMismatch; or it raised: TransferError), naming the parameter; None if it did not.
        Either way every chunk is sent (what the source could not give goes as zeros), so that
        the receivers complete the round and learn the reason in the final agreement instead of
        waiting on a broadcast that never comes (a receiver that lands in place then holds a
        touched round, and says so; with `atomic` it holds none of it). After a disagreement the
        iteration is still driven to its end, discarding what it yields: on a sharded trainer
        every rank materializes each tensor together."""
        source = _SourceTensors(manifest, streamed, self._to_device, self._party.device)
        num_buffers = header.num_buffers
        buffers = self.staging.get(num_buffers)
        in_flight: deque[Pending] = deque()
        for chunk in chunks:
            if len(in_flight) == num_buffers:
                in_flight.popleft().wait()
            in_flight.append(self._pack_and_send(chunk, buffers[chunk.number % num_buffers], source, layout, digest))
        source.finish()
        while in_flight:
            in_flight.popleft().wait()
        return source.failure

    def _pack_and_send(self, chunk: Chunk, buffer: torch.Tensor, source: _SourceTensors, layout: Layout,
                       digest: StreamDigest | None) -> Pending:
        """Pack one chunk of a streamed round into `buffer` (materializing the tensors it reaches)
        and start its broadcast; the tensors whose last byte it packed are dropped."""
        if chunk.segments:
            source.materialize(chunk.segments[-1].index)
        held = source.held
        RegionPlan(pack_regions(chunk, held, buffer), copy=True, digest=digest is not None).run(digest)
        for s in chunk.segments:
            if s.stop == layout.sizes[s.index]:
                held.pop(s.index, None)  # its last byte is packed (same-stream order on a GPU)
        pending = self._party.group.broadcast(buffer[: chunk.nbytes])
        for index in [i for i in held if layout.sizes[i] == 0]:
            del held[index]
        return pending

    def close(self) -> None:
        """Release the trainer's memory (after the group was closed)."""
        self.path.close()
        self.staging.clear()


def _drain(iterator: Iterator[Any]) -> None:
    """Drive a source's iteration to its end, dropping what it yields (keeps a sharded trainer's
    ranks in step after rank 0 found a disagreement); a failure of its own ends it quietly (the
    round fails anyway)."""
    try:
        for _ in iterator:
            pass
    except Exception:  # noqa: BLE001 - the round already failed with the first reason
        pass

