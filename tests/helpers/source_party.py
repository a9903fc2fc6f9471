"""A party process of the trainer-source tests (tests/core/test_trainer_sources.py), spoken to in JSON lines.

  receiver --rank R --init JSON       joins the transfer group as rank R (cpu transport, an empty
                                      store shaped by the first round); per stdin line {"cmd":
                                      "receive"} takes one round and answers {"ok", "checksum",
                                      "error", "touched", "seconds"}
  trainer --rank R --ranks N --trainer-port P --init JSON [--layers L --width W]
                                      one rank of a trainer holding a small transformer; with N > 1
                                      every parameter is a DTensor sharded by FSDP2's fully_shard
                                      over a gloo group of N ranks. Rank 0 joins the transfer group.
                                      Per stdin line:
      {"cmd": "round", "form": "source"|"list"|"renamed"|"lying", "pause_at": k|null}
          step the weights (an in-place update of every local shard), then send them: "source"
          streams ModuleSource(model); "list" first materializes every full tensor into a list
          (the baseline a streaming source avoids); "renamed": a source whose first parameter is
          named differently (in both channels: the receivers refuse the manifest); "lying": its
          iteration yields parameter 5 one row short of what its metadata says. Answers {"ok", "error", "peak_delta",
          "seconds", "model_bytes", "round_id"}; `peak_delta`: the rise of this process's peak RSS
          (VmHWM, reset just before the send) over its RSS before it. With `pause_at` this rank
          stops before yielding parameter k, says {"paused": true}, and waits to be killed.
      {"cmd": "checksum"}  every rank materializes the model (one tensor at a time); rank 0
          answers the checksum a receiver holding it reports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

from weightsync import InitInfo, UpdateInfo, WeightSender
from weightsync.source import ModuleSource
from weightsync.store import WeightStore, named_checksum
from weightsync.transports import get_transport

from lying_source import Lying  # this folder (the script's own)


def say(**message) -> None:
    print(json.dumps(message), flush=True)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):  # not used by the tests; it shows what the parameters are
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + self.out(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)
        return x + self.down(torch.relu(self.up(x)))


class TinyTransformer(nn.Module):
    def __init__(self, layers: int, width: int, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, vocab, bias=False)


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


class Renamed:
    """The model's source with its first parameter renamed, consistently in both channels."""

    def __init__(self, source):
        self.source = source

    def metadata(self):
        first, *rest = self.source.metadata().tensors
        return type(self.source.metadata())(tensors=(first.model_copy(update={"name": "renamed.weight"}), *rest))

    def __iter__(self):
        for index, (name, tensor) in enumerate(self.source):
            yield ("renamed.weight" if index == 0 else name), tensor


class Pausing:
    """A source that stops before yielding parameter `at`, says so, and waits to be killed."""

    def __init__(self, source, at: int):
        self.source, self.at = source, at

    def metadata(self):
        return self.source.metadata()

    def __iter__(self):
        for index, item in enumerate(self.source):
            if index == self.at:
                say(paused=True)
                threading.Event().wait(300)  # the test kills this process now
            yield item


def trainer(args) -> None:
    sharded = args.ranks > 1
    if sharded:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.trainer_port}", rank=args.rank,
                                world_size=args.ranks, timeout=datetime.timedelta(seconds=args.timeout))
    torch.manual_seed(0)
    model = TinyTransformer(args.layers, args.width, args.vocab)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (args.ranks,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    sender = WeightSender.init(json.loads(args.init), sharded=sharded)
    say(ready=True, model_bytes=model_bytes, sharded=sharded,
        dtensors=sum(type(p).__name__ == "DTensor" for p in model.parameters()))
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "checksum":
            digest = named_checksum(ModuleSource(model))
            if args.rank == 0:
                say(checksum=digest)
            continue
        with torch.no_grad():
            for p in model.parameters():  # a training step, on each rank's own shard
                p.mul_(0.5).add_(0.25)
        if command["form"] == "list":
            weights = lambda: [(name, t.clone()) for name, t in ModuleSource(model)]  # noqa: E731
        elif command["form"] in ("renamed", "lying"):
            source = (Renamed(ModuleSource(model)) if command["form"] == "renamed"
                      else Lying(ModuleSource(model), 5, lambda tensor: tensor[:-1]))  # parameter 5, a row short
            weights = lambda source=source: source  # noqa: E731
        else:
            source = ModuleSource(model)
            if command.get("pause_at") is not None:
                source = Pausing(source, command["pause_at"])
            weights = lambda source=source: source  # noqa: E731
        before = vm_kib("VmRSS")
        reset_peak()
        started = time.monotonic()
        try:
            stats = sender.send_weights(weights())
            answer = {"ok": True, "round_id": stats.round_id, "checksum": stats.checksum}
        except Exception as error:  # noqa: BLE001 - reported to the test
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}",
                      "trace": traceback.format_exc()[-1500:]}
        answer.update(seconds=time.monotonic() - started, peak_delta=(vm_kib("VmHWM") - before) * 1024,
                      model_bytes=model_bytes)
        say(**answer)
    sender.close()


def receiver(args) -> None:
    transport = get_transport("cpu").connect(InitInfo(**json.loads(args.init)), args.rank, torch.device("cpu"))
    store = WeightStore.empty()
    say(ready=True)
    for line in sys.stdin:
        json.loads(line)
        started = time.monotonic()
        try:
            transport.receive(store, UpdateInfo())
            answer = {"ok": True, "checksum": store.checksum()}
        except Exception as error:  # noqa: BLE001 - reported to the test
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}",
                      "touched": getattr(error, "weights_touched", None)}
        say(seconds=time.monotonic() - started, **answer)
    transport.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["trainer", "receiver"])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--init", required=True, help="init_info as JSON")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--trainer-port", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    (trainer if args.role == "trainer" else receiver)(args)


if __name__ == "__main__":
    main()
