"""The loader sink on GPUs: a receiver process lands each round in a vLLM-shaped model (fused qkv
and gate_up parameters, tests/helpers/loader_receiver.py) over ipc (one GPU), p2p and nccl (two).
Every slice bit-exact, every round; a manifest the engine cannot load is refused before anything
loads; staging stays within packed_num_buffers x packed_buffer_size_bytes (nccl, p2p). On a host
with one GPU, p2p runs with both parties on it (the staged path, without NVLink)."""

from __future__ import annotations

import json
import os
import pathlib
import select
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers.gpu import need_gpus, wait_for_published_digest
from weightsync import WeightSender
from weightsync_operator.local import free_port

from benchmarks.vllm_shaped import tensors_digest

pytestmark = pytest.mark.gpu
HELPER = pathlib.Path(__file__).resolve().parents[1] / "helpers" / "loader_receiver.py"
BUFFER, BUFFERS = 256 << 10, 8
WAIT = 180


def shapes(layers: int = 2) -> list[tuple[str, tuple[int, ...]]]:
    """A small Qwen2-shaped set: q/k/v with biases, gate/up/down, norms, untied lm_head."""
    hidden, inter, kv, vocab = 256, 512, 64, 1024
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.q_proj.bias", (hidden,)),
                (p + "self_attn.k_proj.weight", (kv, hidden)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter)),
                (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def values(seed: int, device: str) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return [(name, torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)) for name, shape in shapes()]


class LoaderReceiver:
    """tests/helpers/loader_receiver.py on one GPU, one JSON line per round."""

    def __init__(self, backend: str, device: str, init: dict):
        self.process = subprocess.Popen(
            [sys.executable, str(HELPER), "--backend", backend, "--device", device, "--init", json.dumps(init),
             "--shapes", json.dumps(shapes())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def line(self) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], WAIT)
        assert ready and self.process.poll() is None, "the loader receiver stopped or did not answer"
        return json.loads(self.process.stdout.readline())

    def round(self, body: dict) -> None:
        self.process.stdin.write((json.dumps(body) + "\n").encode())
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="module", params=["ipc", "p2p", "nccl"])
def pair(request):
    backend = request.param
    need_gpus(1 if backend != "nccl" else 2)
    # p2p on one GPU pulls from its own GPU: the same staged path, without NVLink
    device = "cuda:1" if backend != "ipc" and torch.cuda.device_count() > 1 else "cuda:0"
    init = {"master_address": "127.0.0.1", "master_port": free_port(), "world_size": 2,
            "packed_buffer_size_bytes": BUFFER, "packed_num_buffers": BUFFERS, "timeout_seconds": 60}
    receiver = LoaderReceiver(backend, device, {**init, "backend": backend, "rank_offset": 1})
    sender = WeightSender.init({**init, "backend": backend}, device="cuda:0")
    assert receiver.line() == {"ready": True}
    yield backend, receiver, sender
    sender.close()
    receiver.stop()


def one_round(backend, receiver, sender, named):
    if backend == "nccl":
        receiver.round({})
        with ThreadPoolExecutor(1) as pool:
            sent = pool.submit(sender.send_weights, named)
            answer = receiver.line()
            try:
                stats = sent.result(WAIT)
            except Exception as error:  # noqa: BLE001 - the test inspects it
                stats = error
        return stats, answer
    sender.transport.begin_round()
    try:
        stats = sender.send_weights(named)
    except Exception as error:  # noqa: BLE001 - the test inspects it
        return error, None
    receiver.round(stats.update_info)
    answer = receiver.line()
    sender.transport.end_round()
    return stats, answer


def test_every_round_lands_bit_exact_in_the_fused_parameters(pair):
    backend, receiver, sender = pair
    for seed in (1, 2, 3):
        named = values(seed, "cuda:0")
        stats, answer = one_round(backend, receiver, sender, named)
        assert not isinstance(stats, BaseException), stats
        assert answer["ok"], answer
        assert answer["digest"] == tensors_digest(t for _, t in named)
        assert answer["loaded"] == len(named)
        if backend != "ipc":  # ipc hands over the trainer's memory itself: no staging
            assert 0 < answer["staging"] <= BUFFER * BUFFERS


def test_a_manifest_the_engine_cannot_load_is_refused_before_anything_loads(pair):
    backend, receiver, sender = pair
    named = values(4, "cuda:0")
    stats, answer = one_round(backend, receiver, sender, named)
    assert answer["ok"], answer
    extra = named + [("model.layers.9.mlp.gate_proj.weight", torch.ones(8, 256, dtype=torch.bfloat16, device="cuda:0"))]
    stats, answer = one_round(backend, receiver, sender, extra)
    assert not answer["ok"] and "model.layers.9.mlp.gate_proj.weight" in answer["error"], answer
    assert answer["loaded"] == 0 and not answer["touched"]
    if backend == "nccl":  # the trainer learns it from the group's agreement
        assert isinstance(stats, Exception) and "model.layers.9.mlp.gate_proj.weight" in str(stats)
    stats, answer = one_round(backend, receiver, sender, named)  # and the next round lands
    assert answer["ok"] and answer["digest"] == tensors_digest(t for _, t in named), answer


def test_a_tensor_rewritten_mid_round_fails_verification_with_the_weights_touched(pair):
    """ipc/p2p: the trainer's memory changes after it published its checksum (as a trainer that
    steps before the round ended would): the receiver's checksum of what it loaded disagrees."""
    backend, receiver, sender = pair
    if backend == "nccl":
        pytest.skip("the trainer's bytes are packed or sent before it returns; see test_landing for nccl/cpu")
    named = values(5, "cuda:0")
    sender.transport.begin_round()
    stats = sender.send_weights(named)
    wait_for_published_digest(sender, stats.update_info)
    with torch.no_grad():
        named[-1][1].add_(1)
    torch.cuda.synchronize()
    receiver.round(stats.update_info)
    answer = receiver.line()
    sender.transport.end_round()
    assert not answer["ok"] and "checksum mismatch" in answer["error"], answer
    assert answer["touched"] is True
    stats, answer = one_round(backend, receiver, sender, values(6, "cuda:0"))
    assert answer["ok"] and answer["digest"] == tensors_digest(t for _, t in values(6, "cuda:0")), answer
