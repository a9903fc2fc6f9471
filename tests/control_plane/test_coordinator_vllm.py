"""The coordinator drives a real vLLM server (CPU build, weightsync backend) as it drives a
daemon: world size from vLLM's /get_world_size, pause/resume with vLLM's modes, the version
from /weight_info, and after every round vLLM's greedy completions equal the trainer's HF
greedy generation. Failed rounds degrade as client.py documents: vLLM has no abort, so a
session a failed round left open is closed by the coordinator, and vLLM keeps serving the
previous version. Every test runs against a server of tensor parallel 1 and of 2 (two workers,
two ranks, and vLLM 0.32's executor, which must never see a call every worker refuses). The
trainer and vLLM run with the vLLM venv's Python (found as
tests/engines/test_vllm_e2e.py finds it: skipped without it, failed under CI); this process coordinates.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import pytest_asyncio

from weightsync_operator.catchup import catch_up
from weightsync_operator.client import Endpoint, VllmClient
from weightsync_operator.coordinator import Coordinator, SyncSpec, Timeouts
from weightsync_operator.demo import qwen2
from weightsync_operator.demo.vllm_run import completions, reference, start_parties
from weightsync_operator.demo.vllm_server import VllmServer
from weightsync_operator.local import LocalProcess, free_port

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]


class Parties:
    def __init__(self, model: str, trainer: LocalProcess, server: VllmServer, tensor_parallel: int):
        self.model, self.trainer, self.server, self.tp = model, trainer, server, tensor_parallel
        self.prompts = qwen2.prompts()

    async def served(self, http) -> list[list[int]]:
        return await completions(http, self.server.url, self.model, self.prompts)

    async def expected(self, http) -> list[list[int]]:
        return await reference(http, self.trainer.url, self.prompts)

    async def train(self, http) -> None:
        (await http.post(self.trainer.url + "/demo/train_step", timeout=120)).raise_for_status()


async def freeze(pid: int, deadline: float = 5.0) -> None:
    """SIGSTOP, and wait (bounded) until the kernel shows the process stopped."""
    os.kill(pid, signal.SIGSTOP)
    until = time.monotonic() + deadline
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < until, f"process {pid} did not stop within {deadline}s"
        await asyncio.sleep(0.01)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=[1, 2], ids=["tp1", "tp2"])
async def parties(request, tmp_path_factory, vllm_python):
    work = tmp_path_factory.mktemp(f"vllm-coordinator-tp{request.param}")
    model, trainer, server = await start_parties(work, vllm_python, tensor_parallel=request.param)
    try:
        yield Parties(model, trainer, server, request.param)
    finally:
        await asyncio.gather(trainer.stop(), server.stop(), return_exceptions=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def coordinator(parties, module_http):
    spec = SyncSpec(master_port=free_port(), packed_buffer_size_bytes=1 << 20, transfer_timeout=3,
                    pause_mode="keep", timeouts=Timeouts(request=5, init=60, start=5, update=30, finish=20))
    coordinator = Coordinator(parties.trainer.endpoint, [Endpoint("vllm", parties.server.url, kind="vllm")],
                              spec, module_http)
    group = await coordinator.init()
    assert (group.world_size, group.ranks) == (1 + parties.tp, {"trainer": 0, "vllm": 1})  # a rank per worker
    assert isinstance(coordinator.targets[0], VllmClient)
    return coordinator


async def test_every_round_lands_in_vllm_and_its_completions_equal_the_trainers(coordinator, parties, module_http):
    previous = await parties.served(module_http)
    for version in ("1", "2", "3"):
        await parties.train(module_http)
        result = await coordinator.sync(version)
        assert result.ok, result.reason
        assert [(t.name, t.ok, t.weight_version) for t in result.targets] == [("vllm", True, version)]
        assert result.bytes > 2_000_000 and result.checksum
        assert await coordinator.targets[0].weight_version(5) == version  # vLLM's /weight_info
        served, expected = await asyncio.gather(parties.served(module_http), parties.expected(module_http))
        assert served == expected, f"version {version}: vLLM {served} != trainer {expected}"
        assert served != previous  # the training step changed the completions: the update showed
        previous = served
        assert not await coordinator.targets[0].is_paused(5)  # resumed


async def test_vllm_health_and_what_it_cannot_do(coordinator):
    vllm = coordinator.targets[0]
    health = await vllm.health(5)
    assert health.weight_version == "3" and health.in_group is None and health.weights_intact is None
    assert vllm.can_seed is False
    with pytest.raises(Exception, match="cannot send its weights"):
        await vllm.seed({}, 5)


async def test_a_trainer_frozen_mid_update_fails_the_round_and_vllm_keeps_the_previous_version(
        coordinator, parties, module_http):
    before = await parties.served(module_http)
    version_before = await coordinator.targets[0].weight_version(5)
    await parties.train(module_http)  # the trainer moves on; its weights are not sent
    trainer_pid = parties.trainer.process.pid
    real_update = coordinator.trainer.update

    async def freeze_then_update(update_info, timeout):
        await freeze(trainer_pid)  # after every party started: vLLM waits for bytes
        return await real_update(update_info, timeout)

    coordinator.trainer.update = freeze_then_update
    began = time.monotonic()
    try:
        result = await coordinator.sync("4")
    finally:
        coordinator.trainer.update = real_update
        os.kill(trainer_pid, signal.SIGCONT)
    assert not result.ok and time.monotonic() - began < 30  # transfer timeout 3 s, small calls 5 s
    vllm = next(t for t in result.targets)
    assert (vllm.ok, vllm.step) == (False, "update") and "intact" in vllm.reason, vllm.reason
    assert vllm.weight_version == version_before  # what it serves, asked once its session ended
    assert coordinator.needs_init
    # vLLM ended its own update session, still serves the previous version, and is resumed.
    assert await coordinator.targets[0].weight_version(5) == version_before
    assert not await coordinator.targets[0].is_paused(5)
    assert await parties.served(module_http) == before
    # The next round re-initialises the group and lands.
    group = coordinator.group.name
    again = await coordinator.sync("5")
    assert again.ok, again.reason
    assert coordinator.group.name != group
    assert await parties.served(module_http) == await parties.expected(module_http)


async def test_a_session_left_open_by_a_round_that_failed_elsewhere_is_closed_unlabelled(
        coordinator, parties, module_http):
    """vLLM's start succeeded, the trainer's was refused: vLLM's layerwise reload is open and vLLM
    has no abort. The coordinator closes it with an unlabelled finish: the layers that received
    nothing get their previous tensors back, and the next round starts cleanly."""
    before = await parties.served(module_http)
    version_before = await coordinator.targets[0].weight_version(5)
    await parties.train(module_http)
    # The trainer is already in a round of its own, so it refuses the coordinator's start while
    # vLLM accepts it.
    busy = await module_http.post(parties.trainer.url + "/start_weight_update", json={})
    assert busy.status_code == 200, busy.text
    result = await coordinator.sync("6")
    assert not result.ok and "trainer: start failed: HTTP 409" in result.reason, result.reason
    vllm = next(t for t in result.targets)
    assert vllm.ok and vllm.weight_version == version_before  # closed unlabelled: still the old version
    assert await parties.served(module_http) == before
    assert not await coordinator.targets[0].is_paused(5)
    again = await coordinator.sync("7")  # without the close, vLLM would refuse: "already active"
    assert again.ok, again.reason
    assert await parties.served(module_http) == await parties.expected(module_http)
    assert await coordinator.targets[0].weight_version(5) == "7"


async def test_a_group_of_a_daemon_and_vllm_then_vllm_catches_up_from_the_daemon(parties, module_http, module_spawn):
    """One group of both kinds (ranks: trainer 0, daemon 1, vLLM 2); then a round vLLM misses,
    and vLLM, a late joiner, catches up from the daemon (vLLM itself cannot seed)."""
    daemon = await module_spawn("daemon")  # a plain daemon: shaped by its first round
    spec = SyncSpec(master_port=free_port(), transfer_timeout=10, timeouts=Timeouts(request=5, init=60, update=30))
    vllm = Endpoint("vllm", parties.server.url, kind="vllm")
    async with Coordinator(parties.trainer.endpoint, [daemon.endpoint, vllm], spec, module_http) as both:
        group = await both.init()
        assert (group.world_size, group.ranks) == (2 + parties.tp, {"trainer": 0, "daemon": 1, "vllm": 2})
        await parties.train(module_http)
        result = await both.sync("8")
        assert result.ok, result.reason
        assert [(t.name, t.weight_version) for t in result.targets] == [("daemon", "8"), ("vllm", "8")]
        assert await parties.served(module_http) == await parties.expected(module_http)
        held_by_vllm = await parties.served(module_http)
    spec = SyncSpec(master_port=free_port(), transfer_timeout=10, timeouts=Timeouts(request=5, init=60, update=30))
    async with Coordinator(parties.trainer.endpoint, [daemon.endpoint], spec, module_http) as daemon_only:
        await daemon_only.init()
        await parties.train(module_http)
        missed = await daemon_only.sync("9")
        assert missed.ok, missed.reason
        source, joiner = daemon_only.targets[0], both.targets[1]
        assert await joiner.weight_version(5) == "8" and await parties.served(module_http) == held_by_vllm
        with pytest.raises(ValueError, match="cannot be the source of a catch-up"):
            await catch_up(joiner, [source], "8", spec, "127.0.0.1", free_port())
        caught = await catch_up(source, [joiner], "9", spec, "127.0.0.1", free_port())
        assert caught.ok, caught.reason
        assert [(p.name, p.rank, p.weight_version) for p in caught.targets] == [("vllm", 1, "9")]
    assert await joiner.weight_version(5) == "9" and not await joiner.is_paused(5)
    assert await parties.served(module_http) == await parties.expected(module_http) != held_by_vllm


async def test_vllm_targets_must_pause(parties, module_http):
    spec = SyncSpec(pause_mode=None)
    with pytest.raises(ValueError, match="pause_mode none cannot drive vLLM targets"):
        Coordinator(parties.trainer.endpoint, [Endpoint("vllm", parties.server.url, kind="vllm")], spec, module_http)
