"""A trainer rank written against vLLM's own trainer-side API, run with the vLLM venv's python
(tests/engines/test_vllm_trainer_api.py). Only the init info class says "weightsync":

    engine = WeightTransferTrainerFactory.trainer_init(WeightsyncTrainerInitInfo(..., rank=rank),
                                                       client=HTTPVLLMWeightSyncClient(url),
                                                       source=ModuleSource(model))
    engine.send_weights()

With --ranks 2 the model's decoder layers and root are sharded by FSDP2 (`fully_shard`, gloo) and
both ranks run every command. Each rank also keeps an unsharded copy (the test's oracle: HF's
greedy ids on the weights that were sent; it takes no part in a round). Commands, one JSON
object per line on stdin, answered on stdout (rank 0 answers "generate"; every rank the others):

  {"cmd": "init", "url": ..., "master_port": ..., "world_size": n, "fields": {...}, "client": "http"|"four"}
      "four": the control plane is `FourMethods`, a plain object with vLLM's four client methods
      (here over a weightsync daemon's routes, which are vLLM's), instead of vLLM's HTTP client
  {"cmd": "round", "seed": k}          new weights (the same on every rank), then send_weights();
                                       rank 0's answer carries the checksum a receiver holding them reports
  {"cmd": "lying_round", "seed": k}    a source whose iteration contradicts its metadata
  {"cmd": "generate", "prompts": [[ids]...], "max_tokens": n}
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import ModuleSource
from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

from weightsync.store import named_checksum
from weightsync_vllm.trainer_engine import WeightsyncTrainerInitInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lying_source import Lying  # noqa: E402
from vllm_trainer import build_model, greedy, randomize  # noqa: E402 - the e2e test's model


def reply(**message) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class FourMethods:
    """vLLM's client protocol, structurally: four methods, no vLLM class."""

    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=120)

    def _post(self, path: str, body: dict | None = None) -> None:
        self.http.post(path, json=body).raise_for_status()

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._post("/init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._post("/start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._post("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._post("/finish_weight_update", {"weight_version": weight_version} if weight_version else {})


@torch.no_grad()
def set_weights(model, oracle, seed: int) -> None:
    """New weights: the oracle's, copied into the (sharded) model's parameters."""
    randomize(oracle, seed)
    if model is oracle:
        return
    from torch.distributed.tensor import distribute_tensor

    full = dict(oracle.named_parameters())
    for name, param in model.named_parameters():
        param.copy_(distribute_tensor(full[name].detach(), param.device_mesh, param.placements))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--trainer-port", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ranks > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.trainer_port}", rank=args.rank,
                                world_size=args.ranks, timeout=datetime.timedelta(seconds=60))
    oracle = build_model(False, 0)
    if args.rank == 0:
        oracle.save_pretrained(args.model_dir, safe_serialization=True)
    model = oracle
    if args.ranks > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = build_model(False, 0)
        mesh = init_device_mesh("cpu", (args.ranks,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    reply(ready=True, dtensors=sum(type(p).__name__ == "DTensor" for p in model.parameters()),
          names=[name for name, _ in model.named_parameters()])
    engine = None
    for line in sys.stdin:
        command = json.loads(line)
        try:
            cmd = command["cmd"]
            if cmd == "init":
                info = WeightsyncTrainerInitInfo(master_address="127.0.0.1", master_port=command["master_port"],
                                                 world_size=command["world_size"], rank=args.rank,
                                                 **command.get("fields", {}))
                client = FourMethods(command["url"]) if command.get("client") == "four" \
                    else HTTPVLLMWeightSyncClient(command["url"], timeout=120)
                engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=ModuleSource(model))
                reply(ok=True, engine=type(engine).__name__, sender=engine.is_sender)
            elif cmd == "round":
                set_weights(model, oracle, command["seed"])
                started = time.monotonic()
                engine.send_weights()
                reply(ok=True, seconds=time.monotonic() - started, tensors=engine.last.num_tensors,
                      checksum=named_checksum(oracle.named_parameters()) if args.rank == 0 else None)
            elif cmd == "lying_round":
                # a column short
                honest, engine.source = engine.source, Lying(engine.source, 3, lambda tensor: tensor[..., :-1])
                try:
                    engine.send_weights()
                    reply(ok=True)
                finally:
                    engine.source = honest
            elif cmd == "generate":
                if args.rank == 0:
                    reply(tokens=[greedy(oracle, p, command["max_tokens"]) for p in command["prompts"]])
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as error:  # reported to the test, which decides
            reply(ok=False, error=f"{type(error).__name__}: {error}", trace=traceback.format_exc()[-3000:])
    if engine is not None:
        engine.shutdown()


if __name__ == "__main__":
    main()
