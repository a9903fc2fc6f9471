"""ipc (trainer and daemon on one GPU) and p2p (on two GPUs of the host): a real daemon process
reads the trainer's memory through the CUDA IPC handles of the trainer's update_info."""

from __future__ import annotations

import asyncio

import pytest
import torch

from helpers.gpu import (
    expected, joined_pair, need_gpus, relayed_round, wait_for_published_digest, weight_set,
)
from weightsync import SparsePatch
from weightsync.store import named_checksum
from weightsync.transports.cuda_ipc import gpu_uuid
from weightsync_operator.local import free_port

pytestmark = pytest.mark.gpu
BUFFER = 1 << 20


@pytest.fixture(scope="module", params=["ipc", "p2p"])
def pair(request):
    """(backend, daemon, sender): ipc on cuda:0 with its trainer; p2p on cuda:1, trainer on cuda:0."""
    backend = request.param
    need_gpus(1 if backend == "ipc" else 2)
    with joined_pair(backend, "cuda:0" if backend == "ipc" else "cuda:1", BUFFER, 2) as (daemon, sender):
        yield backend, daemon, sender


def test_dense_rounds_are_bit_exact_and_handles_are_opened_once(pair):
    backend, daemon, sender = pair
    named = weight_set(1, "cuda:0")
    infos = []
    for version in range(1, 4):
        with torch.no_grad():  # the trainer updates its weights in place, as an optimizer does
            for i, (_, t) in enumerate(named):
                t.copy_(weight_set(version, "cuda:0")[i][1])
        stats, answers = relayed_round(daemon, sender, lambda: sender.send_weights(named), version)
        assert [a.status_code for a in answers] == [200], [a.text for a in answers]
        assert answers[0].json()["checksum"] and not stats.more
        assert daemon.checksum() == expected(named)
        infos.append(stats.update_info)
    uuid = gpu_uuid(0)
    assert list(infos[0]["ipc_handles"]) == [uuid]
    first, last = infos[0]["ipc_handles"][uuid], infos[-1]["ipc_handles"][uuid]
    assert first["storages"] == last["storages"]  # exported once, reused while storages live
    assert first["round_id"] != last["round_id"]


def test_sparse_patches_apply(pair):
    backend, daemon, sender = pair
    named = weight_set(21, "cuda:0")
    relayed_round(daemon, sender, lambda: sender.send_weights(named), 21)
    indices = torch.tensor([1, 77, 1000 * 1000 - 1], dtype=torch.int64, device="cuda:0")
    values = torch.tensor([9.0, -1.0, 0.5], device="cuda:0")
    stats, answers = relayed_round(
        daemon, sender, lambda: sender.send_sparse([SparsePatch("layer.0.mlp.weight", indices, values)]), 22)
    assert answers[-1].status_code == 200, answers[-1].text
    patched = dict(named)
    patched["layer.0.mlp.weight"] = patched["layer.0.mlp.weight"].clone()
    patched["layer.0.mlp.weight"].view(-1)[indices] = values
    assert daemon.checksum() == named_checksum(patched.items())


def test_manifest_mismatch_is_refused_before_any_copy(pair):
    backend, daemon, sender = pair
    named = weight_set(31, "cuda:0")
    relayed_round(daemon, sender, lambda: sender.send_weights(named), 31)
    before = daemon.checksum()
    wrong = list(weight_set(32, "cuda:0"))
    wrong[1] = ("layer.0.qkv.weight", torch.zeros(256, 768, dtype=torch.float32, device="cuda:0"))
    stats, answers = relayed_round(daemon, sender, lambda: sender.send_weights(wrong), 32)
    assert answers[-1].status_code == 422 and "'layer.0.qkv.weight'" in answers[-1].json()["detail"]
    assert daemon.checksum() == before
    bad_info = dict(stats.update_info)
    bad_info["ipc_handles"] = {"GPU-nope": {"format": "pickle"}}
    assert daemon.post("/start_weight_update").status_code == 200
    refused = daemon.post("/update_weights", {"update_info": bad_info})
    assert refused.status_code == 422 and "ipc_handles" in refused.text
    assert daemon.post("/abort_weight_update").status_code == 200
    assert daemon.checksum() == before


