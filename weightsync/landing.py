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
when the next chunk does not fit before the area's end, it goes to the start, and the bytes of a
tensor that spans that point (at most one) are moved there first. Where each tensor piece is
received on its own (nccl's direct rounds, p2p's copies) each tensor may instead get its own place
(`StagingPlan.build(piecewise=True)` takes whichever plan lets more loads overlap receives,
Qwen2-7B's 408 MB MLP groups fit the default 1 GiB x 2 that way). A tensor's bytes stay until
its group was loaded; a chunk is received only once the bytes it would overwrite were loaded.
The plan is worked out before the round's payload moves (it depends only on the layout, the
chunk sizes and the group keys): a round whose tensor or fused group does not fit that bound is
refused at the start, naming the tensor and the bound. Nothing is ever allocated beyond it.

An atomic round into a loader stages the whole round (one buffer of the stream's size, kept
while the manifest stays the same: the memory cost of the set once more), verifies it, and only
then loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from weightsync.errors import TransferError
from weightsync.integrity import StreamDigest
from weightsync.layout import Chunk, Layout
from weightsync.packing import Region, RegionPlan, as_bytes
from weightsync.protocol import Manifest, TensorSpec
from weightsync.store import WeightStore

LoadFn = Callable[[list[tuple[str, torch.Tensor]]], None]
ManifestCheck = Callable[[Manifest], "str | None"]
# A sparse round into an engine that takes patches: [(name, flat int64 indices, values)].
SparseLoadFn = Callable[[list[tuple[str, torch.Tensor, torch.Tensor]]], None]
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
        have = TensorSpec.of(spec.name, store[spec.name])
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
    for spec, (low, high) in zip(nonempty, lows_highs):
        numel = sink[spec.name].numel() if isinstance(sink, WeightStore) else None
        if low < 0 or (numel is not None and high >= numel):
            return f"parameter {spec.name!r}: sparse index out of range [0, {numel if numel is not None else 'n'})"
    return None


def sparse_scratch(manifest: Manifest, device: torch.device) -> list[torch.Tensor]:
    """Per patch: its indices, then its values (the order they travel in)."""
    scratch: list[torch.Tensor] = []
    for spec in manifest.tensors:
        scratch += [torch.empty(spec.numel, dtype=torch.int64, device=device),
                    torch.empty(spec.numel, dtype=spec.torch_dtype, device=device)]
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
    return [(spec.name, flat.view(spec.torch_dtype).view(spec.shape)) for spec, flat in zip(manifest.tensors, flats)]


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
            if isinstance(sink, LoaderSink):
                sink.loaded_tensors += len(self.sparse.tensors)
                _loading(sink.load_sparse, [(spec.name, self.scratch[2 * i], self.scratch[2 * i + 1])
                                            for i, spec in enumerate(self.sparse.tensors)])
                return
            with sink.lock:  # apply every validated patch
                for i, spec in enumerate(self.sparse.tensors):
                    sink[spec.name].view(-1)[self.scratch[2 * i]] = self.scratch[2 * i + 1]
        elif self.shadow is not None:
            if isinstance(sink, LoaderSink):  # atomic loader: the whole verified round at once
                _loading(sink.hand, [(spec.name, self.shadow[spec.name]) for spec in self.manifest.tensors])
                return
            with sink.lock:  # atomic: switch the verified copy in
                for spec in self.manifest.tensors:
                    sink[spec.name].copy_(self.shadow[spec.name])


