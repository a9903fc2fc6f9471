"""The trainer of the vLLM end-to-end test, run with the vLLM venv's python.

It builds a tiny Qwen2-architecture model with Hugging Face transformers (no hub), saves it as
the checkpoint the vLLM server starts from, and then follows commands, one JSON object per line
on stdin, answering one JSON object per line on stdout:

  {"cmd": "init", "url": ..., "master_port": ..., "fields": {...}}   join the server's workers
  {"cmd": "generate", "prompts": [[ids]...], "max_tokens": n}        HF greedy continuation ids
  {"cmd": "round", "seed": k, "version": "v1"}                       new weights, pushed to vLLM
  {"cmd": "bad_round", "kind": "unknown_name"|"wrong_shape"|"wrong_dtype"}  a manifest vLLM must refuse
  {"cmd": "send_slowly", "seed": k, "delay": s}                      new weights, sent broadcast by
                                                                     broadcast (the test drives the
                                                                     HTTP routes and kills this process)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from weightsync_vllm.trainer import VLLMTrainer


def build_model(tied: bool, seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tied, rms_norm_eps=1e-6, rope_theta=10000.0, torch_dtype="float32",
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    randomize(model, seed)
    return model


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """New weights, spread wide enough that greedy decoding has clear winners (no near-ties
    that float32 rounding in two different engines could split differently)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if "norm" in name:
            param.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
            param.copy_(0.05 * noise)
        else:
            param.copy_(0.1 * noise)


@torch.no_grad()
def greedy(model: Qwen2ForCausalLM, prompt: list[int], max_tokens: int) -> list[int]:
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(args.tied, args.seed)
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


def handle(command: dict, model: Qwen2ForCausalLM, trainer: VLLMTrainer | None) -> dict:
    cmd = command["cmd"]
    if cmd == "init":
        STATE["trainer"] = VLLMTrainer.connect([command["url"]], master_address="127.0.0.1",
                                               master_port=command["master_port"], backend="cpu",
                                               **command.get("fields", {}))
        return {"world_size": STATE["trainer"].init.world_size}
    if cmd == "generate":
        return {"tokens": [greedy(model, p, command["max_tokens"]) for p in command["prompts"]]}
    if cmd == "round":
        randomize(model, command["seed"])
        started = time.monotonic()
        stats = trainer.push(model.named_parameters(), version=command["version"])
        return {"seconds": time.monotonic() - started, "tensors": stats.num_tensors, "bytes": stats.payload_bytes}
    if cmd == "bad_round":
        named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
        name, tensor = named[3]
        if command["kind"] == "unknown_name":
            named[3] = (name.replace("layers.0", "layers.7"), tensor)
        elif command["kind"] == "wrong_shape":
            named[3] = (name, tensor[..., :-1].contiguous())
        else:
            named[3] = (name, tensor.to(torch.float16))
        try:
            trainer.push([(n, t + 1.0) for n, t in named], version="bad")
        except Exception as error:
            return {"refused": str(error), "name": named[3][0]}
        return {"refused": None}
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


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
