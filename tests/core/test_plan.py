"""The planner (weightsync.plan): every receiver gets exactly the elements it needs, each element
leaves one trainer rank once, replicas' bytes are spread over their holders, and a plan that
cannot be made (bytes nobody holds, layouts that disagree) is refused naming the tensor and the
ranks. Pure Python, no processes: boxes are painted into small numpy arrays to check coverage."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightsync.plan import (
    Box, Held, Need, Piece, PlanCache, Replicate, Shard, check_same_plan, chunk, fsdp_held, head_split,
    held_from_meta, mesh_held, plan, plan_digests, plan_mismatch, single_owner, split, trainer_layout, whole,
    whole_layout,
)
from weightsync.protocol import DTYPE_SIZES, Manifest, TensorSpec

BF16 = "bfloat16"


def manifest(*shapes: tuple[int, ...], dtype: str = BF16) -> Manifest:
    return Manifest(tensors=tuple(TensorSpec(name=f"t{i}", dtype=dtype, shape=shape) for i, shape in enumerate(shapes)))


def region(box: Box) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in zip(box.start, box.stop, strict=True))


def check_exact(trainer, receivers, result) -> None:
    """Every receiver's needed elements arrive exactly once and nothing else does; each element
    leaves the trainer at most once (one transfer reaches all who need it); every transfer's
    source holds what it sends; the per-rank and per-receiver byte counts add up."""
    sent = dict.fromkeys(result.sent, 0)
    received = dict.fromkeys(receivers, 0)
    for tensor in result.tensors:
        held = trainer[tensor.name]
        leaving = np.zeros(held.shape, dtype=np.int64)
        arriving = {receiver: np.zeros(held.shape, dtype=np.int64) for receiver in receivers}
        for transfer in tensor.transfers:
            leaving[region(transfer.box)] += 1
            holds = np.zeros(held.shape, dtype=bool)
            for piece in held.pieces:
                if transfer.source in piece.ranks:
                    holds[region(piece.box)] = True
            assert holds[region(transfer.box)].all(), (tensor.name, transfer)
            assert transfer.receivers and transfer.nbytes == transfer.box.numel * DTYPE_SIZES[held.dtype]
            sent[transfer.source] += transfer.nbytes
            for receiver in transfer.receivers:
                arriving[receiver][region(transfer.box)] += 1
                received[receiver] += transfer.nbytes
        assert leaving.max(initial=0) <= 1, tensor.name
        for receiver, layout in receivers.items():
            expected = np.zeros(held.shape, dtype=np.int64)
            if tensor.name in layout:
                expected[region(layout[tensor.name].box)] = 1
            assert np.array_equal(arriving[receiver], expected), (tensor.name, receiver)
    assert sent == dict(result.sent)
    assert received == dict(result.received)


def tp_layout(spec_dims: dict[str, tuple[tuple[int, ...], int | None]], rank: int, size: int) -> dict[str, Need]:
    """A TP worker's needs: per tensor (shape, dim split or None for replicated)."""
    return {name: whole(shape, BF16) if dim is None else split(shape, BF16, dim, rank, size)
            for name, (shape, dim) in spec_dims.items()}


# --- The trainer side's builders ----------------------------------------------------------------

@pytest.mark.parametrize(("size", "parts"), list(itertools.product(range(0, 13), range(1, 6))))
def test_chunk_cuts_as_torch_chunk_does(size, parts):
    """DTensor's Shard and FSDP2 cut as torch.chunk does: uneven last parts, empty trailing ones."""
    ours = [chunk(size, parts, index) for index in range(parts)]
    theirs = [(int(c[0]), int(c[-1]) + 1) if len(c) else None for c in torch.arange(size).chunk(parts)] if size else []
    nonempty = [(lo, hi) for lo, hi in ours if hi > lo]
    assert nonempty == [c for c in theirs if c is not None]
    assert all(hi == lo == size for lo, hi in ours[len(nonempty):])


def test_a_nested_mesh_tiles_the_tensor():
    """FSDP Shard(0) × TP Shard(1) over a 2×3 mesh: six disjoint pieces, rank = row-major index."""
    held = mesh_held((5, 7), BF16, (2, 3), (Shard(0), Shard(1)))
    painted = np.zeros((5, 7), dtype=np.int64)
    for piece in held.pieces:
        painted[region(piece.box)] += 1
    assert (painted == 1).all()
    by_rank = {piece.ranks[0]: piece.box for piece in held.pieces}
    assert by_rank[0] == Box((0, 0), (3, 3)) and by_rank[5] == Box((3, 6), (5, 7))


