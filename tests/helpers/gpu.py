"""Helpers of the GPU tests: a real daemon process on a chosen GPU, a weight set, rounds over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from weightsync import WeightSender
from weightsync.store import named_checksum
from weightsync_operator.local import free_port

STARTUP_SECONDS = 120


def wait_for_published_digest(sender, update_info: dict, timeout: float = 30.0) -> None:
    """Until the trainer (ipc/p2p) has published its checksum of what it lent this round: polled,
    since a blocking get would hold the store's client away from the thread that publishes."""
    round_id = next(iter(update_info["ipc_handles"].values()))["round_id"]
    deadline = time.monotonic() + timeout
    while not sender.transport.digests.has(round_id):
        assert time.monotonic() < deadline, f"round {round_id}: no checksum published in {timeout} s"
        time.sleep(0.01)


def need_gpus(count: int) -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} CUDA GPU(s)")


def weight_set(seed: int, device: str, scale: int = 1) -> list[tuple[str, torch.Tensor]]:
    """A small model-shaped set: several dtypes, a tensor larger than the test buffers, and
    sizes that are not multiples of 8 bytes (partial last words)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    return [
        ("embed.weight", randn(1024 * scale, 1024, dtype=torch.bfloat16)),  # 2 MiB x scale
        ("layer.0.qkv.weight", randn(768, 256, dtype=torch.bfloat16)),
        ("layer.0.qkv.bias", randn(15, dtype=torch.bfloat16)),  # 30 bytes
        ("layer.0.mlp.weight", randn(1000, 1000)),  # 4 MB, larger than a 1 MiB buffer
        ("layer.0.norm", randn(333, dtype=torch.float16)),
        ("quant.scale", torch.randint(-128, 127, (1001,), dtype=torch.int8, generator=gen, device=device)),
        ("lm_head.weight", randn(512, 1024, dtype=torch.bfloat16)),
    ]


class Daemon:
    """`python -m weightsync_daemon` on one GPU, with a bounded wait for its URL line."""

    def __init__(self, backend: str, device: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "weightsync_daemon", "--port", "0", "--backend", backend, "--device", device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        deadline = time.monotonic() + STARTUP_SECONDS
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stdout], [], [], max(left, 0))
            if not ready or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"the {backend} daemon on {device} did not start in {STARTUP_SECONDS}s")
            line += os.read(self.process.stdout.fileno(), 4096)
        self.url = json.loads(line.splitlines()[0])["url"]
        self.http = httpx.Client(base_url=self.url, timeout=180)

    def post(self, path: str, body: dict | None = None) -> httpx.Response:
        return self.http.post(path, json=body or {})

    def checksum(self) -> str:
        return self.post("/weight_checker", {"action": "checksum"}).json()["checksum"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextlib.contextmanager
def joined_pair(backend: str, daemon_device: str, buffer_size: int, num_buffers: int):
    """A daemon on `daemon_device` and the trainer's WeightSender on cuda:0, joined as one group of
    two: (daemon, sender), both stopped afterwards."""
    daemon = Daemon(backend, daemon_device)
    base = {"master_address": "127.0.0.1", "master_port": free_port(), "world_size": 2,
            "packed_buffer_size_bytes": buffer_size, "packed_num_buffers": num_buffers, "timeout_seconds": 60}
    with ThreadPoolExecutor(1) as pool:  # joining waits for every party: both at once
        trainer = pool.submit(WeightSender.init, {**base, "backend": backend}, device="cuda:0")
        answer = daemon.post("/init_weight_transfer_engine", {"init_info": {**base, "rank_offset": 1}})
        sender = trainer.result(timeout=120)
    assert answer.status_code == 200, answer.text
    try:
        yield daemon, sender
    finally:
        sender.close()
        daemon.stop()


def collective_round(daemon: Daemon, send, version, update_info: dict | None = None):
    """start → (the trainer sends while the daemon receives) → finish when both succeeded."""
    assert daemon.post("/start_weight_update").status_code == 200
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(send)
        answer = daemon.post("/update_weights", {"update_info": update_info or {}})
        try:
            sent = sending.result(timeout=180)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            sent = error
    if not isinstance(sent, BaseException) and answer.status_code == 200:
        assert daemon.post("/finish_weight_update", {"weight_version": str(version)}).status_code == 200
    return sent, answer


def relayed_round(daemon: Daemon, sender, send, version):
    """ipc/p2p: the trainer answers first with its handles, the daemon gets them (batch by batch)."""
    assert daemon.post("/start_weight_update").status_code == 200
    sender.transport.begin_round()
    answers = []
    while True:
        try:
            stats = send()
        except Exception as error:  # noqa: BLE001 - the test inspects it
            return error, answers
        answer = daemon.post("/update_weights", {"update_info": stats.update_info})
        answers.append(answer)
        if answer.status_code != 200 or not stats.more:
            break
    if answers[-1].status_code == 200:
        assert daemon.post("/finish_weight_update", {"weight_version": str(version)}).status_code == 200
    sender.transport.end_round()
    return stats, answers


def expected(named) -> str:
    return named_checksum(named)
