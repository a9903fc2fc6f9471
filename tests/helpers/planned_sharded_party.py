"""A party process of tests/core/test_planned_sharded.py, spoken to in JSON lines: the public API only.

  trainer --rank R --ranks M --trainer-port P --init JSON
      one rank of an FSDP2 trainer of M ranks (a gloo trainer group of its own; `fully_shard` on
      every Linear and on the root, so every parameter is a DTensor), joined with
      `WeightSender.init(init, sharded=True)`. `DTensor.full_tensor` is patched to raise once
      the model is built. Per stdin line {"cmd": "round", "step": k}: a training step (every
      local shard w = w * 0.5 + k), then `send_weights(ModuleSource(model))`. Answers {"ok",
      "error", "moved", "sent", "received", "planned"}.
  receiver --rank R --init JSON
      `get_transport("cpu").connect(init, R)` and a store holding every tensor (zeros); per stdin
      line {"cmd": "receive"}: `receive(store, UpdateInfo())`. Answers {"ok", "error",
      "digests", "moved", "transport"}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

from weightsync import InitInfo, UpdateInfo, WeightSender, get_transport
from weightsync.dtypes import tensors_manifest
from weightsync.source import ModuleSource
from weightsync.store import WeightStore, tensor_digest

SHAPES = [(29, 45), (45, 77), (77, 13)]  # Linear(in, out): uneven first dims at 2 ranks


def build_model() -> nn.Module:
    torch.manual_seed(4321)
    return nn.Sequential(*(nn.Linear(i, o) for i, o in SHAPES))


def full_weights(step: int) -> dict[str, torch.Tensor]:
    """The model's full tensors after `step` training steps (what every receiver must hold)."""
    weights = {name: p.detach().clone() for name, p in build_model().named_parameters()}
    for tensor in weights.values():
        for k in range(1, step + 1):
            tensor.mul_(0.5).add_(k)
    return weights


def say(**message) -> None:
    print(json.dumps(message), flush=True)


def forbid_gathers() -> None:
    from torch.distributed.tensor import DTensor

    def refuse(self, *args, **kwargs):
        raise AssertionError("full_tensor() called on a trainer rank")

    DTensor.full_tensor = refuse


def trainer(args) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.trainer_port}", rank=args.rank,
                            world_size=args.ranks, timeout=datetime.timedelta(seconds=args.timeout))
    mesh = init_device_mesh("cpu", (args.ranks,))
    model = build_model()
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dtensors = sum(hasattr(p, "to_local") for p in model.parameters())
    forbid_gathers()
    sender = WeightSender.init(json.loads(args.init), sharded=True)
    say(ready=True, dtensors=dtensors, planned=sender.planned is not None)
    for line in sys.stdin:
        command = json.loads(line)
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().mul_(0.5).add_(command["step"])
        try:
            stats = sender.send_weights(ModuleSource(model))
            planned = stats.planned
            answer = {"ok": True, "moved": stats.payload_bytes, "planned": planned is not None,
                      "sent": dict(planned.sent) if planned else None}
        except Exception as error:  # noqa: BLE001 - reported to the test
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}",
                      "trace": traceback.format_exc()[-1500:]}
        say(**answer)
    sender.close()


def receiver(args) -> None:
    init = InitInfo(**json.loads(args.init))
    transport = get_transport("cpu").connect(init, args.rank, torch.device("cpu"))
    named = [(name, torch.zeros_like(t)) for name, t in full_weights(0).items()]
    store = WeightStore.from_manifest(tensors_manifest(named))
    say(ready=True, transport=type(transport).__name__)
    for line in sys.stdin:
        json.loads(line)
        try:
            stats = transport.receive(store, UpdateInfo())
            answer = {"ok": True, "moved": stats.payload_bytes}
        except Exception as error:  # noqa: BLE001 - reported to the test
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        say(digests={name: tensor_digest(store[name]) for name, _ in named}, **answer)
    transport.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["trainer", "receiver"])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--init", required=True, help="init_info as JSON")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--trainer-port", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    trainer(args) if args.role == "trainer" else receiver(args)


if __name__ == "__main__":
    main()
