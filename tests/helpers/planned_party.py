"""A party process of the planned-round tests (tests/core/test_planned.py), spoken to in JSON lines.

  trainer --rank R --ranks M --trainer-port P --init JSON
      one rank of a trainer of M ranks (M > 1: a gloo trainer group of its own, every tensor a
      DTensor: `distribute_tensor` Shard(0) or Replicate, and one FSDP2 `fully_shard` Linear),
      transfer-group rank R. `DTensor.full_tensor` is patched to raise once the model is built:
      nothing in a round may gather. Per stdin line:
        {"cmd": "round", "step": k, "die_after": n|null}  a training step (every local shard
            w = w * 0.5 + k), then `send_planned`; with `die_after` this process kills itself
            after n of its sends were posted. Answers {"ok", "error", "sent", "received",
            "moved", "peak_delta", "shard_bytes", "buffer_bytes", "seconds"}; `peak_delta`: the
            rise of this process's peak RSS (VmHWM, reset just before the send) over its RSS
            before it.
  receiver --rank R --trainers M --init JSON [--tp K]
      a daemon-style store holding every tensor whole (plus "ghost.weight", which no trainer
      holds); with --tp K it needs only what worker R - M of K tensor-parallel workers serves
      (dim 1 of every 2-D tensor split) and answers the digests of those regions. Per stdin
      line {"cmd": "receive", "ghost": bool, "corrupt": bool}: takes one round needing every
      tensor but the ghost (with "ghost": true the ghost too, which the plan
      refuses; with "corrupt": true one received byte is flipped on arrival). Answers
      {"ok", "error", "touched", "digests", "moved", "seconds"}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

from weightsync import InitInfo
from weightsync.dtypes import dtype_name, tensors_manifest
from weightsync.plan import Need, full_box, split, whole
from weightsync.planned import PlannedParty, receive_planned, send_planned
from weightsync.planned_layout import whole_needs
from weightsync.planned_streams import region
from weightsync.store import WeightStore, tensor_digest

# name -> (shape, dtype, how the trainer holds it: "shard" (Shard(0)), "replicate", "fsdp")
TENSORS: dict[str, tuple[tuple[int, ...], torch.dtype, str]] = {
    "embed.weight": ((1003, 512), torch.float32, "shard"),
    "layers.0.weight": ((777, 512), torch.float32, "shard"),
    "layers.0.bias": ((777,), torch.float32, "replicate"),
    "layers.1.weight": ((1030, 384), torch.bfloat16, "shard"),
    # A replicated tensor goes whole from one rank (the planner does not split it over its holders)
    "rotary.table": ((100, 128), torch.float32, "replicate"),
    "norm.weight": ((512,), torch.float32, "replicate"),
    "fsdp.weight": ((45, 29), torch.float32, "fsdp"),
    "fsdp.bias": ((45,), torch.float32, "fsdp"),
}
GHOST = ("ghost.weight", (7, 3), torch.float32)


def full_weights(step: int) -> dict[str, torch.Tensor]:
    """The model's full tensors after `step` training steps (what every receiver must hold)."""
    generator = torch.Generator().manual_seed(1234)
    weights = {}
    for name, (shape, dtype, _) in TENSORS.items():
        tensor = torch.randn(shape, generator=generator).to(dtype)
        for k in range(1, step + 1):
            tensor.mul_(0.5).add_(k)
        weights[name] = tensor
    return weights


def say(**message) -> None:
    print(json.dumps(message), flush=True)


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def sharded_model(ranks: int) -> list[tuple[str, torch.Tensor]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (ranks,))
    full = full_weights(0)
    named: list[tuple[str, torch.Tensor]] = []
    linear = nn.Linear(29, 45)
    with torch.no_grad():
        linear.weight.copy_(full["fsdp.weight"])
        linear.bias.copy_(full["fsdp.bias"])
    fully_shard(linear, mesh=mesh)
    for name, (_, _, kind) in TENSORS.items():
        if kind == "fsdp":
            named.append((name, getattr(linear, name.split(".")[1])))
        else:
            placement = Shard(0) if kind == "shard" else Replicate()
            named.append((name, distribute_tensor(full[name], mesh, [placement])))
    del full
    return named


def forbid_gathers() -> None:
    from torch.distributed.tensor import DTensor

    def refuse(self, *args, **kwargs):
        raise AssertionError("full_tensor() called on a trainer rank during a planned round")

    DTensor.full_tensor = refuse


