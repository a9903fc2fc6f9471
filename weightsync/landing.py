"""Where a round's bytes land on a receiver, shared by every transport.

A receiver hands `Transport.receive` a *sink*:

- a `WeightStore` (the *direct* sink): the weights laid out like the trainer's tensors, so the
  bytes land in place (zero copies when the store is one flat buffer in the stream's layout);
- a `LoaderSink`: an engine's loader (vLLM's `model.load_weights`) that fuses, shards and
  post-processes the trainer's tensors itself. Each tensor is handed over as
  `(trainer name, tensor view)` as soon as all of its bytes are in, in batches that never split
  a fused group (consecutive names with the same `group_of` key, e.g. a layer's q/k/v).

What every transport shares lives here once: the stream's tensor sizes, the shadow copy an
atomic round lands in, the scratch tensors of a sparse round and the validation of its indices,
the commit rules (`Landing`), and the bounded staging of a loader round (`StagingPlan`,
`StagedLoad`).

Staging for a loader (collective transports, and p2p): the chunks a round is cut into land in
one area of `packed_num_buffers x packed_buffer_size_bytes` bytes (the same memory the packed
path stages in), placed one after the other so that every tensor's bytes are contiguous in it;
when the next chunk does not fit before the area's end, the bytes still held (those of the fused
group still loading) are moved to the area's start and the chunk lands right after them. Where
each tensor piece is received on its own (nccl's direct rounds, p2p's copies) each tensor may
instead get its own place (`StagingPlan.build(piecewise=True)` takes whichever plan lets more
loads overlap receives). A tensor's bytes stay until its group was loaded; a chunk is received
only once the bytes it would overwrite were loaded. The plan is worked out before the round's
payload moves (it depends only on the layout, the chunk sizes and the group keys).

The rule, exact up to alignment padding: when a chunk is received, the stream bytes from the
first byte of the fused group still loading (begun before the chunk, not yet complete; aligned
down) to the chunk's end must fit in the area, since all of them are held then. Every layout
within it is staged; one beyond it is refused at the start, naming the group, the bytes it needs
and the bound. Nothing is ever allocated beyond the area.

An atomic round into a loader stages the whole round (one buffer of the stream's size, kept
while the manifest stays the same: the memory cost of the set once more), verifies it, and only
then loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from weightsync.dtypes import tensor_spec, torch_dtype
from weightsync.errors import TransferError
from weightsync.integrity import StreamDigest
from weightsync.layout import Chunk, Layout
from weightsync.packing import Region, RegionPlan, as_bytes
from weightsync.protocol import Manifest
from weightsync.store import WeightStore

LoadFn = Callable[[list[tuple[str, torch.Tensor]]], None]
ManifestCheck = Callable[[Manifest], "str | None"]
# A sparse round into an engine that takes patches: [(name, flat int64 indices, values)].
SparseLoadFn = Callable[[list[tuple[str, torch.Tensor, torch.Tensor]]], None]
_Item = TypeVar("_Item")
_Handle = TypeVar("_Handle")  # what a staged load's `post` returns and its `wait` blocks on
CARRY_MAX_STEPS = 16  # a carried prefix that overlaps its new place moves in at most this many copies


def group_by_module(name: str) -> str:
    """The default fused-group key: the name without its last two dotted parts
    ("model.layers.0.self_attn.q_proj.weight" -> "model.layers.0.self_attn")."""
    return name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""


class LoaderSink:
    """Receiver destination that hands each tensor, once all its bytes are in, to an engine's loader,
    in batches that never split a fused group (consecutive names with the same group key).

    `check(manifest)` says why the trainer's manifest cannot load (naming the parameter), or None;
    it runs on every receiver before any byte is loaded, and the group agrees on the verdicts.
    The views handed to `load` are valid only during the call: the loader copies what it keeps.
    `supports_sparse`: the engine applies sparse patches through `load_sparse` (required then);
    otherwise a sparse round is refused at its start.
    """

    def __init__(self, load: LoadFn, check: ManifestCheck, *, group_of: Callable[[str], str] = group_by_module,
                 supports_sparse: bool = False, load_sparse: SparseLoadFn | None = None) -> None:
        if supports_sparse and load_sparse is None:
            raise ValueError("a LoaderSink with supports_sparse=True needs load_sparse")
        self.load = load
        self.check = check
        self.group_of = group_of
        self.supports_sparse = supports_sparse
        self.load_sparse = load_sparse
        self.loaded_tensors = 0  # tensors handed to `load` in the current/last round
        self.staging_bytes = 0  # staging memory the transport held for the last round (diagnosis)
        self._verdict: tuple[Manifest, str | None] | None = None
        self._runs: tuple[Manifest, list[int]] | None = None

    def begin_round(self) -> None:
        self.loaded_tensors = 0
        self.staging_bytes = 0

    def verdict(self, kind: str, manifest: Manifest) -> str | None:
        """Why this round cannot load here (None: it can). Cached while the manifest object stays."""
        if kind != "dense":
            if not self.supports_sparse:
                return ("the receiver's loader does not take sparse patches (LoaderSink supports_sparse=False); "
                        "send a dense update")
            return None
        cached = self._verdict
        if cached is not None and cached[0] is manifest:
            return cached[1]
        try:
            answer = self.check(manifest)
        except Exception as error:  # noqa: BLE001 - an engine's check that raised refuses the round
            answer = f"the loader's manifest check failed: {error}"
        self._verdict = (manifest, answer)
        return answer

    def run_ends(self, manifest: Manifest) -> list[int]:
        """For each tensor, the index of the last tensor of its fused group (a run of consecutive
        names with the same key): the tensor is loaded only together with that one."""
        cached = self._runs
        if cached is not None and cached[0] is manifest:
            return cached[1]
        keys = [self.group_of(spec.name) for spec in manifest.tensors]
        ends = list(range(len(keys)))
        for i in range(len(keys) - 2, -1, -1):
            if keys[i] == keys[i + 1]:
                ends[i] = ends[i + 1]
        self._runs = (manifest, ends)
        return ends

    def hand(self, batch: list[tuple[str, torch.Tensor]]) -> None:
        if not batch:
            return
        self.loaded_tensors += len(batch)  # counted first: a load that raises may have written some
        self.load(batch)


Sink = WeightStore | LoaderSink


# == shared pieces ==================================================================================
def stream_sizes(kind: str, manifest: Manifest) -> list[int]:
    """Byte sizes of the tensors in a round's stream (sparse: indices then values, per patch)."""
    if kind == "dense":
        return [spec.nbytes for spec in manifest.tensors]
    return [size for spec in manifest.tensors for size in (spec.numel * 8, spec.nbytes)]


