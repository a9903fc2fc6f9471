"""Many senders, no gather (issue 22 items 1 and 5(a)): a planned round over gloo.

Real processes throughout (tests/helpers/planned_party.py): M trainer ranks over their own gloo
group, every tensor a DTensor (Shard(0) with uneven first dims, Replicate, and an FSDP2
`fully_shard` Linear), `DTensor.full_tensor` patched to raise in each of them; 2 receivers
holding whole tensors. All M + 2 parties join one planned group; each trainer rank sends what
it owns (`send_planned`), each receiver lands what it needs (`receive_planned`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from helpers.json_lines import JsonLinesProcess
from helpers.planned_party import full_weights, tp_needs
from weightsync.plan import full_box
from weightsync.planned_streams import region
from weightsync.store import tensor_digest
from weightsync_operator.local import free_port

pytestmark = pytest.mark.integration  # trainer and receiver processes
HELPER = Path(__file__).resolve().parents[1] / "helpers" / "planned_party.py"
TIMEOUT_S = 15.0  # the planned group's and the trainer group's timeout
BUFFER = 256 << 10
RECEIVERS = 2


class Party(JsonLinesProcess):
    """One helper process (HELPER), spoken to in JSON lines."""

    script = HELPER


class Group:
    """`ranks` trainer processes and RECEIVERS receiver processes in one planned group."""

    def __init__(self, ranks: int, atomic: bool = False, tp: int = 1):
        port, trainer_port = free_port(), free_port()
        init = json.dumps({"backend": "cpu", "master_address": "127.0.0.1", "master_port": port,
                           "world_size": ranks + RECEIVERS, "packed_buffer_size_bytes": BUFFER,
                           "packed_num_buffers": 2, "timeout_seconds": TIMEOUT_S, "init_timeout_seconds": 60,
                           "atomic": atomic})
        self.trainers = [Party("trainer", "--rank", str(r), "--ranks", str(ranks), "--trainer-port",
                               str(trainer_port), "--init", init, "--timeout", str(TIMEOUT_S))
                         for r in range(ranks)]
        self.receivers = [Party("receiver", "--rank", str(ranks + r), "--trainers", str(ranks), "--init", init,
                                "--tp", str(tp)) for r in range(RECEIVERS)]
        self.ready = [p.next(120) for p in self.trainers + self.receivers]
        assert all(r.get("ready") for r in self.ready), self.ready

    def round(self, step: int, ghost: bool = False, die: dict[int, int] | None = None, corrupt: int | None = None
              ) -> tuple[list[dict], list[dict]]:
        for index, receiver in enumerate(self.receivers):
            receiver.send(cmd="receive", ghost=ghost, corrupt=index == corrupt)
        for rank, trainer in enumerate(self.trainers):
            trainer.send(cmd="round", step=step, die_after=(die or {}).get(rank))
        alive = [t for rank, t in enumerate(self.trainers) if rank not in (die or {})]
        return [t.next() for t in alive], [r.next() for r in self.receivers]

    def stop(self) -> None:
        for party in self.trainers + self.receivers:
            party.stop()


def _expected(step: int) -> dict[str, str]:
    return {name: tensor_digest(tensor) for name, tensor in full_weights(step).items()}


def _landed(received: dict) -> dict[str, str]:
    return {name: digest for name, digest in received["digests"].items() if name != "ghost.weight"}


@pytest.mark.parametrize("ranks", [1, 2, 4], ids=["plain-one-process", "two-ranks", "four-ranks"])
def test_every_rank_sends_its_own_share_and_every_receiver_lands_bit_exact(ranks):
    """Two rounds with different weights land bit-exact on both receivers (one rank: a plain
    trainer, its tensors no DTensors, rank 0 holds all); each trainer rank
    sends about total / M (the replicated tensors balanced by the planner), never gathering;
    its peak memory rises by no more than its buffers over the round. Then a round in which a
    receiver needs a tensor no trainer rank holds is refused by every party before any byte
    moves, naming the tensor and the receiver, and the receivers keep the last round's weights."""
    group = Group(ranks)
    try:
        for step in (1, 2):
            sent, received = group.round(step)
            assert all(s["ok"] for s in sent), sent
            assert all(r["ok"] for r in received), received
            expected = _expected(step)
            assert [_landed(r) for r in received] == [expected] * RECEIVERS
            per_rank = {int(rank): nbytes for rank, nbytes in sent[0]["sent"].items()}
            total = sum(per_rank.values())
            assert [s["moved"] for s in sent] == [per_rank[rank] for rank in range(ranks)]  # measured = planned
            assert sum(r["moved"] for r in received) == total
            shares = {rank: round(nbytes / (total / ranks), 3) for rank, nbytes in per_rank.items()}
            rises = [round(s["peak_delta"] / 2**20, 2) for s in sent]
            print(f"\n[{ranks} ranks, round {step}] bytes sent per trainer rank {per_rank} (total {total}, "
                  f"share of total/M {shares}); bytes received per receiver "
                  f"{[r['moved'] for r in received]}; peak RSS rise per rank (MiB) {rises}, shard "
                  f"{[round(s['shard_bytes'] / 2**20, 2) for s in sent]} MiB, buffers "
                  f"{sent[0]['buffer_bytes'] / 2**20:.2f} MiB; seconds {[round(s['seconds'], 2) for s in sent]}",
                  file=sys.stderr)
            assert all(abs(share - 1) <= 0.10 for share in shares.values()), shares
            for s in sent if step > 1 else ():
                # The bound of the issue: shard + buffers + 10 %. The first round also holds
                # one-time allocations (the stream threads' stacks, gloo's pairs, the plan's first
                # derivation: about 6 MiB here), so it is left out, as in test_trainer_sources; a
                # later round rises by its buffers and what the interpreter allocates per round
                # (a few hundred KiB), for which 2 MiB of slack stands in beside the 10 % on
                # shards this small (the model is 5.6 MiB).
                assert s["peak_delta"] <= (s["shard_bytes"] + s["buffer_bytes"]) * 1.10 + (2 << 20), s

        refused, received = group.round(3, ghost=True)
        assert all(not s["ok"] and s["error"].startswith("ManifestMismatch") and "'ghost.weight'" in s["error"]
                   and f"receiver(s) [{ranks}, {ranks + 1}]" in s["error"] for s in refused), refused
        assert all(not r["ok"] and "'ghost.weight'" in r["error"] and not r["touched"] for r in received), received
        assert [_landed(r) for r in received] == [_expected(2)] * RECEIVERS  # untouched by the refusal

        sent, received = group.round(4)  # the group is still usable after a refusal
        assert all(s["ok"] for s in sent) and all(r["ok"] for r in received), (sent, received)
        assert [_landed(r) for r in received] == [_expected(4)] * RECEIVERS
    finally:
        group.stop()