def test_two_axes_sharding_one_dim_nest_outer_first():
    held = mesh_held((10,), BF16, (2, 2), (Shard(0), Shard(0)))
    assert [(piece.box, piece.ranks) for piece in held.pieces] == [
        (Box((0,), (3,)), (0,)), (Box((3,), (5,)), (1,)), (Box((5,), (8,)), (2,)), (Box((8,), (10,)), (3,))]


def test_replicas_are_one_piece_with_several_ranks():
    held = mesh_held((8, 4), BF16, (2, 2), (Replicate(), Shard(0)), (10, 11, 12, 13))
    assert [(piece.box, piece.ranks) for piece in held.pieces] == [
        (Box((0, 0), (4, 4)), (10, 12)), (Box((4, 0), (8, 4)), (11, 13))]


def test_vllm_param_meta_becomes_a_layout():
    """vLLM 0.33's ParamMeta: owners, mesh_shape and placements (its own Shard/Replicate classes,
    read by duck type); no owners means every rank holds it whole."""
    class Replicate:  # vLLM's classes, as the planner sees them: by attribute and name
        pass

    meta = SimpleNamespace(name="w", dtype="torch.bfloat16", shape=(6, 4), owners=(4, 5, 6, 7), mesh_shape=(2, 2),
                           placements=(SimpleNamespace(dim=0), Replicate()))
    held = held_from_meta(meta, world_size=8)
    assert held.dtype == BF16
    assert [(piece.box, piece.ranks) for piece in held.pieces] == [
        (Box((0, 0), (3, 4)), (4, 5)), (Box((3, 0), (6, 4)), (6, 7))]
    everyone = held_from_meta(SimpleNamespace(name="n", dtype=BF16, shape=(4,), owners=None, mesh_shape=None,
                                              placements=None), world_size=3)
    assert everyone.pieces == (Piece(Box((0,), (4,)), (0, 1, 2)),)
    with pytest.raises(ValueError, match="tensor 'x'"):
        held_from_meta(SimpleNamespace(name="x", dtype=BF16, shape=(4,), owners=(0, 1), mesh_shape=(2,),
                                       placements=(SimpleNamespace(dim=3),)), world_size=2)
    with pytest.raises(ValueError, match="tensor 'x'.*strided shard"):  # torch's _StridedShard: not a plain Shard
        held_from_meta(SimpleNamespace(name="x", dtype=BF16, shape=(4,), owners=(0, 1), mesh_shape=(2,),
                                       placements=(SimpleNamespace(dim=0, split_factor=2),)), world_size=2)


# --- Exactness ----------------------------------------------------------------------------------