def check_sparse(manifest: Manifest, store: WeightStore) -> str | None:
    """Why these sparse patches cannot apply to `store` (naming the parameter), or None."""
    for spec in manifest.tensors:
        if spec.name not in store:
            return f"parameter {spec.name!r} is not in the receiver's weights"
        have = tensor_spec(spec.name, store[spec.name])
        if have.dtype != spec.dtype:
            return f"parameter {spec.name!r} has dtype {have.dtype} here but {spec.dtype} from the trainer"
        if len(spec.shape) != 1 or spec.numel > have.numel:
            return f"parameter {spec.name!r}: a patch must be 1-D with at most {have.numel} values"
    return None


def sink_verdict(kind: str, manifest: Manifest, sink: Sink) -> str | None:
    """Why this round cannot land in `sink` (naming the parameter), or None."""
    if isinstance(sink, LoaderSink):
        return sink.verdict(kind, manifest)
    return sink.mismatch(manifest) if kind == "dense" else check_sparse(manifest, sink)


def check_indices(manifest: Manifest, scratch: list[torch.Tensor], sink: Sink) -> str | None:
    """Every patch index must fall inside its parameter, checked before any patch applies
    (one host read for all patches). `scratch` holds each patch's indices, then its values.
    A loader's parameters are the engine's: only negative indices are refused here."""
    specs = manifest.tensors
    bounds = [torch.stack([scratch[2 * i].min(), scratch[2 * i].max()]) for i, spec in enumerate(specs)
              if spec.numel]
    if not bounds:
        return None
    lows_highs = torch.stack(bounds).cpu().tolist()
    nonempty = [spec for spec in specs if spec.numel]
    for spec, (low, high) in zip(nonempty, lows_highs, strict=True):
        numel = sink[spec.name].numel() if isinstance(sink, WeightStore) else None
        if low < 0 or (numel is not None and high >= numel):
            return f"parameter {spec.name!r}: sparse index out of range [0, {numel if numel is not None else 'n'})"
    return None


