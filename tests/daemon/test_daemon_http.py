"""The daemon's HTTP contract, against a real daemon process: every endpoint, the phase order,
bad bodies (4xx naming the field, weights unchanged) and metrics that move after a round."""

import asyncio

import pytest
import pytest_asyncio
import torch
from prometheus_client.parser import text_string_to_metric_families

from weightsync import WeightSender
from weightsync.store import named_checksum

NAMED = [("w", torch.arange(12, dtype=torch.float32).reshape(3, 4)), ("b", torch.ones(4).bfloat16())]


def metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def daemon(module_spawn, module_http, rendezvous_port):
    """A daemon that went through one real round, plus its trainer (shared by this module)."""
    http = module_http
    proc = await module_spawn("daemon")
    base = {"master_address": "127.0.0.1", "master_port": rendezvous_port, "world_size": 2,
            "timeout_seconds": 20, "packed_buffer_size_bytes": 1024}
    sender, answer = await asyncio.gather(
        asyncio.to_thread(WeightSender.init, base),
        http.post(proc.url + "/init_weight_transfer_engine", json={"init_info": {**base, "rank_offset": 1}}))
    assert answer.status_code == 200, answer.text
    assert (await http.post(proc.url + "/start_weight_update", json={"is_checkpoint_format": True})).status_code == 200
    _, update = await asyncio.gather(asyncio.to_thread(sender.send_weights, NAMED),
                                     http.post(proc.url + "/update_weights", json={"update_info": {
                                         "names": ["w", "b"], "dtype_names": ["float32", "bfloat16"],
                                         "shapes": [[3, 4], [4]]}}))
    assert update.status_code == 200, update.text
    finish = await http.post(proc.url + "/finish_weight_update", json={"weight_version": "step-7"})
    assert finish.json() == {"message": "weight update finished", "weight_version": "step-7"}
    proc.init_info = {**base, "rank_offset": 1}
    yield proc, sender
    sender.close()


async def checksum(http, url):
    return (await http.post(url + "/weight_checker", json={"action": "checksum"})).json()["checksum"]


async def test_read_endpoints(daemon, module_http):
    http = module_http
    proc, _ = daemon
    assert (await http.get(proc.url + "/get_world_size")).json() == {"world_size": 1}
    assert (await http.get(proc.url + "/get_world_size?include_dp=true")).json() == {"world_size": 1}
    assert (await http.get(proc.url + "/weight_info")).json() == {"weight_version": "step-7"}
    health = (await http.get(proc.url + "/healthz")).json()
    assert health["phase"] == "ready" and health["num_parameters"] == 2 and health["role"] == "receiver"
    assert await checksum(http, proc.url) == named_checksum(NAMED)
    compare = await http.post(proc.url + "/weight_checker", json={"action": "compare", "baseline": {"w": "0"}})
    assert compare.json() == {"matches": False, "mismatched": ["b", "w"]}


async def test_pause_and_resume(daemon, module_http):
    http = module_http
    proc, _ = daemon
    assert (await http.post(proc.url + "/pause?mode=keep")).json() == {"status": "paused"}
    assert (await http.get(proc.url + "/is_paused")).json() == {"is_paused": True}
    assert (await http.post(proc.url + "/resume")).json() == {"status": "resumed"}
    assert (await http.get(proc.url + "/is_paused")).json() == {"is_paused": False}


async def test_metrics_move_after_a_round(daemon, module_http):
    http = module_http
    proc, _ = daemon
    text = (await http.get(proc.url + "/metrics")).text
    assert metric(text, "weightsync_weight_version") == 7
    assert metric(text, "weightsync_received_bytes_total") >= 12 * 4 + 4 * 2
    assert metric(text, "weightsync_updates_total", outcome="success") == 1
    assert metric(text, "weightsync_update_duration_seconds_count", phase="update") == 1
    assert metric(text, "weightsync_update_duration_seconds_count", phase="init") == 1
    assert metric(text, "weightsync_last_success_timestamp_seconds") > 0
    assert metric(text, "weightsync_info", role="receiver", backend="cpu") == 1


