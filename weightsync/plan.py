"""Which trainer rank sends which part of which tensor to which receivers: the plan of a round.

A sharded trainer holds every tensor in pieces spread over its ranks (FSDP2 `Shard(0)`, TP
`Shard(d)`, replicas under `Replicate`), and a tensor-parallel receiver needs only its slice of
each tensor. Gathering every tensor on one rank and sending the whole model to every receiver
moves each byte through one link many times; the plan instead sends each byte once, from a rank
that holds it, to the group of receivers that need it (a broadcast where several do).

Both sides are described by regions of tensors, `Box`es (a start and a stop per dim):
- the trainer's layout: per tensor, the pieces and the ranks holding each (`Held`; built from
  DTensor-style placements over a device mesh by `mesh_held`, from vLLM 0.33's `ParamMeta` by
  `held_from_meta`, or "rank 0 holds all" for a plain trainer by `single_owner`);
- each receiver's layout: per tensor, the box it needs (`Need`: whole tensors for a daemon,
  `split`/`head_split` for a tensor-parallel worker).

`plan` cuts each tensor along every edge of every box of both sides; each resulting cell is held
by a known set of ranks and needed by a known set of receivers. Cells with the same holders and
receivers merge back into boxes, so a transfer is as large as the layouts allow. The work is per
tensor, never per element, and tensors whose layouts are the same objects (every expert of a
MoE model) share one computation; with shared `Held`/`Need` objects (the builders here are
cached so they return them) Kimi-K2's 70,000 tensors over 256 senders plan in about two seconds.

Where several ranks hold the same bytes, the sender is chosen to balance the bytes each rank
sends: the forced transfers first, then the choices biggest first, each to its least-loaded
holder (ties to the lowest rank), so the outcome depends on the layouts alone and every party
derives the same plan. `Plan.fingerprint` lets the parties compare it at init; `plan_mismatch`
names the first tensor where two parties' plans differ.

No PyTorch here (the operator and the benchmarks plan without it): dtypes are the wire's names.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from weightsync.protocol import DTYPE_SIZES, Manifest, TensorSpec


@dataclass(frozen=True)
class Box:
    """Elements [start[d], stop[d]) along every dim d of a tensor (row-major, like a slice)."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(hi - lo for lo, hi in zip(self.start, self.stop, strict=True))

    def __str__(self) -> str:
        return "[" + ", ".join(f"{lo}:{hi}" for lo, hi in zip(self.start, self.stop, strict=True)) + "]"


def full_box(shape: Sequence[int]) -> Box:
    return Box((0,) * len(shape), tuple(shape))


def within(box: Box, shape: Sequence[int]) -> bool:
    """Whether `box` is a region of a tensor of `shape` (an empty region counts)."""
    return (len(box.start) == len(box.stop) == len(shape)
            and all(0 <= lo <= hi <= size for lo, hi, size in zip(box.start, box.stop, shape, strict=True)))


@dataclass(frozen=True)
class Shard:
    """This mesh axis splits tensor dim `dim` as `torch.chunk` does (DTensor's and vLLM's rule)."""

    dim: int


@dataclass(frozen=True)
class Replicate:
    """Every coordinate along this mesh axis holds the whole extent."""


Placement = Shard | Replicate


@dataclass(frozen=True)
class Piece:
    """A region of a tensor and the trainer ranks that each hold all of it (replicas)."""

    box: Box
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Held:
    """How one tensor's elements are spread over the trainer's ranks. Named apart from the
    tensor, so that every tensor of the same shape and placement shares one (see `plan`)."""

    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Need:
    """The region of one tensor that one receiver needs, with the tensor's shape and dtype as that
    receiver knows them (a disagreement with the trainer is refused, not planned around)."""

    shape: tuple[int, ...]
    dtype: str
    box: Box


TrainerLayout = Mapping[str, Held]  # tensor name -> its pieces, in the round's tensor order
ReceiverLayout = Mapping[str, Need]  # tensor name -> what one receiver needs of it (absent: nothing)


# --- Trainer side -------------------------------------------------------------------------------

