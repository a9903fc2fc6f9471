"""The trainer of the vLLM end-to-end tests, run with the vLLM venv's python.

It builds a tiny Qwen2-architecture model (or, with `--arch qwen3_moe`, a Qwen3 mixture of
experts: 8 experts, top 2) with Hugging Face transformers (no hub), saves it as the checkpoint
the vLLM server starts from, and then follows commands, one JSON object per line on stdin,
answering one JSON object per line on stdout:

  {"cmd": "init", "url": ..., "master_port": ..., "fields": {...}}   join the server's workers
  {"cmd": "generate", "prompts": [[ids]...], "max_tokens": n}        HF greedy continuation ids
  {"cmd": "round", "seed": k, "version": "v1"[, "pause_mode": m]}    new weights, pushed to vLLM
        (without "seed": the weights as they are, e.g. after "randomize")
  {"cmd": "randomize", "seed": k}                                    new weights, not pushed
  {"cmd": "bad_round", "kind": "unknown_name"|"wrong_shape"|"wrong_dtype"|"as_listed"}  a manifest vLLM must refuse
  {"cmd": "subset", "seed": k, "params": regex, "only": regex|null, "version": "v2"}
        new values for the model's parameters whose names match `params`, pushed as checkpoint
        tensors (`weightsync_vllm.hf.CheckpointSource`), of which only those matching `only` when
        given; answers {"refused": reason|null, "sent": [names]}. A refused push puts the
        trainer's previous values back (vLLM keeps serving them).
  {"cmd": "duplicate_round"}                                         a push listing one tensor twice:
        answers {"refused": reason|null, "seconds": how long push took to raise}
  {"cmd": "stream_round", "seed": k, "version": "v5"}                new weights pushed as a source
        that counts its tensors alive: answers {"peak_alive", "tensors", "peak_delta"} (the rise of
        this process's peak RSS, VmHWM reset before the push, over its RSS before it)
  {"cmd": "send_slowly", "seed": k, "delay": s}                      new weights, sent broadcast by
                                                                     broadcast (the test drives the
                                                                     HTTP routes and kills this process)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
import weakref

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from source_party import reset_peak, vm_kib  # this directory: the sources tests' measure of memory
from weightsync.source import ModuleSource
from weightsync_vllm.hf import CheckpointSource
from weightsync_vllm.trainer import VLLMTrainer

SHARED = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, rope_theta=10000.0, torch_dtype="float32", bos_token_id=1, eos_token_id=2)


def build_model(tied: bool, seed: int, arch: str = "qwen2", max_positions: int = 256,
                layers: int = 2) -> torch.nn.Module:
    shared = {**SHARED, "max_position_embeddings": max_positions, "num_hidden_layers": layers}
    if arch == "qwen3_moe":  # head_dim 32: the CPU attention backend's least
        config = Qwen3MoeConfig(**shared, tie_word_embeddings=tied, head_dim=32, num_experts=8,
                                num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)
        model_cls = Qwen3MoeForCausalLM
    else:
        config, model_cls = Qwen2Config(**shared, tie_word_embeddings=tied), Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    randomize(model, seed)
    return model


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, only: list[str] | None = None) -> None:
    """New weights (for the parameters named in `only`, else all), spread wide enough that greedy
    decoding has clear winners (no near-ties that float32 rounding in two different engines
    could split differently)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if only is not None and name not in only:
            continue
        noise = torch.randn(param.shape, generator=gen)
        if "norm" in name:
            param.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
            param.copy_(0.05 * noise)
        else:
            param.copy_(0.1 * noise)


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation that never stops early (as vLLM with ignore_eos)."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    for _ in range(max_tokens):
        logits = model(input_ids=ids).logits[0, -1]
        token = int(torch.argmax(logits))
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=["qwen2", "qwen3_moe"], default="qwen2")
    parser.add_argument("--max-positions", type=int, default=256, help="the model's longest sequence")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (more: slower generation)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(args.tied, args.seed, args.arch, args.max_positions, args.layers)
    model.save_pretrained(args.model_dir, safe_serialization=True)
    names = [name for name, _ in model.named_parameters()]
    reply({"ready": True, "names": names})
    trainer: VLLMTrainer | None = None
    for line in sys.stdin:
        command = json.loads(line)
        try:
            reply(handle(command, model, trainer))
            if command["cmd"] == "init":
                trainer = STATE["trainer"]
        except Exception as error:  # reported to the test, which decides
            reply({"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-3000:]})


STATE: dict = {}


def handle(command: dict, model: torch.nn.Module, trainer: VLLMTrainer | None) -> dict:
    cmd = command["cmd"]
    if cmd == "init":
        STATE["trainer"] = VLLMTrainer.connect([command["url"]], master_address="127.0.0.1",
                                               master_port=command["master_port"], backend="cpu",
                                               **command.get("fields", {}))
        return {"world_size": STATE["trainer"].init.world_size}
    if cmd == "generate":
        return {"tokens": [greedy(model, p, command["max_tokens"]) for p in command["prompts"]]}
    if cmd == "randomize":
        randomize(model, command["seed"])
        return {}
    if cmd == "round":
        if "seed" in command:
            randomize(model, command["seed"])
        started = time.monotonic()
        # transformers 5 lists a mixture of experts' experts fused: sent under the checkpoint's names
        weights = CheckpointSource(model) if model.config.model_type == "qwen3_moe" else model.named_parameters()
        mode = {"pause_mode": command["pause_mode"]} if "pause_mode" in command else {}  # else push's default
        stats = trainer.push(weights, version=command["version"], **mode)
        return {"seconds": time.monotonic() - started, "tensors": stats.num_tensors, "bytes": stats.payload_bytes}
    if cmd == "subset":
        return push_subset(model, trainer, command)
    if cmd == "duplicate_round":
        return push_duplicate(model, trainer)
    if cmd == "stream_round":
        randomize(model, command["seed"])
        source = CountingSource(model)
        before = vm_kib("VmRSS")
        reset_peak()
        stats = trainer.push(source, version=command["version"])
        return {"peak_alive": source.peak, "tensors": stats.num_tensors,
                "peak_delta": (vm_kib("VmHWM") - before) * 1024}
    if cmd == "bad_round":
        return push_bad_round(model, trainer, command["kind"])
    if cmd == "send_slowly":
        randomize(model, command["seed"])
        group = trainer.sender.transport.group
        original, count = group.broadcast, [0]

        def broadcast(tensor, src=0):  # says it is about to send, then waits `delay` first
            count[0] += 1
            reply({"broadcasts": count[0]})
            time.sleep(command["delay"])
            return original(tensor, src)

        group.broadcast = broadcast
        trainer.sender.send_weights(model.named_parameters())
        return {"sent": True}
    raise ValueError(f"unknown command {cmd!r}")


def push_duplicate(model: torch.nn.Module, trainer: VLLMTrainer) -> dict:
    """A push listing one tensor twice: how it was refused, and how long that took."""
    named = list(model.named_parameters())
    started = time.monotonic()
    try:
        trainer.push(named + [named[3]], version="twice")
    except Exception as error:
        return {"refused": str(error), "seconds": time.monotonic() - started, "name": named[3][0]}
    return {"refused": None, "seconds": time.monotonic() - started}


def push_bad_round(model: torch.nn.Module, trainer: VLLMTrainer, kind: str) -> dict:
    """A push whose fourth tensor vLLM must refuse (`kind`), or as listed by transformers."""
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    name, tensor = named[3]
    if kind == "unknown_name":
        named[3] = (name.replace("layers.0", "layers.7"), tensor)
    elif kind == "wrong_shape":
        named[3] = (name, tensor[..., :-1].contiguous())
    elif kind != "as_listed":  # as_listed: transformers' own names (a MoE's experts fused)
        named[3] = (name, tensor.to(torch.float16))
    try:
        trainer.push([(n, t + 1.0) for n, t in named], version="bad")
    except Exception as error:
        return {"refused": str(error), "name": named[3][0]}
    return {"refused": None}


class CountingSource:
    """A module's parameters as a source that materializes each one (a copy, as a cast or a
    gather would) and counts how many of its copies are alive at once."""

    def __init__(self, model: torch.nn.Module):
        self.inner = ModuleSource(model)
        self.alive = self.peak = 0

    def metadata(self):
        return self.inner.metadata()

    def __iter__(self):
        for name, tensor in self.inner:
            copy = tensor.clone()
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            weakref.finalize(copy, self._freed)
            yield name, copy
            del copy

    def _freed(self) -> None:
        self.alive -= 1


def push_subset(model: torch.nn.Module, trainer: VLLMTrainer, command: dict) -> dict:
    """New values for some parameters, pushed as checkpoint tensors (all of them or those
    matching `only`); a refused push restores the previous values."""
    params = [name for name, _ in model.named_parameters() if re.search(command["params"], name)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    randomize(model, command["seed"], params)
    sent = [(name, tensor) for name, tensor in CheckpointSource(model, names=params)
            if command.get("only") is None or re.search(command["only"], name)]
    try:
        trainer.push(sent, version=command["version"])
    except Exception as error:  # the test reads the reason
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(before[name])
        return {"refused": str(error), "sent": [name for name, _ in sent]}
    return {"refused": None, "sent": [name for name, _ in sent]}


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