LAYOUTS = {
    "fsdp 4 -> tp 2 x 2 replicas": (
        lambda m: trainer_layout(m, fsdp_held(4)),
        lambda r: tp_layout({"t0": ((10, 6), 0), "t1": ((6, 10), 1), "t2": ((6,), None)}, r % 2, 2), 4),
    "fsdp x tp (2, 2) -> tp 4": (
        lambda m: {s.name: mesh_held(s.shape, BF16, (2, 2), (Shard(0), Shard(len(s.shape) - 1))) for s in m.tensors},
        lambda r: tp_layout({"t0": ((10, 6), 0), "t1": ((6, 10), 1), "t2": ((6,), None)}, r, 4), 4),
    "single sender -> daemons": (
        lambda m: {s.name: single_owner(s.shape, BF16) for s in m.tensors}, lambda r: None, 3),
    "hsdp (2 replicas x 3) -> tp 3": (
        lambda m: {s.name: mesh_held(s.shape, BF16, (2, 3), (Replicate(), Shard(0))) for s in m.tensors},
        lambda r: tp_layout({"t0": ((10, 6), 0), "t1": ((6, 10), 1), "t2": ((6,), 0)}, r, 3), 3),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_every_receiver_gets_exactly_what_it_needs(case):
    build_trainer, build_receiver, receivers = LAYOUTS[case]
    m = manifest((10, 6), (6, 10), (6,))
    trainer = build_trainer(m)
    layouts = {r: build_receiver(r) or whole_layout(m) for r in range(receivers)}
    check_exact(trainer, layouts, plan(trainer, layouts))


def test_a_single_sender_broadcasts_each_tensor_once():
    """The single-sender round is the M = 1 case: one broadcast per tensor, to every receiver."""
    m = manifest((4, 4), (3,), ())
    trainer = {s.name: single_owner(s.shape, BF16) for s in m.tensors}
    result = plan(trainer, {r: whole_layout(m) for r in range(3)})
    assert [len(t.transfers) for t in result.tensors] == [1, 1, 1]
    assert all(t.transfers[0].receivers == (0, 1, 2) and t.transfers[0].source == 0 for t in result.tensors)
    assert result.sent == {0: m.nbytes}


def test_uneven_shards_and_empty_chunks():
    """5 rows over 4 FSDP ranks: 2, 2, 1, 0; the last rank holds nothing and sends nothing."""
    m = manifest((5, 3), (3, 5), (2,))
    trainer = trainer_layout(m, fsdp_held(4))
    layouts = {r: {"t0": split((5, 3), BF16, 0, r, 3), "t1": split((3, 5), BF16, 1, r, 3),
                   "t2": whole((2,), BF16)} for r in range(3)}
    result = plan(trainer, layouts)
    check_exact(trainer, layouts, result)
    assert result.sent[3] == 0 and set(result.sent) == {0, 1, 2, 3}


def test_gqa_heads_replicated_over_workers_travel_as_broadcasts():
    """4 KV heads over TP 8: vLLM gives each head to 2 workers; each head leaves once, to both."""
    shape = (4 * 16, 32)
    trainer = {"k": mesh_held(shape, BF16, (8,), (Shard(0),))}
    layouts = {r: {"k": head_split(shape, BF16, 0, r, 8, 4)} for r in range(8)}
    result = plan(trainer, layouts)
    check_exact(trainer, layouts, result)
    assert sorted({t.receivers for t in result.tensors[0].transfers}) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert set(result.received.values()) == {16 * 32 * 2}


boxes_1d = st.integers(0, 9).flatmap(lambda lo: st.integers(lo, 9).map(lambda hi: (lo, hi)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.tuples(st.integers(0, 9), st.integers(1, 7)),
       mesh=st.sampled_from([((1,), (Replicate(),)), ((3,), (Shard(0),)), ((4,), (Shard(1),)),
                             ((2, 2), (Shard(0), Shard(1))), ((2, 3), (Replicate(), Shard(0))),
                             ((2, 2), (Shard(0), Shard(0)))]),
       tp=st.integers(1, 4), dim=st.integers(0, 1), replicas=st.integers(1, 3),
       extra=st.lists(st.tuples(boxes_1d, boxes_1d), max_size=3))
def test_exactness_holds_for_any_layouts(shape, mesh, tp, dim, replicas, extra):
    """Any mesh layout against TP receivers (several replicas) plus receivers needing arbitrary,
    overlapping boxes: exact coverage, each element sent at most once."""
    trainer = {"w": mesh_held(shape, BF16, *mesh)}
    layouts = {r: {"w": split(shape, BF16, dim, r % tp, tp)} for r in range(tp * replicas)}
    for (lo0, hi0), (lo1, hi1) in extra:
        box = Box((min(lo0, shape[0]), min(lo1, shape[1])), (min(hi0, shape[0]), min(hi1, shape[1])))
        layouts[len(layouts)] = {"w": Need(shape, BF16, box)}
    check_exact(trainer, layouts, plan(trainer, layouts))


# --- Bytes per party ----------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [2, 4])
def test_fsdp_to_tp2_receivers_take_their_half_plus_replicated(ranks):
    """FSDP Shard(0) over 2 and 4 ranks into two TP-2 replicas: each worker takes sharded / 2 +
    replicated bytes; each trainer rank sends its shard once (both replicas in one broadcast)."""
    dims = {"q": ((64, 32), 0), "o": ((32, 64), 1), "up": ((96, 32), 0), "down": ((32, 96), 1),
            "norm": ((32,), None), "embed": ((128, 32), 0)}
    m = Manifest(tensors=tuple(TensorSpec(name=n, dtype=BF16, shape=s) for n, (s, _) in dims.items()))
    trainer = trainer_layout(m, fsdp_held(ranks))
    layouts = {r: tp_layout(dims, r % 2, 2) for r in range(4)}
    result = plan(trainer, layouts)
    check_exact(trainer, layouts, result)
    replicated = sum(s.nbytes for s in m.tensors if dims[s.name][1] is None)
    sharded = m.nbytes - replicated
    for got in result.received.values():
        assert abs(got - (sharded / 2 + replicated)) <= 0.1 * (sharded / 2 + replicated)
    assert sum(result.sent.values()) == m.nbytes
    for got in result.sent.values():
        assert abs(got - m.nbytes / ranks) <= 0.1 * m.nbytes / ranks


def test_replicated_tensors_are_spread_over_their_holders():
    """A data-parallel trainer (every rank holds everything): the sends spread within 10 %."""
    sizes = [(1 + (i * 37) % 23, 64) for i in range(60)]
    m = manifest(*sizes)
    trainer = trainer_layout(m, lambda spec: mesh_held(spec.shape, BF16, (4,), (Replicate(),)))
    result = plan(trainer, {r: whole_layout(m) for r in range(2)})
    mean = m.nbytes / 4
    assert all(abs(sent - mean) <= 0.1 * mean for sent in result.sent.values()), result.sent
    check_exact(trainer, {r: whole_layout(m) for r in range(2)}, result)


def test_hsdp_replicas_share_the_sending():
    """HSDP (2 replicas × 2 shards): each shard has two holders, and both send."""
    m = manifest(*[(8, 16)] * 10)
    trainer = trainer_layout(m, lambda spec: mesh_held(spec.shape, BF16, (2, 2), (Replicate(), Shard(0))))
    result = plan(trainer, {0: whole_layout(m)})
    assert set(result.sent) == {0, 1, 2, 3}
    assert all(sent == m.nbytes / 4 for sent in result.sent.values()), result.sent


def test_shared_layouts_keep_a_large_model_fast():
    """Per tensor work, shared between tensors of the same layout: 20,000 expert-like tensors over
    64 FSDP ranks into 4 TP-8 replicas plan in well under the time of touching their elements."""
    shapes = [(256, 512), (512, 256)] * 10_000
    m = manifest(*shapes)
    trainer = trainer_layout(m, fsdp_held(64))
    layouts_by_tp = [{s.name: split(s.shape, BF16, i % 2, r, 8) for i, s in enumerate(m.tensors)} for r in range(8)]
    started = time.perf_counter()
    result = plan(trainer, {r: layouts_by_tp[r % 8] for r in range(32)})
    assert time.perf_counter() - started < 5
    assert sum(result.sent.values()) == m.nbytes
    assert set(result.received.values()) == {m.nbytes // 8}


# --- Refusals -----------------------------------------------------------------------------------

def test_bytes_no_rank_holds_are_refused_naming_tensor_and_receivers():
    trainer = {"w": Held((8, 4), BF16, (Piece(Box((0, 0), (4, 4)), (0,)),))}
    layouts = {0: {"w": split((8, 4), BF16, 0, 0, 2)}, 1: {"w": split((8, 4), BF16, 0, 1, 2)}}
    with pytest.raises(ValueError, match=r"tensor 'w': receiver\(s\) \[1\] need \[4:8, 0:4\], which no trainer rank"):
        plan(trainer, layouts)


def test_a_tensor_missing_on_the_trainer_is_refused():
    trainer = {"a": single_owner((4,), BF16)}
    with pytest.raises(ValueError, match=r"tensor 'b': receiver\(s\) \[0, 1\] need it"):
        plan(trainer, {0: {"a": whole((4,), BF16), "b": whole((4,), BF16)},
                       1: {"a": whole((4,), BF16), "b": whole((4,), BF16)}})


@pytest.mark.parametrize(("shape", "dtype", "said"), [((4, 5), BF16, r"bfloat16 \[4, 5\]"),
                                                      ((4, 4), "float16", r"float16 \[4, 4\]")])
def test_layouts_disagreeing_on_shape_or_dtype_are_refused(shape, dtype, said):
    trainer = {"w": mesh_held((4, 4), BF16, (2,), (Shard(0),))}
    with pytest.raises(ValueError, match=rf"tensor 'w': the trainer's layout says bfloat16 \[4, 4\], "
                                         rf"receiver\(s\) \[1\] say {said}"):
        plan(trainer, {0: {"w": whole((4, 4), BF16)}, 1: {"w": whole(shape, dtype)}})


def test_a_need_outside_the_tensor_is_refused():
    trainer = {"w": single_owner((4,), BF16)}
    with pytest.raises(ValueError, match="tensor 'w'.*outside its shape"):
        plan(trainer, {0: {"w": Need((4,), BF16, Box((2,), (6,)))}})


# --- Agreeing on the plan -----------------------------------------------------------------------

def test_parties_deriving_from_equal_layouts_get_equal_fingerprints():
    """Two parties build their layouts independently (different objects): the same plan."""
    def derive():
        mesh_held.cache_clear()
        split.cache_clear()
        m = manifest((10, 6), (6, 10))
        return plan(trainer_layout(m, fsdp_held(4)),
                    {r: {"t0": split((10, 6), BF16, 0, r % 2, 2), "t1": split((6, 10), BF16, 1, r % 2, 2)}
                     for r in range(4)})

    first, second = derive(), derive()
    assert first.fingerprint == second.fingerprint
    assert plan_mismatch(first, "trainer rank 0", second, "receiver 3") is None
    check_same_plan(plan_digests(first), "trainer rank 0", list(plan_digests(second)), "receiver 3")


def test_a_different_layout_is_named_at_its_first_tensor():
    m = manifest((10, 6), (6, 10), (6,))
    layouts = {r: whole_layout(m) for r in range(2)}
    mine = plan(trainer_layout(m, fsdp_held(4)), layouts)
    changed = trainer_layout(m, fsdp_held(4))
    changed["t1"] = mesh_held((6, 10), BF16, (4,), (Shard(1),))
    theirs = plan(changed, layouts)
    assert mine.fingerprint != theirs.fingerprint
    assert plan_mismatch(mine, "trainer rank 2", theirs, "receiver 1") == (
        "plans differ at tensor 't1': trainer rank 2 and receiver 1 derived different transfers")
    with pytest.raises(ValueError, match="tensor 't1': trainer rank 2 and receiver 1"):
        check_same_plan(mine, "trainer rank 2", theirs, "receiver 1")
    shorter = plan({"t0": changed["t0"]}, {r: {"t0": layouts[r]["t0"]} for r in range(2)})
    assert plan_mismatch(mine, "trainer rank 2", shorter, "receiver 1") == (
        "plans differ in their tensors: only trainer rank 2 plans 't1'")


def test_the_plan_is_reused_until_a_layout_changes():
    m = manifest((10, 6), (6,))
    cache = PlanCache()
    trainer = trainer_layout(m, fsdp_held(2))
    layouts = {r: whole_layout(m) for r in range(2)}
    first = cache.get(trainer, layouts)
    assert cache.get(trainer_layout(m, fsdp_held(2)), {r: whole_layout(m) for r in range(2)}) is first
    layouts[1]["t0"] = split((10, 6), BF16, 0, 1, 2)  # changed in place: noticed
    again = cache.get(trainer, layouts)
    assert again is not first and again.received[1] < first.received[1]
    assert cache.get(trainer, {**layouts, 2: whole_layout(m)}) is not again  # a receiver joined


# --- benchmarks/scale.py ------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "published"), [("qwen3", 235e9), ("kimi", 1.04e12), ("llama", 70.6e9)])
def test_the_scale_benchmarks_models_match_their_published_sizes(key, published):
    """The tensor lists written from the published configs add up to the published totals."""
    from benchmarks.scale import MODELS

    params = sum(int(np.prod(shape)) for _, shape in MODELS[key].tensors())
    assert abs(params - published) <= 0.02 * published


def test_the_scale_benchmark_prints_its_table(capsys):
    """The smallest setup end to end: the plan beats the single sender on the busiest link."""
    from benchmarks.scale import main

    assert main(["--only", "llama"]) == 0
    out = capsys.readouterr().out
    assert "Llama-3.1-70B: 70.6 B parameters" in out
    assert "plan: 32 senders, no gather" in out and "17.6 GB  engine GPU" in out