@pytest.mark.parametrize("victim", [1, 0], ids=["rank-1", "rank-0-the-store-host"])
def test_a_trainer_rank_killed_mid_round_fails_every_party_and_atomic_receivers_keep_their_weights(victim):
    """A corrupted stream fails the round on every party with IntegrityError, nothing landed.
    Then a trainer rank of 2 dies after its first sends: every other party fails within the timeout
    naming it (the receivers from their stream with it, the other trainer rank from what the
    first to fail told over the group's store, or, when the victim hosted that store, from the
    store being gone), and the (atomic) receivers still hold the last round."""
    group = Group(2, atomic=True)
    try:
        sent, received = group.round(1)
        assert all(s["ok"] for s in sent) and all(r["ok"] for r in received), (sent, received)
        # A byte flipped on its way to the first receiver: every party fails the round with
        # IntegrityError naming the stream; nothing was committed (atomic), the group goes on.
        sent, received = group.round(2, corrupt=0)
        assert all(not p["ok"] and p["error"].startswith("IntegrityError") and "to receiver 2 arrived" in p["error"]
                   for p in sent + received), (sent, received)
        assert [_landed(r) for r in received] == [_expected(1)] * RECEIVERS
        started = time.monotonic()
        sent, received = group.round(3, die={victim: 2})
        took = time.monotonic() - started
        print(f"\n[killed trainer rank {victim}] every party failed within {took:.1f}s: "
              f"{[s['error'][:300] for s in sent]} / {[r['error'][:160] for r in received]}", file=sys.stderr)
        assert took < 2 * TIMEOUT_S + 10
        named = f"trainer rank {victim}"
        assert not sent[0]["ok"] and named in sent[0]["error"], sent
        assert all(not r["ok"] and named in r["error"] and not r["touched"] for r in received), received
        assert [_landed(r) for r in received] == [_expected(1)] * RECEIVERS
    finally:
        group.stop()


def test_tensor_parallel_receivers_take_only_their_slices():
    """Two receivers as the two workers of a TP-2 engine (each needs half of dim 1 of every 2-D
    tensor, the 1-D tensors whole) from a trainer of 2 ranks: each lands its regions bit-exact
    and receives about sharded / 2 + replicated bytes, not the whole model."""
    group = Group(2, tp=RECEIVERS)
    try:
        sent, received = group.round(1)
        assert all(s["ok"] for s in sent) and all(r["ok"] for r in received), (sent, received)
        full = full_weights(1)
        for index, answer in enumerate(received):
            needs = tp_needs(RECEIVERS, index)
            assert answer["digests"] == {name: tensor_digest(region(full[name], full_box(tuple(full[name].shape)),
                                                                    need.box).contiguous())
                                         for name, need in needs.items()}
        sharded = sum(t.numel() * t.element_size() for t in full.values() if t.dim() == 2)
        replicated = sum(t.numel() * t.element_size() for t in full.values() if t.dim() != 2)
        expected = sharded / RECEIVERS + replicated
        moved = [r["moved"] for r in received]
        print(f"\n[2 ranks -> TP-2 receivers] bytes received per worker {moved}, sharded / 2 + replicated = "
              f"{expected:.0f} (whole model {sharded + replicated}); bytes sent per trainer rank "
              f"{[s['moved'] for s in sent]}", file=sys.stderr)
        assert all(abs(m / expected - 1) <= 0.10 for m in moved), moved
    finally:
        group.stop()
