"""The layouts a planned round starts from: what each trainer rank holds, what each receiver needs.

A planned round (`weightsync.planned`) sends every byte from a trainer rank that holds it, so
the trainer side must say, per tensor, which rank holds which region. That is read here from
the live tensors without materializing anything: a `DTensor`'s placements and mesh (FSDP2's
`fully_shard`, `distribute_tensor`) give its `Held` through the planner's `mesh_held`; a plain
tensor is held whole by the rank that has it (a single-process trainer: rank 0 owns all). The
bytes to send come from the local shard (`to_local()`), never from `full_tensor()`.

The layouts travel as compact JSON (no pickle): a trainer rank's list of
`[name, dtype, shape, mesh_shape, placements, owners]` (a placement: the sharded dim, or -1 for
replicated), a receiver's list of `[name, dtype, shape, start, stop]`. Every party decodes the
same JSON into the same `Held`/`Need` objects (the planner's builders are cached, so equal
layouts share objects and plan once).

Trainer ranks are the transfer group's ranks 0..M-1 in the trainer's own rank order: a mesh's
global ranks are its owners as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.dtypes import dtype_name
from weightsync.plan import Box, Held, Need, Placement, Replicate, Shard, _placement, mesh_held, whole
from weightsync.protocol import Manifest


@dataclass(frozen=True)
class LocalShard:
    """What this trainer rank holds of one tensor: its local bytes and the region they are."""

    tensor: torch.Tensor  # the local shard (a plain tensor: the whole tensor), contiguous
    box: Box  # where `tensor` sits in the full tensor


@dataclass(frozen=True)
class TrainerHoldings:
    """This trainer rank's layout entries (JSON-able) and its local shards, in the round's order."""

    entries: list[list[Any]]
    shards: dict[str, LocalShard]


def _mesh_of(name: str, tensor: Any) -> tuple[tuple[int, ...], tuple[Placement, ...], tuple[int, ...]]:
    """A DTensor's mesh shape, placements (ours) and owners (the mesh's global ranks, row-major)."""
    mesh = tensor.device_mesh
    try:
        placements = tuple(_placement(p) for p in tensor.placements)
    except ValueError as exc:
        raise ValueError(f"tensor {name!r}: {exc}") from None
    owners = tuple(int(rank) for rank in mesh.mesh.flatten().tolist())
    return tuple(int(size) for size in mesh.mesh.shape), placements, owners


def _encode_placements(placements: Sequence[Placement]) -> list[int]:
    return [p.dim if isinstance(p, Shard) else -1 for p in placements]


def holdings(named: Iterable[tuple[str, torch.Tensor]], rank: int) -> TrainerHoldings:
    """This trainer rank's layout and local shards. A DTensor (duck-typed: `to_local`,
    `placements`, `device_mesh`) is described by its placements, its local shard kept as it is;
    any other tensor is held whole by `rank`. Raises ValueError naming a tensor whose local
    shard is not where its placements say (or a placement the planner cannot lay out)."""
    entries: list[list[Any]] = []
    shards: dict[str, LocalShard] = {}
    for name, tensor in named:
        dtype = dtype_name(tensor.dtype)
        shape = tuple(int(n) for n in tensor.shape)
        to_local = getattr(tensor, "to_local", None)
        if callable(to_local) and hasattr(tensor, "placements"):
            mesh_shape, placements, owners = _mesh_of(name, tensor)
            local = to_local().detach()
        else:
            mesh_shape, placements, owners, local = (1,), (Replicate(),), (rank,), tensor.detach()
        held = mesh_held(shape, dtype, mesh_shape, placements, owners)
        boxes = [piece.box for piece in held.pieces if rank in piece.ranks]
        if not boxes:
            raise ValueError(f"tensor {name!r}: trainer rank {rank} is not among its owners {list(owners)}")
        box = boxes[0]
        extent = tuple(hi - lo for lo, hi in zip(box.start, box.stop, strict=True))
        if tuple(local.shape) != extent:
            raise ValueError(f"tensor {name!r}: trainer rank {rank}'s local shard is {list(local.shape)}, "
                             f"its placements say {box}")
        entries.append([name, dtype, list(shape), list(mesh_shape), _encode_placements(placements), list(owners)])
        shards[name] = LocalShard(local.contiguous(), box)
    return TrainerHoldings(entries, shards)


def trainer_message(held: TrainerHoldings, trainers: int) -> bytes:
    return json.dumps({"role": "trainer", "trainers": trainers, "tensors": held.entries},
                      separators=(",", ":")).encode()


def receiver_message(needs: Mapping[str, Need]) -> bytes:
    tensors = [[name, need.dtype, list(need.shape), list(need.box.start), list(need.box.stop)]
               for name, need in needs.items()]
    return json.dumps({"role": "receiver", "tensors": tensors}, separators=(",", ":")).encode()


def whole_needs(manifest: Manifest) -> dict[str, Need]:
    """A daemon-style store's needs: every tensor it holds, whole."""
    return {spec.name: whole(tuple(spec.shape), spec.dtype) for spec in manifest.tensors}


def decode_trainer(entries: Sequence[Sequence[Any]]) -> dict[str, Held]:
    """One trainer rank's layout entries as the planner's `Held`s (shared objects per layout)."""
    layout: dict[str, Held] = {}
    for name, dtype, shape, mesh_shape, placements, owners in entries:
        kinds = tuple(Shard(int(d)) if int(d) >= 0 else Replicate() for d in placements)
        layout[str(name)] = mesh_held(tuple(int(n) for n in shape), str(dtype), tuple(int(n) for n in mesh_shape),
                                      kinds, tuple(int(r) for r in owners))
    return layout


def decode_receiver(entries: Sequence[Sequence[Any]]) -> dict[str, Need]:
    needs: dict[str, Need] = {}
    for name, dtype, shape, start, stop in entries:
        shape_t = tuple(int(n) for n in shape)
        box = Box(tuple(int(n) for n in start), tuple(int(n) for n in stop))
        needs[str(name)] = whole(shape_t, str(dtype)) if box.start == (0,) * len(shape_t) and \
            box.stop == shape_t else Need(shape_t, str(dtype), box)
    return needs


def trainers_disagree(layouts: Mapping[int, Sequence[Sequence[Any]]]) -> str | None:
    """Where the trainer ranks' layouts differ (each rank describes every tensor's placement, so
    all must say the same): the first tensor and the two ranks, or None."""
    first_rank = min(layouts)
    reference = layouts[first_rank]
    for rank, entries in sorted(layouts.items()):
        for mine, theirs in zip(reference, entries, strict=False):
            if list(mine) != list(theirs):
                return (f"tensor {mine[0]!r}: trainer ranks {first_rank} and {rank} describe it differently "
                        f"({mine[1:]} vs {list(theirs)})")
        if len(reference) != len(entries):
            return (f"trainer ranks {first_rank} and {rank} hold {len(reference)} and {len(entries)} tensors "
                    "(every rank must list every tensor, in the same order)")
    return None