def _loading(load: Callable, batch: list) -> None:
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
    views: dict = field(default_factory=dict)  # cached per area: shaped views, checksum plans

    @classmethod
    def build(cls, layout: Layout, chunks: Sequence[Chunk], capacity: int, names: Sequence[str],
              run_ends: Sequence[int], piecewise: bool = False) -> "StagingPlan":
        """Raise TransferError naming the tensor and the bound when the round cannot be staged.

        `piecewise`: each tensor piece of a chunk is received on its own (nccl's direct rounds,
        p2p's copies), so a chunk need not be contiguous in the area: then each tensor may get
        its own place (no prefix is ever moved), or the chunk one place, whichever plan fits and
        makes fewer receives wait for the previous chunk's load."""
        if not piecewise:
            return cls._build(layout, chunks, capacity, names, run_ends, False)
        plans, errors = [], []
        for mode in (True, False):
            try:
                plans.append(cls._build(layout, chunks, capacity, names, run_ends, mode))
            except TransferError as error:
                errors.append(error)
        if not plans:
            raise errors[0]
        return min(plans, key=lambda plan: sum(after >= j - 1 for j, after in enumerate(plan.after)))

    @classmethod
    def _build(cls, layout: Layout, chunks: Sequence[Chunk], capacity: int, names: Sequence[str],
               run_ends: Sequence[int], piecewise: bool) -> "StagingPlan":
        count = len(layout.sizes)
        bound = (f"the {capacity} bytes of loader staging (packed_num_buffers x packed_buffer_size_bytes); "
                 "raise them or load this tensor some other way")
        last_chunk = [-1] * count
        for chunk in chunks:
            for s in chunk.segments:
                last_chunk[s.index] = chunk.number
        for i in range(count):  # an empty tensor is complete once the one before it is
            if last_chunk[i] < 0:
                last_chunk[i] = last_chunk[i - 1] if i else (0 if chunks else -1)
        ready = [last_chunk[run_ends[i]] for i in range(count)]  # loaded after this chunk
        batches: list[list[int]] = [[] for _ in chunks] + [[]]  # the last: tensors without bytes, at the end
        for i in range(count):
            batches[ready[i]].append(i)  # ready -1 (a round of empty tensors only): the last
        positions: list[int] = []
        after: list[int] = []
        carries: dict[int, Carry] = {}
        places = [0] * count
        live: list[list] = []  # [lo, hi, free_after, tensor]: area bytes needed until that chunk's completion
        peak = 0
        floor = -1  # every chunk from here on is received after this chunk's completion

        def blocking(lo: int, hi: int, skip=None) -> list:
            return [p for p in live if p[0] < hi and lo < p[1] and p is not skip]

        def refuse_group(piece) -> TransferError:
            return TransferError(f"parameter {names[piece[3]]!r} and its fused group (loaded together up to "
                                 f"{names[run_ends[piece[3]]]!r}) do not fit in {bound}")

        def align(value: int) -> int:
            return -(-value // layout.alignment) * layout.alignment

        cursor = 0
        for chunk in chunks if piecewise else ():
            j = chunk.number
            fresh: list[list] = []
            need = -1
            for s in chunk.segments:
                if s.start:
                    continue
                # a tensor begins: its place, next to the last one if that is free soon enough,
                # else where the bytes it overwrites are free soonest (never what chunk j completes)
                size = layout.sizes[s.index]
                if size > capacity:
                    raise TransferError(f"parameter {names[s.index]!r} ({size} bytes) does not fit in {bound}")
                best = None
                for start in [cursor, 0] + [align(p[1]) for p in live + fresh]:
                    if start + size > capacity:
                        continue
                    over = [p[2] for p in live + fresh if p[0] < start + size and start < p[1]]
                    wait = max(over, default=-1)
                    if wait < j and (best is None or wait < best[0]):
                        best = (wait, start)
                    if best is not None and best[0] <= floor:
                        break  # free for every later chunk already: take the first such place
                if best is None:
                    blocker = max((p for p in live + fresh if p[2] >= j), key=lambda p: p[1] - p[0])
                    raise refuse_group(blocker)
                need = max(need, best[0])
                places[s.index] = best[1]
                fresh.append([best[1], best[1] + size, ready[s.index], s.index])
                cursor = min(align(best[1] + size), capacity)
            floor = max(floor, need)
            positions.append(-1)
            after.append(need)
            live += fresh
            peak = max([peak] + [hi for _, hi, _, _ in fresh])
            live = [p for p in live if p[2] > floor]
        for chunk in chunks if not piecewise else ():
            j, n = chunk.number, chunk.nbytes
            if n > capacity:
                raise TransferError(f"a chunk of {n} bytes exceeds {bound}")
            first = chunk.segments[0] if chunk.segments else None
            carried = first.start if first is not None and first.start > 0 else 0
            pos = 0 if j == 0 else positions[-1] + chunks[j - 1].nbytes
            moved = None
            if pos + n > capacity:  # wrap to the area's start, moving the spanning tensor's prefix there
                source = pos - carried
                if carried + n > capacity or (carried and (source == 0 or carried > CARRY_MAX_STEPS * source)):
                    index = first.index
                    raise TransferError(f"parameter {names[index]!r} ({layout.sizes[index]} bytes) does not fit, "
                                        f"with the chunk that completes it, in {bound}")
                pos = carried
                if carried:
                    carries[j - 1] = Carry(j, source, carried)  # run when chunk j-1 completed
                    for piece in live:  # the old bytes are needed only until they moved
                        if piece[3] == first.index:
                            piece[2] = j - 1
                    # the move's destination must be free by then
                    stuck = [p for p in blocking(0, carried) if p[2] >= j]
                    if stuck:
                        raise refuse_group(stuck[0])
                    moved = [0, carried, ready[first.index], first.index]
                    places[first.index] = 0
            pieces = blocking(pos, pos + n)
            need = max([p[2] for p in pieces], default=-1)
            if need >= j:
                raise refuse_group(next(p for p in pieces if p[2] == need))
            floor = max(floor, need)
            positions.append(pos)
            after.append(need)
            if moved is not None:
                live.append(moved)
            for s in chunk.segments:
                if s.nbytes:
                    live.append([pos + s.chunk_offset, pos + s.chunk_offset + s.nbytes, ready[s.index], s.index])
                    if s.start == 0:
                        places[s.index] = pos + s.chunk_offset
            peak = max(peak, pos + n)
            live = [p for p in live if p[2] > floor]  # the rest is free for every later chunk
        return cls(capacity, positions, after, carries, batches, places, peak)


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
            shaped = [area[p : p + size] for p, size in zip(plan.places, sizes)]
            specs = manifest.tensors
            batches = [[(specs[i].name, shaped[i].view(specs[i].torch_dtype).view(specs[i].shape)) for i in batch]
                       for batch in plan.batches]
            places = plan.places
            pieces = [[area[p + s.chunk_offset : p + s.chunk_offset + s.nbytes] if p >= 0 else
                       area[places[s.index] + s.start : places[s.index] + s.stop] for s in c.segments if s.nbytes]
                      for c, p in zip(chunks, plan.positions)]
            sums = [RegionPlan([Region(view, None, c.start + s.chunk_offset)
                                for view, s in zip(views, [s for s in c.segments if s.nbytes])], copy=False)
                    for c, views in zip(chunks, pieces)] if verify else None
            plan.views["views"] = cached = (key, batches, sums, pieces, (manifest, chunks))  # keeps ids stable
        self.batches, self.sums, self.pieces = cached[1], cached[2], cached[3]

    def view(self, number: int) -> torch.Tensor:
        """Where chunk `number` lands, laid out as in the stream (a contiguous plan only)."""
        pos = self.plan.positions[number]
        if pos < 0:
            raise ValueError("a piecewise staging plan places each piece of a chunk on its own")
        return self.area[pos : pos + self.chunks[number].nbytes]

    def run(self, post: Callable[[int], object], wait: Callable[[object], None], sink: LoaderSink,
            digest: StreamDigest | None, depth: int, programs: int | None = None,
            first: object | None = None) -> str | None:
        """`post(j)` starts receiving chunk j into `view(j)` and returns a handle `wait` blocks on
        (bounded); `first`: a handle for chunk 0 when it is already on its way. A loader that
        raises does not stop the round (the others are still sending): the rest is received and
        checksummed but not loaded, and the reason is returned, for the round's verdict."""
        plan = self.plan
        in_flight: list[tuple[int, object]] = []
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