def local_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def trainer(args) -> None:
    if args.ranks > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.trainer_port}", rank=args.rank,
                                world_size=args.ranks, timeout=datetime.timedelta(seconds=args.timeout))
        named = sharded_model(args.ranks)
        forbid_gathers()
    else:
        named = list(full_weights(0).items())
    init = InitInfo(**json.loads(args.init))
    party = PlannedParty(init, args.rank, args.ranks)
    shard_bytes = sum(local_of(t).numel() * local_of(t).element_size() for _, t in named)
    receivers = init.world_size - args.ranks
    buffer_bytes = receivers * init.packed_num_buffers * init.packed_buffer_size_bytes
    say(ready=True, shard_bytes=shard_bytes)
    for line in sys.stdin:
        command = json.loads(line)
        with torch.no_grad():
            for _, tensor in named:
                local_of(tensor).mul_(0.5).add_(command["step"])
        if command.get("die_after") is not None:
            die_after(party, command["die_after"])
        before = vm_kib("VmRSS")
        reset_peak()
        started = time.monotonic()
        try:
            stats = send_planned(party, named)
            answer = {"ok": True, "sent": stats.sent, "received": stats.received, "moved": stats.moved}
        except Exception as error:  # noqa: BLE001 - reported to the test
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}",
                      "trace": traceback.format_exc()[-1500:]}
        answer.update(seconds=time.monotonic() - started, peak_delta=(vm_kib("VmHWM") - before) * 1024,
                      shard_bytes=shard_bytes, buffer_bytes=buffer_bytes)
        say(**answer)
    party.close()


def die_after(party: PlannedParty, sends: int) -> None:
    """Kill this process once `sends` of its point-to-point sends were posted (mid-round)."""
    send = party.group.send
    count = [0]

    def dying(tensor, dst):
        count[0] += 1
        if count[0] > sends:
            os.kill(os.getpid(), signal.SIGKILL)
        return send(tensor, dst)

    party.group.send = dying


class _Flipping:
    """A receive whose first byte is flipped once it arrived (a bit error on the wire)."""

    def __init__(self, work, tensor):
        self.work, self.tensor = work, tensor

    def wait(self) -> None:
        self.work.wait()
        self.tensor[:1].bitwise_xor_(0xFF)


def corrupt_once(party: PlannedParty) -> None:
    """This round's first received chunk arrives with one byte flipped."""
    recv = party.group.recv
    flipped = [False]

    def corrupting(tensor, src):
        work = recv(tensor, src)
        if flipped[0]:
            return work
        flipped[0] = True
        return _Flipping(work, tensor)

    party.group.recv = corrupting


def tp_needs(size: int, index: int) -> dict[str, Need]:
    """Worker `index` of `size` tensor-parallel workers: its half of dim 1 of every 2-D tensor
    (row-parallel), every 1-D tensor whole (replicated across the workers)."""
    return {name: split(shape, dtype_name(dtype), 1, index, size) if len(shape) == 2
            else whole(shape, dtype_name(dtype)) for name, (shape, dtype, _) in TENSORS.items()}


def receiver(args) -> None:
    init = InitInfo(**json.loads(args.init))
    party = PlannedParty(init, args.rank, args.trainers)
    weights = full_weights(0)
    named = [(name, torch.zeros_like(t)) for name, t in weights.items()]
    named.append((GHOST[0], torch.zeros(GHOST[1], dtype=GHOST[2])))
    store = WeightStore.from_manifest(tensors_manifest(named))
    needs = whole_needs(tensors_manifest(named[:-1]))
    if args.tp > 1:
        needs = tp_needs(args.tp, args.rank - args.trainers)
    say(ready=True)
    for line in sys.stdin:
        command = json.loads(line)
        started = time.monotonic()
        wanted = whole_needs(store.manifest) if command.get("ghost") else needs  # the ghost too
        if command.get("corrupt"):
            corrupt_once(party)
        try:
            stats = receive_planned(party, store, needs=wanted)
            answer = {"ok": True, "moved": stats.moved}
        except Exception as error:  # noqa: BLE001 - reported to the test
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}",
                      "touched": getattr(error, "weights_touched", None)}
        vars(party.group).pop("recv", None)  # undo corrupt_once
        digests = {name: tensor_digest(region(store[name], full_box(tuple(store[name].shape)), need.box).contiguous())
                   for name, need in needs.items()}
        say(seconds=time.monotonic() - started, digests=digests, **answer)
    party.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["trainer", "receiver"])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--init", required=True, help="init_info as JSON")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--trainers", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1, help="receivers are this many tensor-parallel workers")
    parser.add_argument("--trainer-port", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    trainer(args) if args.role == "trainer" else receiver(args)


if __name__ == "__main__":
    main()