def test_a_tensor_rewritten_during_the_round_fails_verification(pair):
    """The trainer changes a lent tensor after it published its checksum (ipc: of a sample,
    which every tensor's first bytes are in; p2p: of every byte): the receiver's checksum of
    what it copied differs, the round fails with the weights marked touched, and the next
    round repairs them."""
    backend, daemon, sender = pair
    named = weight_set(41, "cuda:0")
    relayed_round(daemon, sender, lambda: sender.send_weights(named), 41)
    assert daemon.post("/start_weight_update").status_code == 200
    sender.transport.begin_round()
    stats = sender.send_weights(named)
    handles = next(iter(stats.update_info["ipc_handles"].values()))
    assert handles["sampled"] == (backend == "ipc")
    wait_for_published_digest(sender, stats.update_info)
    with torch.no_grad():
        named[3][1].view(-1)[:4] += 1  # the 4 MB tensor's first values
    torch.cuda.synchronize()
    answer = daemon.post("/update_weights", {"update_info": stats.update_info})
    sender.transport.end_round()
    assert answer.status_code == 503 and "checksum mismatch" in answer.text, answer.text
    again = weight_set(42, "cuda:0")
    stats, answers = relayed_round(daemon, sender, lambda: sender.send_weights(again), 42)
    assert [a.status_code for a in answers] == [200] and daemon.checksum() == expected(again)


def test_non_contiguous_sources_go_through_bounded_staging_in_batches(pair):
    """Transposed views need a copy: at most 2 x 1 MiB of staging, so the round takes batches
    (the 2 MiB embedding fills one; the other transposed tensors go in the next)."""
    backend, daemon, sender = pair
    named = weight_set(41, "cuda:0")
    relayed_round(daemon, sender, lambda: sender.send_weights(named), 41)
    fresh = weight_set(42, "cuda:0")
    views = list(fresh)
    for i in (0, 1, 6):  # embed (2 MiB), qkv (384 KiB), lm_head (1 MiB): same values, not contiguous
        views[i] = (fresh[i][0], fresh[i][1].t().contiguous().t())
        assert not views[i][1].is_contiguous()
    torch.cuda.reset_peak_memory_stats(0)
    baseline = torch.cuda.memory_allocated(0)
    stats, answers = relayed_round(daemon, sender, lambda: sender.send_weights(views), 42)
    assert len(answers) >= 2 and all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert daemon.checksum() == expected([(n, t.contiguous()) for n, t in views])
    extra = torch.cuda.max_memory_allocated(0) - baseline
    assert extra <= 2 * BUFFER + (8 << 20), extra  # the staging area (+ a transposition temporary)


def test_a_receiver_picks_its_own_gpus_handles_among_several(pair):
    """update_info.ipc_handles may carry several GPUs' handles (a trainer with several GPUs):
    the receiver opens only those of the GPU it sits on."""
    backend, daemon, sender = pair
    named = weight_set(51, "cuda:0")
    sender.transport.begin_round()
    stats = sender.send_weights(named)
    own = stats.update_info["ipc_handles"]
    assert set(own) == {gpu_uuid(0)}
    merged = {**stats.update_info, "ipc_handles": {"GPU-another-rank": next(iter(own.values())), **own}}
    assert daemon.post("/start_weight_update").status_code == 200
    answer = daemon.post("/update_weights", {"update_info": merged})
    assert answer.status_code == 200, answer.text
    assert daemon.post("/finish_weight_update", {"weight_version": "51"}).status_code == 200
    sender.transport.end_round()
    assert daemon.checksum() == expected(named)


def test_the_coordinator_relays_the_trainers_handles(pair):
    """The real coordinator over HTTP: the trainer agent answers with handles (in batches when
    staging fills), the coordinator hands them to the daemon."""
    from weightsync_daemon.server import serve_embedded
    from weightsync_daemon.service import SenderService
    from weightsync_operator.client import Endpoint
    from weightsync_operator.coordinator import Coordinator, SyncSpec

    backend, daemon, _ = pair
    state = {"named": weight_set(61, "cuda:0")}

    def source():
        named = list(state["named"])
        for i in (0, 6):  # transposed views need staging: 2 MiB + 1 MiB, so two batches
            named[i] = (named[i][0], named[i][1].t().contiguous().t())
        return named

    service = SenderService(source=source, backend=backend, device="cuda:0")
    server = serve_embedded(service)
    spec = SyncSpec(backend=backend, master_port=free_port(), packed_buffer_size_bytes=BUFFER,
                    packed_num_buffers=2, pause_mode=None, transfer_timeout=60)

    async def drive():
        async with Coordinator(Endpoint("trainer", server.url), [Endpoint("daemon", daemon.url)], spec) as c:
            await c.init()
            results = []
            for version in (61, 62):
                state["named"] = weight_set(version, "cuda:0")
                results.append(await c.sync(version))
                assert daemon.checksum() == expected(state["named"])
            return results

    try:
        results = asyncio.run(drive())
    finally:
        server.stop()
    assert all(r.ok for r in results), [r.reason for r in results]
    assert results[-1].bytes >= sum(t.numel() * t.element_size() for _, t in state["named"])
