"""A real trainer process for the operator's tests and benchmark: it leads a WeightSync through
`weightsync_operator.trainer_client.connect` on the cpu transport and pushes versions when told to.

    python -m k8s_trainer --name policy-sync --namespace rl --pod trainer-0 --kubeconfig FILE

It prints one JSON line {"url": ...} once its agent listens (the test then creates its Pod with
that port), then serves one JSON command per stdin line, answering one JSON line each:
  {"cmd": "wait_ready"}                       → {"ok": true, "rendezvous": {...}}
  {"cmd": "push", "version": 3}               → trains one step, pushes it: {"ok": true, "result": {...},
                                                "checksum": "<sha256 of the pushed weights>"}
                                                or {"ok": false, "error": "PushFailed", "reason": "..."}
  {"cmd": "push", "version": 3, "hold": FILE}  → the same, but the round stops after its first tensor
                                                until FILE exists (a round that stays in flight until
                                                the test lets it go; at most --push-timeout)
Closing stdin stops it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from weightsync.dtypes import tensors_manifest
from weightsync.protocol import Manifest
from weightsync.store import named_checksum
from weightsync_operator.kube import KubeApi
from weightsync_operator.trainer_client import PushFailed, connect


def build_model(mbytes: float, tensors: int = 8) -> dict[str, torch.Tensor]:
    """`tensors` float32 parameters of about `mbytes` MB in total, from a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    numel = max(1, int(mbytes * 1e6 / 4 / tensors))
    return {f"layers.{i}.weight": torch.randn(numel, generator=generator) for i in range(tensors)}


def train_step(model: dict[str, torch.Tensor], step: int) -> None:
    """Change every parameter in place, deterministically, as an optimizer step would."""
    generator = torch.Generator().manual_seed(1000 + step)
    for tensor in model.values():
        tensor.add_(torch.randn(tensor.shape, generator=generator), alpha=1e-3)


class HeldSource:
    """The model as a streaming source whose iteration waits, after its first tensor, until the
    `release` file exists (bounded by `timeout`): the round is in flight for as long as a test
    needs, whatever the machine's speed."""

    def __init__(self, model: dict[str, torch.Tensor], release: Path, timeout: float):
        self.model, self.release, self.timeout = model, release, timeout

    def metadata(self) -> Manifest:
        return tensors_manifest(list(self.model.items()))

    def __iter__(self):
        for index, item in enumerate(self.model.items()):
            yield item
            if index == 0:
                deadline = time.monotonic() + self.timeout
                while not self.release.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--pod", required=True)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--mbytes", type=float, default=4.0)
    parser.add_argument("--push-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = build_model(args.mbytes)
    client = connect(args.name, args.namespace, port=0, host="127.0.0.1", pod_name=args.pod,
                     kube=KubeApi.from_environment(args.kubeconfig), wait=False)

    def push(command: dict) -> dict:
        train_step(model, command["version"])
        weights = (HeldSource(model, Path(command["hold"]), args.push_timeout) if command.get("hold")
                   else model.items())
        result = client.push(weights, command["version"], timeout=args.push_timeout)
        return result, {"checksum": named_checksum(model.items())}

    serve_commands(client, push)


def serve_commands(client, push, **more) -> None:
    """The stdin protocol of the module docstring, for a trainer `client` (trainer_client.connect):
    prints its URL line, then answers each command line until stdin closes. `push(command)` trains
    and pushes one version: (the PushResult, more fields for the answer); `more`: further
    commands by name, each answering its fields."""
    print(json.dumps({"url": client.url}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "wait_ready":
            answer = {"ok": True, "rendezvous": client.wait_ready(command.get("timeout", 60.0))}
        elif command["cmd"] == "push":
            try:
                result, fields = push(command)
                answer = {"ok": True, "result": dataclasses.asdict(result), **fields}
            except PushFailed as error:
                answer = {"ok": False, "error": "PushFailed", "reason": error.reason}
        elif command["cmd"] in more:
            answer = {"ok": True, **more[command["cmd"]](command)}
        else:
            answer = {"ok": False, "error": f"unknown command {command['cmd']!r}"}
        print(json.dumps(answer), flush=True)
    client.close()

if __name__ == "__main__":
    main()