def sparse_scratch(manifest: Manifest, device: torch.device) -> list[torch.Tensor]:
    """Per patch: its indices, then its values (the order they travel in)."""
    scratch: list[torch.Tensor] = []
    for spec in manifest.tensors:
        scratch += [torch.empty(spec.numel, dtype=torch.int64, device=device),
                    torch.empty(spec.numel, dtype=torch_dtype(spec), device=device)]
    return scratch


class Shadow:
    """A second copy of the weights an atomic round lands in, kept across rounds of one manifest."""

    def __init__(self) -> None:
        self._store: WeightStore | None = None
        self._manifest: Manifest | None = None

    def get(self, manifest: Manifest, device: torch.device) -> WeightStore:
        if self._store is None or self._manifest != manifest:
            self._store = None  # free the old one before allocating
            self._store = WeightStore.from_manifest(manifest, device)
            self._manifest = manifest
        return self._store

    def clear(self) -> None:
        self._store = self._manifest = None


def shaped_views(manifest: Manifest, flats: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(name, view of the right dtype and shape) for each dense tensor's flat uint8 bytes."""
    return [(spec.name, flat.view(torch_dtype(spec)).view(spec.shape))
            for spec, flat in zip(manifest.tensors, flats, strict=True)]


@dataclass
class Landing:
    """Where a round's payload lands, and how it becomes live once the round verified."""

    target: torch.Tensor | None  # receive chunks straight into this flat buffer
    destinations: list[torch.Tensor] | None  # or into these flat views (unpacked from staging)
    in_place: bool = False
    shadow: WeightStore | None = None  # atomic: the verified copy to switch in
    manifest: Manifest | None = None
    scratch: list[torch.Tensor] | None = None  # sparse: indices and values per patch
    sparse: Manifest | None = None
    loader: LoaderSink | None = None  # a loader round
    staged: bool = False  # loader: bytes are handed over as they arrive (not after verification)

    @property
    def writes_live(self) -> bool:
        """Whether payload bytes reach the serving weights before the round verified."""
        if self.loader is not None:
            return self.staged
        return self.shadow is None and self.sparse is None

    def touched(self) -> bool:
        """After a failure: whether the serving weights hold part of the round."""
        if self.loader is not None:
            return self.loader.loaded_tensors > 0
        return self.writes_live

    def commit(self, sink: Sink) -> None:
        """The round verified: make it live (what landed in place already is)."""
        if self.sparse is not None:
            scratch = self.scratch
            assert scratch is not None, "a sparse landing has its scratch (choose_landing)"
            if isinstance(sink, LoaderSink):
                assert sink.load_sparse is not None, "a sparse round reaches only a loader with load_sparse"
                sink.loaded_tensors += len(self.sparse.tensors)
                _loading(sink.load_sparse, [(spec.name, scratch[2 * i], scratch[2 * i + 1])
                                            for i, spec in enumerate(self.sparse.tensors)])
                return
            with sink.lock:  # apply every validated patch
                for i, spec in enumerate(self.sparse.tensors):
                    sink[spec.name].view(-1)[scratch[2 * i]] = scratch[2 * i + 1]
        elif self.shadow is not None:
            shadow, manifest = self.shadow, self.manifest
            assert manifest is not None, "an atomic landing has its manifest (choose_landing)"
            if isinstance(sink, LoaderSink):  # atomic loader: the whole verified round at once
                _loading(sink.hand, [(spec.name, shadow[spec.name]) for spec in manifest.tensors])
                return
            with sink.lock:  # atomic: switch the verified copy in
                for spec in manifest.tensors:
                    sink[spec.name].copy_(shadow[spec.name])


def _loading(load: Callable[[list[_Item]], None], batch: list[_Item]) -> None:
    """Hand a verified round to a loader; its failure is a failed round with the weights touched."""
    try:
        load(batch)
    except Exception as error:  # noqa: BLE001 - the engine's loader
        failure = TransferError(f"the loader failed after the round verified: {error!r}")
        failure.weights_touched = True
        raise failure from error


def choose_landing(kind: str, manifest: Manifest, sink: Sink, layout: Layout | None, device: torch.device,
                   atomic: bool, shadow: Shadow, flat_target: bool = True) -> Landing:
    """Where this round lands. `flat_target`: a store laid out as the stream may be received
    into as one flat buffer (collective transports); else per-tensor destinations."""
    loader = sink if isinstance(sink, LoaderSink) else None
    if kind == "sparse_flat":
        scratch = sparse_scratch(manifest, device)
        return Landing(None, [as_bytes(t) for t in scratch], scratch=scratch, sparse=manifest, loader=loader)
    if atomic:
        copy = shadow.get(manifest, device)
        target = copy.contiguous_target(manifest, layout) if layout is not None and flat_target else None
        return Landing(target, None if target is not None else copy.destinations(manifest), shadow=copy,
                       manifest=manifest, loader=loader)
    if loader is not None:
        return Landing(None, None, manifest=manifest, loader=loader, staged=True)
    assert isinstance(sink, WeightStore)  # a LoaderSink returned above
    target = sink.contiguous_target(manifest, layout) if layout is not None and flat_target else None
    if target is not None and target.device == device:
        return Landing(target, None, in_place=True)
    return Landing(None, sink.destinations(manifest))


# == staged loading ==================================================================================
@dataclass(frozen=True)
class Carry:
    """Before chunk `chunk` is received, move `nbytes` at `source` of the area to its start."""

    chunk: int
    source: int
    nbytes: int


@dataclass
class StagingPlan:
    """Where each chunk of a loader round lands in the staging area, when it may be received, and
    which tensors are handed over after each chunk (see the module docstring)."""

    capacity: int
    positions: list[int]  # area offset of each chunk (-1: piecewise, each piece at its tensor's place)
    after: list[int]  # chunk j is received only once chunks <= after[j] were loaded (-1: at once)
    carries: dict[int, Carry]  # by the chunk whose completion runs the carry (the one before the wrap)
    batches: list[list[int]]  # tensor indices handed over after each chunk (the last: at the end)
    places: list[int]  # area offset of each tensor when it is handed over
    peak: int  # the most area bytes the plan uses
    views: dict[str, Any] = field(default_factory=dict)  # cached per area: shaped views, checksum plans

    @classmethod
    def build(cls, layout: Layout, chunks: Sequence[Chunk], capacity: int, names: Sequence[str],
              run_ends: Sequence[int], piecewise: bool = False) -> "StagingPlan":
        """Raise TransferError naming the tensor and the bound when the round cannot be staged.

        `piecewise`: each tensor piece of a chunk is received on its own (nccl's direct rounds,
        p2p's copies), so a chunk need not be contiguous in the area: then each tensor may get
        its own place (no prefix is ever moved), or the chunk one place, whichever plan fits and
        makes fewer receives wait for the previous chunk's load."""
        ring, refusal = _attempt(lambda: cls._build(layout, chunks, capacity, names, run_ends, False))
        if not piecewise:
            if ring is None:
                assert refusal is not None
                raise refusal
            return ring
        pieces, _ = _attempt(lambda: cls._build(layout, chunks, capacity, names, run_ends, True))
        plans = [plan for plan in (pieces, ring) if plan is not None]
        if not plans:
            assert refusal is not None
            raise refusal  # the contiguous plan's refusal states the rule
        return min(plans, key=lambda plan: sum(after >= j - 1 for j, after in enumerate(plan.after)))

    @classmethod
    def _build(cls, layout: Layout, chunks: Sequence[Chunk], capacity: int, names: Sequence[str],
               run_ends: Sequence[int], piecewise: bool) -> "StagingPlan":
        spans = TensorSpans.of(layout, chunks, run_ends)
        bound = _Bound(capacity, names, run_ends, layout)
        if piecewise:
            return _piecewise_plan(layout, chunks, spans, bound)
        return _ring_plan(layout, chunks, spans, bound)


def _attempt(build: Callable[[], StagingPlan]) -> tuple[StagingPlan | None, TransferError | None]:
    try:
        return build(), None
    except TransferError as error:
        return None, error


# -- the records a plan is worked out over ---------------------------------------------------------
@dataclass(frozen=True)
class TensorSpans:
    """Per tensor of a loader round: the chunk after which it is handed over (`ready`: the last
    chunk of its fused group; -1 for a round of empty tensors only), and the batches of tensor
    indices handed over after each chunk (the last batch: at the end)."""

    ready: list[int]
    batches: list[list[int]]

    @classmethod
    def of(cls, layout: Layout, chunks: Sequence[Chunk], run_ends: Sequence[int]) -> "TensorSpans":
        last = _last_chunks(len(layout.sizes), chunks)
        ready = [last[end] for end in run_ends]
        batches: list[list[int]] = [[] for _ in range(len(chunks) + 1)]
        for index, chunk in enumerate(ready):
            batches[chunk].append(index)  # -1: the last batch
        return cls(ready, batches)


def _last_chunks(count: int, chunks: Sequence[Chunk]) -> list[int]:
    """The chunk that completes each tensor; an empty tensor is complete with the one before it."""
    last = [-1] * count
    for chunk in chunks:
        for segment in chunk.segments:
            last[segment.index] = chunk.number
    for index in range(count):
        if last[index] < 0:
            last[index] = last[index - 1] if index else (0 if chunks else -1)
    return last


@dataclass(frozen=True)
class _Bound:
    """The staging bound, and the refusals that name what does not fit in it."""

    capacity: int
    names: Sequence[str]
    run_ends: Sequence[int]
    layout: Layout

    @property
    def text(self) -> str:
        return (f"the {self.capacity} bytes of loader staging (packed_num_buffers x packed_buffer_size_bytes); "
                "raise them or load this tensor some other way")

    def group(self, first: int, need: int, chunk: int) -> TransferError:
        """The fused group that begins with tensor `first`, from its first byte to the end of
        `chunk` (the chunk being received), needs `need` bytes at once."""
        return TransferError(
            f"parameter {self.names[first]!r} and its fused group (loaded together up to "
            f"{self.names[self.run_ends[first]]!r}) need {need} bytes of staging at once, from the group's "
            f"first byte to the end of stream chunk {chunk} (a fused group is held from its first byte "
            f"until the chunk that completes it is in): that does not fit in {self.text}")

    def tensor(self, index: int) -> TransferError:
        return TransferError(f"parameter {self.names[index]!r} ({self.layout.sizes[index]} bytes) "
                             f"does not fit in {self.text}")

    def chunk(self, nbytes: int) -> TransferError:
        return TransferError(f"a chunk of {nbytes} bytes exceeds {self.text}")


@dataclass
class _Held:
    """Area bytes [lo, hi) of tensor `index`, needed until chunk `until` completed."""

    lo: int
    hi: int
    until: int
    index: int

    def overlaps(self, lo: int, hi: int) -> bool:
        return self.lo < hi and lo < self.hi


def _latest(held: Sequence[_Held], lo: int, hi: int) -> int:
    """The last chunk whose completion frees area [lo, hi) (-1: free now)."""
    return max((piece.until for piece in held if piece.overlaps(lo, hi)), default=-1)


# -- contiguous staging: a ring that moves the bytes still held to its start -----------------------
@dataclass
class _Ring:
    """Chunks land one after the other in the area, each contiguous; where the next one does not
    fit before the area's end, the stream bytes still held (those of the fused group still
    loading) move to the area's start and the chunk lands right after them. Area offset =
    stream offset - `shift`, so every tensor keeps its stream alignment and stays contiguous.

    Rule (exact up to alignment padding): for every chunk, the stream bytes from the first byte
    of the fused group still loading when it begins (aligned down) to the chunk's end fit in
    the area; nothing else is held when a chunk is received, so any plan needs that much."""

    layout: Layout
    spans: TensorSpans
    bound: _Bound
    shift: int = 0
    held: list[_Held] = field(default_factory=list)
    floor: int = -1  # every chunk from here on is received after this chunk completed
    first_live: int = 0  # the first tensor that may still be held

    def live_from(self, chunk: Chunk) -> int | None:
        """The first tensor whose bytes precede `chunk` and are still held when it begins."""
        ready, offsets, sizes = self.spans.ready, self.layout.offsets, self.layout.sizes
        while self.first_live < len(ready) and ready[self.first_live] < chunk.number:
            self.first_live += 1
        index = self.first_live
        while index < len(ready) and not sizes[index] and offsets[index] < chunk.start:
            index += 1  # an empty tensor holds no bytes
        return index if index < len(ready) and offsets[index] < chunk.start else None

    def place(self, chunk: Chunk) -> tuple[int, Carry | None]:
        """Chunk's area offset (right after the chunk before, unless it wraps to the area's
        start), and the move that must run before it is received (or None)."""
        pos = chunk.start - self.shift
        if chunk.number and pos + chunk.nbytes <= self.bound.capacity:
            return pos, None
        live = self.live_from(chunk)
        base = self.layout.offsets[live] if live is not None else _align_down(chunk.start, self.layout.alignment)
        if chunk.stop - base > self.bound.capacity:
            raise self.bound.group(live, chunk.stop - base, chunk.number) if live is not None \
                else self.bound.chunk(chunk.stop - base)
        carry = None
        if live is not None and base - self.shift != 0:
            carry = Carry(chunk.number, base - self.shift, chunk.start - base)
            self.held = [_Held(p.lo - (base - self.shift), p.hi - (base - self.shift), p.until, p.index)
                         for p in self.held if p.until >= chunk.number and p.lo >= base - self.shift]
        self.shift = base
        return chunk.start - base, carry

    def receive(self, chunk: Chunk, pos: int, carry: Carry | None) -> int:
        """Take chunk's bytes at `pos`; returns the chunk it waits for."""
        after = _latest(self.held, pos, pos + chunk.nbytes)
        if carry is not None:
            after = max(after, chunk.number - 1)  # the move runs once the chunk before completed
        self.floor = max(self.floor, after)
        ready = self.spans.ready
        self.held = [p for p in self.held if p.until > self.floor]
        self.held += [_Held(pos + s.chunk_offset, pos + s.chunk_offset + s.nbytes, ready[s.index], s.index)
                      for s in chunk.segments if s.nbytes]
        return after


def _ring_plan(layout: Layout, chunks: Sequence[Chunk], spans: TensorSpans, bound: _Bound) -> StagingPlan:
    ring = _Ring(layout, spans, bound)
    positions: list[int] = []
    after: list[int] = []
    carries: dict[int, Carry] = {}
    shifts: list[int] = []
    for chunk in chunks:
        pos, carry = ring.place(chunk)
        if carry is not None:
            carries[chunk.number - 1] = carry  # run when the chunk before completed
        after.append(ring.receive(chunk, pos, carry))
        positions.append(pos)
        shifts.append(ring.shift)
    places = [_handover_place(layout, spans, shifts, index, bound.capacity) for index in range(len(layout.sizes))]
    peak = max((p + c.nbytes for p, c in zip(positions, chunks, strict=True)), default=0)
    return StagingPlan(bound.capacity, positions, after, carries, spans.batches, places, peak)


def _handover_place(layout: Layout, spans: TensorSpans, shifts: Sequence[int], index: int, capacity: int) -> int:
    """Where tensor `index` sits in the area when it is handed over (after its ready chunk)."""
    ready = spans.ready[index]
    if not layout.sizes[index] or ready < 0:
        return 0
    return min(layout.offsets[index] - shifts[ready], capacity)


def _align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


# -- piecewise staging: each tensor its own place --------------------------------------------------
def _piecewise_plan(layout: Layout, chunks: Sequence[Chunk], spans: TensorSpans, bound: _Bound) -> StagingPlan:
    """Where each piece is received on its own, every tensor gets a place of its own as it
    begins: next to the last one if that is free soon enough, else where the bytes it overwrites
    are free soonest (never bytes the same chunk completes). No bytes are ever moved."""
    places = [0] * len(layout.sizes)
    after: list[int] = []
    held: list[_Held] = []
    floor, cursor, peak = -1, 0, 0
    for chunk in chunks:
        fresh: list[_Held] = []
        need = -1
        for segment in chunk.segments:
            if segment.start:
                continue  # a tensor's later pieces follow its first
            wait, start = _tensor_place(layout, bound, segment.index, chunk.number, held + fresh, cursor, floor)
            need = max(need, wait)
            places[segment.index] = start
            fresh.append(_Held(start, start + layout.sizes[segment.index], spans.ready[segment.index], segment.index))
            cursor = min(-(-(start + layout.sizes[segment.index]) // layout.alignment) * layout.alignment,
                         bound.capacity)
        floor = max(floor, need)
        after.append(need)
        peak = max([peak] + [piece.hi for piece in fresh])
        held = [piece for piece in held + fresh if piece.until > floor]
    return StagingPlan(bound.capacity, [-1] * len(chunks), after, {}, spans.batches, places, peak)


def _tensor_place(layout: Layout, bound: _Bound, index: int, chunk: int, held: Sequence[_Held], cursor: int,
                  floor: int) -> tuple[int, int]:
    """(the chunk to wait for, the area offset) of tensor `index`, which begins in `chunk`."""
    size = layout.sizes[index]
    if size > bound.capacity:
        raise bound.tensor(index)
    best: tuple[int, int] | None = None
    align = layout.alignment
    for start in [cursor, 0] + [-(-piece.hi // align) * align for piece in held]:
        if start + size > bound.capacity:
            continue
        wait = _latest(held, start, start + size)
        if wait < chunk and (best is None or wait < best[0]):
            best = (wait, start)
        if best is not None and best[0] <= floor:
            break  # free for every later chunk already: take the first such place
    if best is None:
        blocker = max((p for p in held if p.until >= chunk), key=lambda p: p.hi - p.lo)
        raise bound.group(blocker.index, blocker.hi - blocker.lo, chunk)
    return best


class StagedLoad:
    """Runs one loader round over a `StagingPlan`: receives (through `post`) each chunk into its
    place with at most `depth` in flight, and after each chunk landed checksums it, hands the
    tensors it completed to the loader, and moves a carried prefix; so loading chunk k overlaps
    receiving chunks k+1 ... (their receives were started before)."""

    def __init__(self, plan: StagingPlan, area: torch.Tensor, manifest: Manifest, chunks: Sequence[Chunk],
                 layout: Layout, verify: bool):
        self.plan, self.area, self.chunks = plan, area, chunks
        key = (area.data_ptr(), area.numel(), id(manifest), id(chunks), verify)
        cached = plan.views.get("views")
        if cached is None or cached[0] != key:
            sizes = layout.sizes
            shaped = [area[p : p + size] for p, size in zip(plan.places, sizes, strict=True)]
            specs = manifest.tensors
            batches = [[(specs[i].name, shaped[i].view(torch_dtype(specs[i])).view(specs[i].shape)) for i in batch]
                       for batch in plan.batches]
            places = plan.places
            pieces = [[area[p + s.chunk_offset : p + s.chunk_offset + s.nbytes] if p >= 0 else
                       area[places[s.index] + s.start : places[s.index] + s.stop] for s in c.segments if s.nbytes]
                      for c, p in zip(chunks, plan.positions, strict=True)]
            sums = [RegionPlan([Region(view, None, c.start + s.chunk_offset)
                                for view, s in zip(views, [s for s in c.segments if s.nbytes], strict=True)],
                               copy=False)
                    for c, views in zip(chunks, pieces, strict=True)] if verify else None
            plan.views["views"] = cached = (key, batches, sums, pieces, (manifest, chunks))  # keeps ids stable
        self.batches, self.sums, self.pieces = cached[1], cached[2], cached[3]

    def view(self, number: int) -> torch.Tensor:
        """Where chunk `number` lands, laid out as in the stream (a contiguous plan only)."""
        pos = self.plan.positions[number]
        if pos < 0:
            raise ValueError("a piecewise staging plan places each piece of a chunk on its own")
        return self.area[pos : pos + self.chunks[number].nbytes]

    def run(self, post: Callable[[int], _Handle], wait: Callable[[_Handle], None], sink: LoaderSink,
            digest: StreamDigest | None, depth: int, programs: int | None = None,
            first: _Handle | None = None) -> str | None:
        """`post(j)` starts receiving chunk j into `view(j)` and returns a handle `wait` blocks on
        (bounded); `first`: a handle for chunk 0 when it is already on its way. A loader that
        raises does not stop the round (the others are still sending): the rest is received and
        checksummed but not loaded, and the reason is returned, for the round's verdict."""
        plan = self.plan
        in_flight: list[tuple[int, _Handle]] = []
        done = -1
        failure: str | None = None

        def complete() -> None:
            nonlocal done, failure
            number, handle = in_flight.pop(0)
            wait(handle)
            if self.sums is not None and digest is not None:
                self.sums[number].run(digest, None if number == len(self.chunks) - 1 else programs)
            if failure is None and self.batches[number]:
                try:
                    sink.hand(self.batches[number])
                except Exception as error:  # noqa: BLE001 - the engine's loader: reported, not raised here
                    names = [name for name, _ in self.batches[number]]
                    failure = f"the loader failed on {names[0]!r} .. {names[-1]!r}: {error!r}"
            carry = plan.carries.get(number)
            if carry is not None:
                move(self.area, carry.source, carry.nbytes)
            done = number

        for number in range(len(self.chunks)):
            while in_flight and (done < plan.after[number] or len(in_flight) >= depth):
                complete()
            if done < plan.after[number]:  # nothing in flight, yet not free: the plan is wrong
                raise TransferError(f"loader staging: chunk {number} waits for chunk {plan.after[number]}")
            handle = first if number == 0 and first is not None else post(number)
            in_flight.append((number, handle))
        while in_flight:
            complete()
        if failure is None and self.batches[-1]:
            try:
                sink.hand(self.batches[-1])
            except Exception as error:  # noqa: BLE001 - the engine's loader
                failure = f"the loader failed: {error!r}"
        return failure


def move(area: torch.Tensor, source: int, nbytes: int) -> None:
    """Copy area[source : source + nbytes] to area[:nbytes], front to back in steps no longer
    than the distance, so an overlapping source is read before it is overwritten."""
    step = source if source < nbytes else nbytes
    for start in range(0, nbytes, step):
        stop = min(start + step, nbytes)
        area[start:stop].copy_(area[source + start : source + stop], non_blocking=True)
