"""The trainer of the SGLang end-to-end tests, run with the SGLang venv's python.

It builds a tiny fp32 model (`--arch qwen2` or `llama`) with Hugging Face transformers (no hub),
saves it as the checkpoint the SGLang server starts from, and follows commands, one JSON object
per line on stdin, answering one per line on stdout:

  {"cmd": "init", "url": ..., "master_port": ..., "fields": {...}}   join the server's workers
  {"cmd": "generate", "prompts": [[ids]...], "max_tokens": n}        HF greedy continuation ids
  {"cmd": "round", "seed": k, "version": "v1"[, "pause_mode": m]}    new weights, pushed to SGLang
  {"cmd": "subset", "seed": k, "params": regex, "version": "p1"}     new values for the matching
        parameters only, pushed alone: answers {"refused": reason|null, "sent": [names]}
  {"cmd": "bad_round", "kind": "unknown_name"|"wrong_shape"|"wrong_dtype"}  a manifest SGLang must
        refuse; the trainer's weights stay as they were
  {"cmd": "send_slowly", "seed": k, "delay": s}                      new weights, sent broadcast by
        broadcast, announcing each (the test drives SGLang's routes and kills this process)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_trainer import SHARED, build_model as build_qwen2, greedy, randomize  # this directory
from weightsync_sglang.trainer import SGLangTrainer


def build_model(arch: str, seed: int) -> torch.nn.Module:
    """A tiny fp32 Qwen2 (the vLLM tests' model) or Llama (no q/k/v biases, untied head)."""
    if arch == "qwen2":
        return build_qwen2(tied=False, seed=seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SHARED, tie_word_embeddings=False)).to(torch.float32).eval()
    randomize(model, seed)
    return model


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


STATE: dict[str, Any] = {}


def handle(command: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    cmd = command["cmd"]
    trainer: SGLangTrainer | None = STATE.get("trainer")
    if cmd == "init":
        STATE["trainer"] = SGLangTrainer.connect([command["url"]], master_address="127.0.0.1",
                                                 master_port=command["master_port"], backend="cpu",
                                                 **command.get("fields", {}))
        return {"world_size": STATE["trainer"].init.world_size}
    if cmd == "generate":
        return {"tokens": [greedy(model, p, command["max_tokens"]) for p in command["prompts"]]}
    assert trainer is not None, "init first"
    if cmd == "round":
        randomize(model, command["seed"])
        mode = {"pause_mode": command["pause_mode"]} if "pause_mode" in command else {}
        stats = trainer.push(model.named_parameters(), version=command["version"], **mode)
        return {"tensors": stats.num_tensors, "bytes": stats.payload_bytes}
    if cmd == "subset":
        return push_subset(model, trainer, command)
    if cmd == "bad_round":
        return push_bad_round(model, trainer, command["kind"])
    if cmd == "send_slowly":
        return send_slowly(model, trainer, command)
    raise ValueError(f"unknown command {cmd!r}")


def push_subset(model: torch.nn.Module, trainer: SGLangTrainer, command: dict[str, Any]) -> dict[str, Any]:
    """New values for the parameters matching `params`, pushed alone; refused: values restored."""
    names = [name for name, _ in model.named_parameters() if re.search(command["params"], name)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    randomize(model, command["seed"], names)
    params = dict(model.named_parameters())
    try:
        trainer.push([(name, params[name]) for name in names], version=command["version"])
    except Exception as error:  # the test reads the reason
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(before[name])
        return {"refused": str(error), "sent": names}
    return {"refused": None, "sent": names}


def push_bad_round(model: torch.nn.Module, trainer: SGLangTrainer, kind: str) -> dict[str, Any]:
    """A push whose fourth tensor the served checkpoint does not have (name, shape or dtype)."""
    named = [(n, p.detach().clone() + 1.0) for n, p in model.named_parameters()]
    name, tensor = named[3]
    if kind == "unknown_name":
        named[3] = (name.replace("layers.0", "layers.7"), tensor)
    elif kind == "wrong_shape":
        named[3] = (name, tensor[..., :-1].contiguous())
    else:
        named[3] = (name, tensor.to(torch.float16))
    started = time.monotonic()
    try:
        trainer.push(named, version="bad")
    except Exception as error:
        return {"refused": str(error), "name": named[3][0], "seconds": time.monotonic() - started}
    return {"refused": None}


def send_slowly(model: torch.nn.Module, trainer: SGLangTrainer, command: dict[str, Any]) -> dict[str, Any]:
    """Send new weights broadcast by broadcast, saying before each that it is about to go and
    then waiting `delay`: the test kills this process at a chosen broadcast."""
    randomize(model, command["seed"])
    group = trainer.sender.transport.group
    original, count = group.broadcast, [0]

    def broadcast(tensor: torch.Tensor, src: int = 0) -> Any:
        count[0] += 1
        reply({"broadcasts": count[0]})
        time.sleep(command["delay"])
        return original(tensor, src)

    group.broadcast = broadcast
    trainer.sender.send_weights(model.named_parameters())
    return {"sent": True}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(args.arch, seed=0)
    model.save_pretrained(args.model_dir, safe_serialization=True)
    reply({"ready": True, "names": [name for name, _ in model.named_parameters()]})
    for line in sys.stdin:
        command = json.loads(line)
        try:
            reply(handle(command, model))
        except Exception as error:  # reported to the test, which decides
            reply({"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-3000:]})


if __name__ == "__main__":
    main()
