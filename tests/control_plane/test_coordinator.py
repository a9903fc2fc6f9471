"""The coordinator over real processes: a typed round result, and bounded waits when a daemon
never answers (a frozen process, and a socket that accepts but never replies)."""

import asyncio
import os
import signal
import time

import pytest
import pytest_asyncio

from weightsync_operator.client import Endpoint
from weightsync_operator.coordinator import Coordinator, InitError, SyncSpec, Timeouts

pytestmark = pytest.mark.asyncio(loop_scope="module")
TRAINER = "weightsync_operator.demo.worker"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def parties(module_spawn):
    trainer, *daemons = await asyncio.gather(
        module_spawn("trainer", "--role", "trainer", module=TRAINER),
        module_spawn("daemon-0"), module_spawn("daemon-1"))
    return trainer, daemons


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def coordinator(parties, module_http, rendezvous_port):
    trainer, daemons = parties
    spec = SyncSpec(master_port=rendezvous_port, packed_buffer_size_bytes=1 << 18, transfer_timeout=3,
                    timeouts=Timeouts(request=2, init=30, start=5, update=20, finish=5))
    coordinator = Coordinator(trainer.endpoint, [d.endpoint for d in daemons], spec, module_http)
    group = await coordinator.init()
    assert group.world_size == 3 and group.ranks == {"trainer": 0, "daemon-0": 1, "daemon-1": 2}
    return coordinator


async def test_a_round_returns_a_typed_result(coordinator, parties, module_http):
    trainer, daemons = parties
    result = await coordinator.sync(41)
    assert result.ok, result.reason
    assert result.version == "41" and result.bytes > 3_000_000 and result.transfer_seconds > 0
    assert result.total_seconds >= result.transfer_seconds and result.gbps > 0
    assert result.checksum and len(result.checksum) == 32
    assert [(t.name, t.ok, t.weight_version, t.rank) for t in result.targets] == [
        ("daemon-0", True, "41", 1), ("daemon-1", True, "41", 2)]
    sums = [(await module_http.post(p.url + "/weight_checker", json={"action": "checksum"})).json()["checksum"]
            for p in (trainer, *daemons)]
    assert len(set(sums)) == 1
    paused = [(await module_http.get(d.url + "/is_paused")).json()["is_paused"] for d in daemons]
    assert paused == [False, False]  # resumed after the round


async def test_a_frozen_daemon_fails_the_round_within_its_timeout(coordinator, parties, module_http):
    _, daemons = parties
    frozen = daemons[1].process.pid
    os.kill(frozen, signal.SIGSTOP)
    try:
        began = time.monotonic()
        result = await coordinator.sync(42)
        elapsed = time.monotonic() - began
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert not result.ok and "daemon-1" in result.reason and "timed out" in result.reason
    assert elapsed < 10  # pause (2 s) + aborts and resumes (2 s each), never the update timeout
    failed = {t.name: (t.ok, t.step) for t in result.targets}
    assert failed == {"daemon-0": (True, None), "daemon-1": (False, "pause")}
    # The survivor kept its version and was resumed; the next round succeeds everywhere.
    assert (await module_http.get(daemons[0].url + "/weight_info")).json() == {"weight_version": "41"}
    assert (await module_http.get(daemons[0].url + "/is_paused")).json() == {"is_paused": False}
    again = await coordinator.sync(43)
    assert again.ok, again.reason
    assert all(t.weight_version == "43" for t in again.targets)


async def test_a_daemon_frozen_mid_update_fails_the_round_then_the_group_is_rebuilt(coordinator, parties):
    _, daemons = parties
    victim = coordinator.targets[0]
    real_update = victim.update

    async def freeze_then_update(update_info, timeout):
        os.kill(daemons[0].process.pid, signal.SIGSTOP)  # frozen after it was paused and started
        return await real_update(update_info, timeout)

    victim.update = freeze_then_update
    began = time.monotonic()
    try:
        result = await coordinator.sync(44)
    finally:
        victim.update = real_update
        os.kill(daemons[0].process.pid, signal.SIGCONT)
    assert not result.ok and time.monotonic() - began < 15
    steps = {p.name: p.step for p in result.parties if not p.ok}
    assert steps.get("daemon-0") == "update" and "trainer" in steps  # the trainer's collective timed out too
    assert coordinator.needs_init
    old_group = coordinator.group.name
    again = await coordinator.sync(45)
    assert again.ok, again.reason
    assert coordinator.group.name != old_group and all(t.weight_version == "45" for t in again.targets)


async def test_a_fresh_group_releases_targets_an_interrupted_round_left_paused(coordinator, parties, module_http):
    _, daemons = parties
    await coordinator.targets[0].pause("abort", 2)  # as a round cut short before its resume would
    assert (await module_http.get(daemons[0].url + "/is_paused")).json() == {"is_paused": True}
    await coordinator.init()
    assert [(await module_http.get(d.url + "/is_paused")).json()["is_paused"] for d in daemons] == [False, False]


async def test_init_gives_up_on_a_socket_that_never_answers(parties, module_http, rendezvous_port):
    async def swallow(reader, writer):
        await reader.read()  # accept and never answer

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    trainer, daemons = parties
    spec = SyncSpec(master_port=rendezvous_port, timeouts=Timeouts(request=1.5))
    coordinator = Coordinator(trainer.endpoint, [daemons[0].endpoint, Endpoint("silent", f"http://127.0.0.1:{port}")],
                              spec, module_http)
    began = time.monotonic()
    with pytest.raises(InitError) as caught:
        await coordinator.init()
    assert time.monotonic() - began < 5
    assert "silent" in str(caught.value) and "timed out after 1.5s" in str(caught.value)
    server.close()


async def test_each_engine_kind_gets_its_client_and_what_vllm_cannot_do_is_refused_up_front(parties, module_http):
    trainer, daemons = parties
    vllm = Endpoint("vllm-0", "http://127.0.0.1:9", kind="vllm")  # never called: refused before any request
    coordinator = Coordinator(trainer.endpoint, [daemons[0].endpoint, vllm], SyncSpec(), module_http)
    assert [type(p).__name__ for p in coordinator.parties] == ["DaemonClient", "DaemonClient", "VllmClient"]
    assert [p.can_seed for p in coordinator.targets] == [True, False]
    with pytest.raises(ValueError, match="pause_mode none cannot drive vLLM targets \\(vllm-0\\)"):
        Coordinator(trainer.endpoint, [vllm], SyncSpec(pause_mode=None), module_http)
    with pytest.raises(ValueError, match="the trainer is a weightsync agent, not a vllm server"):
        Coordinator(vllm, [daemons[0].endpoint], SyncSpec(), module_http)
    with pytest.raises(ValueError, match="unknown engine kind 'tgi'"):
        Coordinator(trainer.endpoint, [Endpoint("x", "http://127.0.0.1:9", kind="tgi")], SyncSpec(), module_http)  # type: ignore[arg-type]
    health = await coordinator.targets[0].health(2)  # a daemon's /healthz, typed
    assert health.in_group is True and health.weights_intact is True and health.weight_version == "45"