@pytest.mark.parametrize("path, body, field", [
    ("/init_weight_transfer_engine", {}, "init_info"),
    ("/init_weight_transfer_engine", {"init_info": {"master_address": "x", "master_port": "port", "world_size": 2}},
     "init_info.master_port"),
    ("/init_weight_transfer_engine", {"init_info": {"master_address": "x", "master_port": 1, "world_size": 2,
                                                    "rank_offset": 1, "packed_num_buffers": 99}},
     "init_info.packed_num_buffers"),
    ("/update_weights", {"update_info": {"names": ["w"], "dtype_names": ["float32"], "shapes": "3x4"}},
     "update_info"),
    ("/update_weights", {"update_info": {"names": ["w"], "dtype_names": ["float32"]}}, "update_info"),
    ("/update_weights", {"update_info": []}, "update_info"),
    ("/finish_weight_update", {"weight_version": {"a": 1}}, "weight_version"),
    ("/start_weight_update", {"is_checkpoint_format": "maybe"}, "is_checkpoint_format"),
    ("/weight_checker", {"action": "explode"}, "action"),
    ("/pause?mode=forever", None, "query.mode"),
])
async def test_bad_bodies_get_422_naming_the_field_and_change_nothing(daemon, module_http, path, body, field):
    http = module_http
    proc, _ = daemon
    before = await checksum(http, proc.url)
    answer = await http.post(proc.url + path, json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"].startswith(field)
    assert field.split(".")[-1] in answer.json()["detail"] or field == "update_info"
    assert await checksum(http, proc.url) == before
    assert (await http.get(proc.url + "/healthz")).json()["phase"] == "ready"


async def test_out_of_order_phases_get_409(daemon, module_http):
    http = module_http
    proc, _ = daemon
    before = await checksum(http, proc.url)
    assert (await http.post(proc.url + "/update_weights", json={})).status_code == 409  # before start
    assert (await http.post(proc.url + "/finish_weight_update", json={})).status_code == 409  # no round
    assert (await http.post(proc.url + "/start_weight_update")).status_code == 200
    second = await http.post(proc.url + "/start_weight_update")
    assert second.status_code == 409 and "updating" in second.json()["detail"]
    assert (await http.post(proc.url + "/abort_weight_update")).json()["message"] == "round aborted"
    assert (await http.post(proc.url + "/finish_weight_update", json={})).status_code == 409
    assert await checksum(http, proc.url) == before
    text = (await http.get(proc.url + "/metrics")).text
    assert metric(text, "weightsync_update_failures_total", reason="conflict") == 4


async def test_init_twice_with_the_same_init_info_gets_409(daemon, module_http):
    proc, _ = daemon
    before = await checksum(module_http, proc.url)
    again = await module_http.post(proc.url + "/init_weight_transfer_engine", json={"init_info": proc.init_info})
    assert again.status_code == 409 and "already initialized" in again.json()["detail"]
    assert (await module_http.get(proc.url + "/healthz")).json()["phase"] == "ready"
    assert await checksum(module_http, proc.url) == before


async def test_uninitialized_daemon_refuses_to_start(module_spawn, module_http):
    http = module_http
    proc = await module_spawn("fresh")
    answer = await http.post(proc.url + "/start_weight_update")
    assert answer.status_code == 409 and "uninitialized" in answer.json()["detail"]
    wrong_backend = {"init_info": {"backend": "nccl", "master_address": "127.0.0.1", "master_port": 1,
                                   "world_size": 2, "rank_offset": 1}}
    answer = await http.post(proc.url + "/init_weight_transfer_engine", json=wrong_backend)
    assert answer.status_code == 422 and answer.json()["field"] == "init_info.backend"
