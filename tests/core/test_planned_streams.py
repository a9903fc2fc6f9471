"""A planned round's streams without processes: what each trainer rank packs from its shards is
what each receiver unpacks into its regions, chunk by chunk, for boxes that are contiguous in
neither the shard nor the target (a Shard(0) trainer to tensor-parallel receivers split on dim 1),
with the same per-stream checksum on both sides; and the layouts' JSON decodes to the planner's
objects."""

from __future__ import annotations

import json

import torch

from weightsync.integrity import StreamDigest
from weightsync.plan import Replicate, Shard, mesh_held, plan, split, whole
from weightsync.planned_layout import (
    decode_receiver, decode_trainer, holdings, receiver_message, trainer_message, trainers_disagree,
)
from weightsync.planned_streams import Packer, Unpacker, region, streams_of


def test_streams_carry_each_box_from_its_shard_to_its_target_chunk_by_chunk():
    full = {"w": torch.arange(7 * 6, dtype=torch.float32).reshape(7, 6), "b": torch.arange(5, dtype=torch.int64)}
    trainer = {name: mesh_held(tuple(t.shape), "float32" if t.is_floating_point() else "int64", (2,), (Shard(0),))
               for name, t in full.items()}
    receivers = {2: {"w": split((7, 6), "float32", 1, 0, 2), "b": whole((5,), "int64")},
                 3: {"w": split((7, 6), "float32", 1, 1, 2)}}
    streams = streams_of(plan(trainer, receivers))
    assert set(streams) == {(0, 2), (1, 2), (0, 3), (1, 3)}
    targets = {r: {name: torch.zeros_like(full[name]) for name in full} for r in receivers}
    for (sender, receiver), stream in streams.items():
        def source_of(segment, sender=sender):
            box = next(p.box for p in trainer[segment.name].pieces if sender in p.ranks)
            shard = region(full[segment.name], whole(tuple(full[segment.name].shape), "x").box, box).clone()
            return region(shard, box, segment.box)

        def target_of(segment, receiver=receiver):
            tensor = targets[receiver][segment.name]
            return region(tensor, whole(tuple(tensor.shape), "x").box, segment.box)

        pack, unpack = Packer(stream.segments, source_of), Unpacker(stream.segments, target_of)
        sent, landed = StreamDigest("cpu"), StreamDigest("cpu")
        for position in range(0, stream.nbytes, 16):  # chunks of 16 bytes cut boxes mid-row
            buffer = torch.empty(min(16, stream.nbytes - position), dtype=torch.uint8)
            pack(buffer, position)
            sent.update(buffer, position)
            wire = buffer.clone()
            landed.update(wire, position)
            unpack(wire, position)
        assert sent.hexdigest() == landed.hexdigest()
    assert torch.equal(targets[2]["w"][:, :3], full["w"][:, :3]) and torch.equal(targets[2]["b"], full["b"])
    assert torch.equal(targets[3]["w"][:, 3:], full["w"][:, 3:]) and not targets[3]["b"].any()
    assert not targets[2]["w"][:, 3:].any() and not targets[3]["w"][:, :3].any()  # only what each needs


def test_layouts_travel_as_json_and_decode_to_the_planners_objects():
    named = [("a", torch.ones(3, 2)), ("s", torch.tensor(1.5))]
    held = holdings(named, rank=0)
    message = json.loads(trainer_message(held, trainers=1))
    layout = decode_trainer(message["tensors"])
    assert layout["a"] is mesh_held((3, 2), "float32", (1,), (Replicate(),), (0,))  # the cached object
    assert held.shards["s"].box.start == () and held.shards["a"].tensor.data_ptr() == named[0][1].data_ptr()
    needs = {"a": split((3, 2), "float32", 0, 1, 2)}
    assert decode_receiver(json.loads(receiver_message(needs))["tensors"]) == needs
    other = [list(entry) for entry in message["tensors"]]
    other[1][2] = [2]
    assert "tensor 's': trainer ranks 0 and 1" in trainers_disagree({0: message["tensors"], 1: other})


def test_parties_with_different_plans_are_told_the_first_tensor_and_both_parties():
    """Fingerprints differ (e.g. two planner versions): the parties' per-tensor digests name the
    first tensor where they differ, and the two parties, as the manifest check does."""
    from weightsync.plan import plan_digests
    from weightsync.planned import PlannedParty

    trainer = {name: mesh_held((4, 2), "float32", (2,), (Shard(0),)) for name in ("a", "b")}
    mine = plan(trainer, {2: {"a": whole((4, 2), "float32"), "b": whole((4, 2), "float32")}})
    theirs = plan(trainer, {2: {"a": whole((4, 2), "float32"), "b": split((4, 2), "float32", 0, 0, 2)}})
    party = PlannedParty.__new__(PlannedParty)  # no group: the exchange is stood in for
    party.trainers = 2
    rows = [json.dumps(plan_digests(mine)).encode()] * 2 + [json.dumps(plan_digests(theirs)).encode()]
    party.exchange_json = lambda payload: rows
    assert party._which_tensor(mine) == ("plans differ at tensor 'b': trainer rank 0 and receiver 2 derived "
                                         "different transfers")