def chunk(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` of `size` elements cut in `parts` as `torch.chunk` does: parts
    of ceil(size / parts), so the last non-empty part may be shorter and the ones after it empty
    (5 over 4: 2, 2, 1, 0). DTensor's `Shard` and FSDP2 cut this way."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"part {index} of {parts}")
    step = -(-size // parts)
    start = min(index * step, size)
    return start, min(start + step, size)


def _coordinate_box(shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: tuple[Placement, ...],
                    coordinate: tuple[int, ...]) -> Box:
    """The region the device at `coordinate` holds: each `Shard` axis, outer axis first, cuts the
    extent the axes before it left (two axes sharding one dim nest, as DTensor's default order)."""
    start, stop = list((0,) * len(shape)), list(shape)
    for axis, placement in enumerate(placements):
        if isinstance(placement, Shard):
            lo, hi = chunk(stop[placement.dim] - start[placement.dim], mesh_shape[axis], coordinate[axis])
            start[placement.dim], stop[placement.dim] = start[placement.dim] + lo, start[placement.dim] + hi
    return Box(tuple(start), tuple(stop))


@lru_cache(maxsize=4096)
def mesh_held(shape: tuple[int, ...], dtype: str, mesh_shape: tuple[int, ...], placements: tuple[Placement, ...],
              owners: tuple[int, ...] | None = None) -> Held:
    """A tensor laid out over a device mesh, DTensor style: one placement per mesh axis;
    `owners` are the global ranks of the mesh's devices in row-major order (default 0..n-1).
    FSDP2 over 8 ranks: `((8,), (Shard(0),))`; FSDP × TP: `((4, 2), (Shard(0), Shard(1)))`;
    HSDP: `((2, 4), (Replicate(), Shard(0)))`. Cached: equal arguments give the same object."""
    shape = tuple(shape)
    if len(mesh_shape) != len(placements) or any(size < 1 for size in mesh_shape):
        raise ValueError(f"mesh {mesh_shape} with placements {placements}")
    for placement in placements:
        if isinstance(placement, Shard) and not 0 <= placement.dim < len(shape):
            raise ValueError(f"Shard({placement.dim}) of a tensor of shape {list(shape)}")
    owners = tuple(range(math.prod(mesh_shape))) if owners is None else tuple(owners)
    if len(owners) != math.prod(mesh_shape) or len(set(owners)) != len(owners):
        raise ValueError(f"{len(owners)} owners {owners} for a mesh of {mesh_shape}")
    ranks: dict[Box, list[int]] = {}
    for flat, coordinate in enumerate(itertools.product(*(range(size) for size in mesh_shape))):
        ranks.setdefault(_coordinate_box(shape, mesh_shape, placements, coordinate), []).append(owners[flat])
    return Held(shape, dtype, tuple(Piece(box, tuple(holders)) for box, holders in ranks.items()))


def single_owner(shape: tuple[int, ...], dtype: str, rank: int = 0) -> Held:
    """A plain (unsharded) trainer: one rank holds the whole tensor."""
    return mesh_held(tuple(shape), dtype, (1,), (Replicate(),), (rank,))


def _placement(placement: object) -> Placement:
    """vLLM's or torch's `Shard`/`Replicate` as ours (duck-typed: no vLLM or torch import here)."""
    dim = getattr(placement, "dim", None)
    if getattr(placement, "split_factor", 1) != 1:  # torch's _StridedShard (FSDP2 over TP): other cuts
        raise ValueError(f"placement {placement!r} is a strided shard, which the planner does not lay out yet")
    if isinstance(dim, int):
        return Shard(dim)
    if type(placement).__name__ == "Replicate":
        return Replicate()
    raise ValueError(f"placement {placement!r} is neither Shard nor Replicate (a Partial tensor cannot be sent)")


def held_from_meta(meta: Any, world_size: int) -> Held:
    """vLLM 0.33's `ParamMeta` (name, dtype, shape, owners, mesh_shape, placements) as a `Held`.
    Its rules: no owners means every rank of the trainer; no mesh, one axis over the owners; no
    placements, replicated over them."""
    dtype = str(meta.dtype).removeprefix("torch.")  # a torch dtype prints as torch.bfloat16
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"tensor {meta.name!r}: unsupported dtype {meta.dtype}")
    owners = tuple(range(world_size)) if meta.owners is None else tuple(meta.owners)
    mesh_shape = (len(owners),) if meta.mesh_shape is None else tuple(meta.mesh_shape)
    try:
        placements = ((Replicate(),) * len(mesh_shape) if meta.placements is None
                      else tuple(_placement(p) for p in meta.placements))
        return mesh_held(tuple(meta.shape), dtype, mesh_shape, placements, owners)
    except ValueError as exc:
        raise ValueError(f"tensor {meta.name!r}: {exc}") from None


def trainer_layout(manifest: Manifest, held: Callable[[TensorSpec], Held]) -> dict[str, Held]:
    """Every tensor of `manifest` laid out by `held` (e.g. `fsdp_held(8)`), in manifest order."""
    layout: dict[str, Held] = {}
    for spec in manifest.tensors:
        try:
            layout[spec.name] = held(spec)
        except ValueError as exc:
            raise ValueError(f"tensor {spec.name!r}: {exc}") from None
    return layout


def fsdp_held(world_size: int, owners: tuple[int, ...] | None = None) -> Callable[[TensorSpec], Held]:
    """FSDP2's layout: every tensor `Shard(0)` over `world_size` ranks (a scalar replicated)."""
    def held(spec: TensorSpec) -> Held:
        placement: Placement = Shard(0) if spec.shape else Replicate()
        return mesh_held(spec.shape, spec.dtype, (world_size,), (placement,), owners)
    return held


# --- Receiver side ------------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def whole(shape: tuple[int, ...], dtype: str) -> Need:
    """The whole tensor: a daemon, a direct store, or a replicated tensor of a TP worker."""
    return Need(tuple(shape), dtype, full_box(shape))


@lru_cache(maxsize=16384)
def split(shape: tuple[int, ...], dtype: str, dim: int, rank: int, size: int) -> Need:
    """Worker `rank` of `size` tensor-parallel workers: its part of `dim` (vLLM's column-parallel
    dim 0, row-parallel dim 1, vocab-parallel rows), cut as `chunk` cuts."""
    if not 0 <= dim < len(shape):
        raise ValueError(f"dim {dim} of a tensor of shape {list(shape)}")
    lo, hi = chunk(shape[dim], size, rank)
    start = tuple(lo if d == dim else 0 for d in range(len(shape)))
    stop = tuple(hi if d == dim else extent for d, extent in enumerate(shape))
    return Need(tuple(shape), dtype, Box(start, stop))


@lru_cache(maxsize=16384)
def head_split(shape: tuple[int, ...], dtype: str, dim: int, rank: int, size: int, heads: int) -> Need:
    """Grouped-query attention's k/v projection over `size` workers: with at least as many heads as
    workers each takes its share of heads; with fewer (4 KV heads over TP 8), vLLM replicates each
    head on size / heads workers, so worker `rank` needs head rank * heads // size whole."""
    if heads >= size:
        return split(shape, dtype, dim, rank, size)
    if heads < 1 or shape[dim] % heads:
        raise ValueError(f"{heads} heads along dim {dim} of a tensor of shape {list(shape)}")
    width = shape[dim] // heads
    head = rank * heads // size
    start = tuple(head * width if d == dim else 0 for d in range(len(shape)))
    stop = tuple((head + 1) * width if d == dim else extent for d, extent in enumerate(shape))
    return Need(tuple(shape), dtype, Box(start, stop))


def whole_layout(manifest: Manifest) -> dict[str, Need]:
    """A daemon's (or any whole-model receiver's) layout: every tensor whole."""
    return {spec.name: whole(spec.shape, spec.dtype) for spec in manifest.tensors}


# --- The plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transfer:
    """Elements `box` of a tensor, sent by trainer rank `source` to `receivers` (a broadcast when
    there are several, point to point when one)."""

    box: Box
    source: int
    receivers: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dtype: str
    shape: tuple[int, ...]
    transfers: tuple[Transfer, ...]
    digest: str  # sha256 of this tensor's name, dtype, shape and transfers (canonical JSON)


@dataclass(frozen=True)
class Plan:
    """A round's transfers, tensor by tensor in the trainer's order, and what they add up to."""

    tensors: tuple[TensorPlan, ...]
    sent: Mapping[int, int]  # bytes each trainer rank sends (every rank that holds anything)
    received: Mapping[int, int]  # bytes each receiver takes
    fingerprint: str  # sha256 over the tensors' digests: equal plans, equal fingerprints

    @property
    def transfer_count(self) -> int:
        return sum(len(tensor.transfers) for tensor in self.tensors)


@dataclass(frozen=True)
class _Route:
    """A transfer before its sender is chosen: any of `holders` may send it."""

    box: Box
    holders: tuple[int, ...]
    receivers: tuple[int, ...]
    nbytes: int


def _cuts(extent: int, dim: int, boxes: Iterable[Box]) -> list[int]:
    points = {0, extent}
    for box in boxes:
        points.update((box.start[dim], box.stop[dim]))
    return sorted(points)


def _cover(cuts: list[int], dim: int, boxes: Sequence[Box]) -> list[int]:
    """Per interval between consecutive cuts along `dim`: the bitmask of the boxes covering it."""
    masks = [0] * (len(cuts) - 1)
    for bit, box in enumerate(boxes):
        for interval in range(bisect.bisect_left(cuts, box.start[dim]), bisect.bisect_left(cuts, box.stop[dim])):
            masks[interval] |= 1 << bit
    return masks


def _cells(shape: tuple[int, ...], pieces: Sequence[Box], needs: Sequence[Box]) -> list[tuple[Box, int, int]]:
    """The tensor cut along every edge of every box: each needed cell with the bitmask of the
    pieces holding it and of the needs covering it (a cell lies wholly in or out of each box)."""
    cuts = [_cuts(extent, dim, [*pieces, *needs]) for dim, extent in enumerate(shape)]
    held = [_cover(cuts[dim], dim, pieces) for dim in range(len(shape))]
    wanted = [_cover(cuts[dim], dim, needs) for dim in range(len(shape))]
    everything_held, everything_wanted = (1 << len(pieces)) - 1, (1 << len(needs)) - 1
    cells = []
    for index in itertools.product(*(range(len(axis) - 1) for axis in cuts)):
        need_mask = everything_wanted
        for dim, interval in enumerate(index):
            need_mask &= wanted[dim][interval]
        if not need_mask:
            continue
        piece_mask = everything_held
        for dim, interval in enumerate(index):
            piece_mask &= held[dim][interval]
        box = Box(tuple(cuts[d][i] for d, i in enumerate(index)), tuple(cuts[d][i + 1] for d, i in enumerate(index)))
        cells.append((box, piece_mask, need_mask))
    return cells


def _merge(regions: list[tuple[Box, Any]], ndim: int) -> list[tuple[Box, Any]]:
    """Adjacent regions with the same label joined into larger boxes, one dim at a time (last dim
    first); the result sorted by position, whatever order the regions came in."""
    for dim in reversed(range(ndim)):
        def key(region: tuple[Box, Any], dim: int = dim) -> tuple[Any, ...]:
            box, label = region
            return (label, box.start[:dim] + box.start[dim + 1:], box.stop[:dim] + box.stop[dim + 1:], box.start[dim])
        merged: list[tuple[Box, Any]] = []
        for box, label in sorted(regions, key=key):
            if merged:
                last, last_label = merged[-1]
                if last_label == label and key((last, label))[1:3] == key((box, label))[1:3] \
                        and last.stop[dim] == box.start[dim]:
                    stop = last.stop[:dim] + (box.stop[dim],) + last.stop[dim + 1:]
                    merged[-1] = (Box(last.start, stop), label)
                    continue
            merged.append((box, label))
        regions = merged
    return sorted(regions, key=lambda region: (region[0].start, region[0].stop))


def _bits(mask: int) -> Iterator[int]:
    """The positions of the set bits of `mask`, lowest first (a mask has few of its many bits set)."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _mask_members(mask: int, groups: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(sorted(member for bit in _bits(mask) for member in groups[bit]))


def _routes(name: str, held: Held, needs: Sequence[tuple[Need, tuple[int, ...]]]) -> tuple[_Route, ...]:
    """One tensor's transfers, from its pieces and the distinct needs of its receivers (each need
    with the receivers that share it). Refuses bytes that some receiver needs and no rank holds."""
    for need, members in needs:
        if not within(need.box, held.shape):
            raise ValueError(f"tensor {name!r}: receiver(s) {list(members)} need {need.box}, outside its "
                             f"shape {list(held.shape)}")
    for piece in held.pieces:
        if not within(piece.box, held.shape):
            raise ValueError(f"tensor {name!r}: trainer rank(s) {list(piece.ranks)} hold {piece.box}, outside "
                             f"its shape {list(held.shape)}")
    boxes = [need.box for need, _ in needs]
    groups = [members for _, members in needs]
    cells = _cells(held.shape, [piece.box for piece in held.pieces], boxes)
    routes = []
    size = DTYPE_SIZES[held.dtype]
    for box, (piece_mask, need_mask) in _merge([(box, (p, n)) for box, p, n in cells], len(held.shape)):
        receivers = _mask_members(need_mask, groups)
        if not piece_mask:
            everyone = sorted({rank for piece in held.pieces for rank in piece.ranks})
            raise ValueError(f"tensor {name!r}: receiver(s) {list(receivers)} need {box}, which no trainer "
                             f"rank holds (ranks {everyone} hold {len(held.pieces)} piece(s) of it)")
        holders = tuple(sorted({rank for bit in _bits(piece_mask) for rank in held.pieces[bit].ranks}))
        routes.append(_Route(box, holders, receivers, box.numel * size))
    return tuple(routes)


def _receiver_groups(receivers: Mapping[int, ReceiverLayout]) -> list[tuple[ReceiverLayout, tuple[int, ...]]]:
    """Receivers with equal layouts (the same TP rank of every replica) grouped: each distinct
    layout is planned once. The same object is recognized without comparing its contents."""
    groups: list[tuple[ReceiverLayout, list[int]]] = []
    for receiver in sorted(receivers):
        layout = receivers[receiver]
        for known, members in groups:
            if known is layout or known == layout:
                members.append(receiver)
                break
        else:
            groups.append((layout, [receiver]))
    return [(layout, tuple(members)) for layout, members in groups]


def _check_names(trainer: TrainerLayout, groups: Sequence[tuple[ReceiverLayout, tuple[int, ...]]]) -> None:
    for layout, members in groups:
        missing = [name for name in layout if name not in trainer]
        if missing:
            raise ValueError(f"tensor {missing[0]!r}: receiver(s) {list(members)} need it, and no trainer rank "
                             f"holds it ({len(missing)} such tensor(s))")


def _check_agrees(name: str, held: Held, need: Need, members: tuple[int, ...]) -> None:
    if need.shape != held.shape or need.dtype != held.dtype:
        raise ValueError(f"tensor {name!r}: the trainer's layout says {held.dtype} {list(held.shape)}, receiver(s) "
                         f"{list(members)} say {need.dtype} {list(need.shape)}")


@dataclass(frozen=True)
class _Template:
    """The routes of every tensor with one layout, and what they add up to, computed once."""

    routes: tuple[_Route, ...]
    choices: tuple[int, ...]  # the routes several ranks hold: their sender is chosen per tensor
    forced: Mapping[int, int]  # bytes per rank of the routes one rank alone holds
    received: Mapping[int, int]  # bytes per receiver

    @classmethod
    def of(cls, routes: tuple[_Route, ...]) -> _Template:
        forced: Counter[int] = Counter()
        received: Counter[int] = Counter()
        for route in routes:
            if len(route.holders) == 1:
                forced[route.holders[0]] += route.nbytes
            for receiver in route.receivers:
                received[receiver] += route.nbytes
        choices = tuple(at for at, route in enumerate(routes) if len(route.holders) > 1)
        return cls(routes, choices, dict(forced), dict(received))


def _templates(trainer: TrainerLayout, receivers: Mapping[int, ReceiverLayout]) -> list[tuple[str, _Template]]:
    """Every tensor's template; tensors with the same `Held` and the same needs objects share one
    (recognized by identity first, then by value), so the work is per distinct layout."""
    groups = _receiver_groups(receivers)
    _check_names(trainer, groups)
    by_identity: dict[tuple[int, ...], _Template] = {}
    by_value: dict[tuple[Any, ...], _Template] = {}
    keep: list[Any] = []  # the objects whose ids key `by_identity` stay alive while it is used
    result = []
    names = list(trainer)
    # Per tensor, each group's need: looked up a group at a time (C loops: tensors × groups lookups).
    for name, held, *needs in zip(names, trainer.values(), *(map(layout.get, names) for layout, _ in groups),
                                  strict=True):
        identity = (id(held), *map(id, needs))
        template = by_identity.get(identity)
        if template is None:
            present = [(need, members) for need, (_, members) in zip(needs, groups, strict=True) if need is not None]
            for need, members in present:
                _check_agrees(name, held, need, members)
            value = (held, *needs)
            template = by_value.get(value)
            if template is None:
                template = by_value[value] = _Template.of(_routes(name, held, present))
            by_identity[identity] = template
            keep.append(value)
        result.append((name, template))
    return result


def _assign(tensors: Sequence[tuple[str, _Template]], ranks: Iterable[int]) -> tuple[dict[int, int],
                                                                                    dict[tuple[int, int], int]]:
    """Senders for the routes several ranks could send: the forced bytes first, then the choices
    biggest first, each to its least-loaded holder (ties to the lowest rank). Returns the bytes
    per rank and the chosen sender per (tensor index, route index)."""
    sent = dict.fromkeys(sorted(ranks), 0)
    usage = Counter(id(template) for _, template in tensors)
    distinct = {id(template): template for _, template in tensors}
    for key, template in distinct.items():
        for rank, nbytes in template.forced.items():
            sent[rank] += nbytes * usage[key]
    choices = [(-template.routes[at].nbytes, index, at) for index, (_, template) in enumerate(tensors)
               for at in template.choices]
    chosen = {}
    for _, index, at in sorted(choices):
        route = tensors[index][1].routes[at]
        source = min(route.holders, key=lambda rank: (sent[rank], rank))
        sent[source] += route.nbytes
        chosen[index, at] = source
    return sent, chosen


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def _transfers(template: _Template, index: int, chosen: Mapping[tuple[int, int], int]) -> tuple[Transfer, ...]:
    return tuple(Transfer(route.box, chosen.get((index, at), route.holders[0]), route.receivers, route.nbytes)
                 for at, route in enumerate(template.routes))


def _tensor_digest(name: str, held: Held, transfers_digest: str) -> str:
    """sha256 of `[name, dtype, shape, transfers' digest]` as compact JSON (written out: once per
    tensor, so a model of 70,000 tensors digests in a fraction of a second)."""
    line = '[%s,"%s",[%s],"%s"]' % (json.dumps(name), held.dtype, ",".join(map(str, held.shape)), transfers_digest)
    return hashlib.sha256(line.encode()).hexdigest()


def _transfers_digest(transfers: tuple[Transfer, ...]) -> str:
    return _digest([[list(t.box.start), list(t.box.stop), t.source, list(t.receivers)] for t in transfers])


def plan(trainer: TrainerLayout, receivers: Mapping[int, ReceiverLayout]) -> Plan:
    """The transfers of a round from the trainer's layout and each receiver's: every receiver gets
    exactly the elements it needs, each element leaves one trainer rank once per group of
    receivers needing it, replicas' bytes balanced over their holders. A pure function of the
    layouts (derive it once per layout: `PlanCache`). Raises ValueError naming the tensor and the
    ranks where a receiver needs bytes no trainer rank holds, or the two sides disagree on a
    tensor's shape or dtype. Tensors of one layout without choices share their transfers."""
    tensors = _templates(trainer, receivers)
    ranks = {rank for held in {id(h): h for h in trainer.values()}.values() for p in held.pieces for rank in p.ranks}
    sent, chosen = _assign(tensors, ranks)
    received = dict.fromkeys(sorted(receivers), 0)
    shared: dict[int, tuple[tuple[Transfer, ...], str]] = {}
    plans = []
    for index, (name, template) in enumerate(tensors):
        entry = shared.get(id(template))
        if entry is None:
            transfers = _transfers(template, index, chosen)
            entry = (transfers, _transfers_digest(transfers))
            if not template.choices:
                shared[id(template)] = entry
        held = trainer[name]
        plans.append(TensorPlan(name, held.dtype, held.shape, entry[0], _tensor_digest(name, held, entry[1])))
    usage = Counter(id(template) for _, template in tensors)
    for template in {id(template): template for _, template in tensors}.values():
        for receiver, nbytes in template.received.items():
            received[receiver] += nbytes * usage[id(template)]
    fingerprint = hashlib.sha256("\n".join(p.digest for p in plans).encode()).hexdigest()
    return Plan(tuple(plans), sent, received, fingerprint)


# --- Agreeing on the plan -----------------------------------------------------------------------

def plan_digests(plan: Plan) -> tuple[tuple[str, str], ...]:
    """What a party sends to compare plans (JSON-able): each tensor's name and digest."""
    return tuple((tensor.name, tensor.digest) for tensor in plan.tensors)


def plan_mismatch(mine: Plan | Sequence[tuple[str, str]], my_rank: str,
                  theirs: Plan | Sequence[tuple[str, str]], their_rank: str) -> str | None:
    """None where two parties derived the same plan; else a sentence naming the first tensor where
    they differ and both parties (e.g. "trainer rank 3", "receiver 5"), as the manifest check does."""
    ours = plan_digests(mine) if isinstance(mine, Plan) else tuple(tuple(item) for item in mine)
    other = plan_digests(theirs) if isinstance(theirs, Plan) else tuple(tuple(item) for item in theirs)
    for (name, digest), (other_name, other_digest) in zip(ours, other, strict=False):
        if name != other_name:
            return f"plans differ in their tensors: {my_rank} plans {name!r} where {their_rank} plans {other_name!r}"
        if digest != other_digest:
            return f"plans differ at tensor {name!r}: {my_rank} and {their_rank} derived different transfers"
    if len(ours) != len(other):
        longer, rank = (ours, my_rank) if len(ours) > len(other) else (other, their_rank)
        return f"plans differ in their tensors: only {rank} plans {longer[min(len(ours), len(other))][0]!r}"
    return None


def check_same_plan(mine: Plan | Sequence[tuple[str, str]], my_rank: str,
                    theirs: Plan | Sequence[tuple[str, str]], their_rank: str) -> None:
    """Refuse (ValueError) two parties' plans that differ, naming the tensor and both parties."""
    mismatch = plan_mismatch(mine, my_rank, theirs, their_rank)
    if mismatch is not None:
        raise ValueError(mismatch)


class PlanCache:
    """One plan per layout, reused every round: recomputed only when a layout (or the set of
    receivers) changes. Unchanged layouts compare equal in little time (shared objects)."""

    def __init__(self) -> None:
        self._key: tuple[dict[str, Held], list[tuple[dict[str, Need], tuple[int, ...]]]] | None = None
        self._plan: Plan | None = None

    def get(self, trainer: TrainerLayout, receivers: Mapping[int, ReceiverLayout]) -> Plan:
        """The plan of these layouts: the last one when they equal the last call's (a snapshot of
        each distinct layout is kept, so changing a layout in place is noticed too)."""
        key = (dict(trainer), [(dict(layout), members) for layout, members in _receiver_groups(receivers)])
        if self._plan is None or self._key != key:
            self._plan, self._key = plan(trainer, receivers), key
        return self._plan
