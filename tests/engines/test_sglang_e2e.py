"""weightsync inside a real SGLang server (0.5.23, CPU engine), end to end.

A trainer process (tests/helpers/sglang_trainer.py, run with the SGLang venv's python) holds a
tiny fp32 model in Hugging Face transformers, saves it as the checkpoint a real SGLang server
starts from, and pushes new weights every round through SGLang's own routes
(weightsync_sglang.trainer: /pause_generation, /begin_weight_update,
/update_weights_from_distributed with the weightsync group, /end_weight_update,
/continue_generation). After every round SGLang's greedy tokens must be the token ids HF's greedy
generation gives on the trainer's weights. One server per architecture serves all of its checks
(a start costs 20-60 s and ~4 GB).

The SGLang venv is found through WEIGHTSYNC_SGLANG_PYTHON (default .venv-sglang/bin/python, which
`make sglang-venv` builds). Without it these tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from helpers.sglang_server import (
    CPU_KERNEL, INIT_FIELDS, MAX_TOKENS, PROMPTS, TIMEOUT_S, SGLangServer, SGLangTrainerProcess,
)
from weightsync_operator.local import free_port

pytestmark = pytest.mark.sglang


ADMIN_KEY = "s3cret-admin"  # the Qwen2 server's --admin-api-key: the trainer must send it


def _start(python: str, tmp, arch: str, tp: int = 1, admin_key: str | None = None,
           metrics_port: int | None = None) -> dict[str, Any]:
    """A trainer and an SGLang server on the trainer's checkpoint, joined in one weightsync group."""
    trainer = SGLangTrainerProcess(python, tmp, arch=arch)
    state: dict[str, Any] = {"trainer": trainer, "server": None, "tmp": tmp, "arch": arch, "python": python,
                             "fields": {**INIT_FIELDS, **({"api_key": admin_key} if admin_key else {})}}
    try:
        server = state["server"] = SGLangServer(python, tmp, trainer.model_dir, tp=tp, admin_key=admin_key,
                                                metrics_port=metrics_port)
        state["metrics_port"] = metrics_port
        print(f"\n[{arch}] SGLang healthy after {server.start_seconds:.1f}s", file=sys.stderr)
        joined = trainer.ask(cmd="init", url=server.url, master_port=free_port(), fields=state["fields"])
        assert joined["world_size"] == 1 + tp
    except BaseException:
        _stop(state)
        raise
    return state


def _stop(state: dict[str, Any]) -> None:
    state["trainer"].stop()  # a test may have replaced it
    if state["server"] is not None:
        state["server"].stop()


@pytest.fixture(scope="module")
def qwen2(sglang_python, tmp_path_factory):
    """The tiny Qwen2 served by SGLang, with its trainer: shared by the module's Qwen2 checks."""
    state = _start(sglang_python, tmp_path_factory.mktemp("sglang-qwen2"), "qwen2", admin_key=ADMIN_KEY,
                   metrics_port=free_port())
    yield state
    _stop(state)


def _rounds(state: dict[str, Any], seeds: tuple[int, ...]) -> list[list[int]]:
    """Rounds of new weights; after each, SGLang's greedy ids equal HF's and its version is the round's."""
    trainer, server = state["trainer"], state["server"]
    previous = server.completions()
    assert previous == trainer.hf_greedy(), "SGLang should serve the trainer's checkpoint as HF does"
    for seed in seeds:
        version = f"{state['arch']}-v{seed}"
        pushed = trainer.ask(cmd="round", seed=seed, version=version)
        assert pushed["tensors"] == len(trainer.ready["names"])
        expected = trainer.hf_greedy()
        assert expected != previous, "the new weights should change the greedy output"
        assert server.completions() == expected, f"round {seed}"
        assert server.weight_version() == version
        previous = expected
    print(f"\n[{state['arch']}] {len(seeds)} rounds: SGLang's greedy ids equal HF's after each "
          f"(last: {previous[0]})", file=sys.stderr)
    return previous


def test_every_round_lands_in_sglang_qwen2(qwen2):
    qwen2["expected"] = _rounds(qwen2, (1, 2, 3))


def test_the_admin_routes_take_only_the_admin_key(qwen2):
    """With --admin-api-key, SGLang's weight-update and pause routes refuse a caller without it
    (the trainer sends it: api_key); generation stays open."""
    url = qwen2["server"].url
    for path in ("/init_weights_update_group", "/update_weights_from_distributed", "/pause_generation"):
        assert httpx.post(url + path, json={}, timeout=30).status_code == 401, path
    assert httpx.post(url + "/generate", json={"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 1}},
                      timeout=60).status_code == 200


@pytest.mark.parametrize("kind", ["unknown_name", "wrong_shape", "wrong_dtype"])
def test_a_mismatched_manifest_is_refused_and_serving_is_unchanged(qwen2, kind):
    """Refused before any byte loads, naming the tensor; SGLang serves what it served, labelled so."""
    trainer, server = qwen2["trainer"], qwen2["server"]
    version = server.weight_version()
    answer = trainer.ask(cmd="bad_round", kind=kind)
    refused = answer["refused"]
    assert refused is not None, "SGLang accepted a manifest its checkpoint does not match"
    print(f"\n[{kind}] refused in {answer['seconds']:.2f}s: {refused}", file=sys.stderr)
    assert answer["name"] in refused and "weightsync update refused" in refused, refused
    assert "intact (nothing of this round was loaded)" in refused, refused
    assert server.completions() == trainer.hf_greedy() == qwen2["expected"]
    assert server.weight_version() == version


@pytest.mark.parametrize("options, field", [
    ('{"packed": "maybe"}', "init_info.packed"),
    ('{"timeout_seconds": -1}', "init_info.timeout_seconds"),
    ('{"packed": tru', "group_name"),
])
def test_a_bad_init_is_refused_naming_the_field(qwen2, options, field):
    """SGLang answers 400 with weightsync's reason; the group already joined stays (the rounds
    after this one use it)."""
    body = {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2,
            "backend": "weightsync", "group_name": options}
    response = qwen2["server"].http.post("/init_weights_update_group", json=body)
    assert response.status_code == 400 and field in response.json()["message"], response.text
    assert qwen2["trainer"].ask(cmd="round", seed=11, version="after-bad-init-7")
    qwen2["expected"] = qwen2["trainer"].hf_greedy()
    assert qwen2["server"].completions() == qwen2["expected"]


def _scrape(port: int) -> dict[str, float]:
    """The worker's metrics, `name{labels}` -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {sample.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items())) + "}"
                           if sample.labels else ""): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_workers_metrics_follow_the_rounds(qwen2):
    """The daemon's families from the SGLang worker, on its own port: the rounds that landed, the
    refusals by reason, the served version's number (SGLang's label, read at the scrape)."""
    metrics = _scrape(qwen2["metrics_port"])
    print(f"\n[metrics] {[f'{k} {v:g}' for k, v in metrics.items() if 'update' in k and 'bucket' not in k]}",
          file=sys.stderr)
    assert metrics['weightsync_info{backend="cpu",role="receiver"}'] == 1
    assert metrics['weightsync_updates_total{outcome="success"}'] == 6  # three rounds, one after each bad init
    assert metrics['weightsync_updates_total{outcome="failure"}'] == 3  # the three refused manifests
    assert metrics['weightsync_update_failures_total{reason="manifest_mismatch"}'] == 3
    assert metrics['weightsync_update_failures_total{reason="bad_request"}'] == 3  # the bad inits, by field
    assert metrics["weightsync_weights_intact"] == 1 and metrics["weightsync_received_bytes_total"] > 0
    assert metrics["weightsync_weight_version"] == 7  # SGLang serves "after-bad-init-7"
    assert metrics['weightsync_update_duration_seconds_count{phase="update"}'] == 9


def test_a_partial_round_lands_exactly(qwen2):
    """Only q_proj of one layer: SGLang loads it into its fused qkv parameter in place, so the
    other slices keep their values and the greedy ids equal HF's."""
    trainer, server = qwen2["trainer"], qwen2["server"]
    answer = trainer.ask(cmd="subset", seed=31, params=r"^model\.layers\.0\.self_attn\.q_proj\.", version="part")
    assert answer["refused"] is None, answer["refused"]
    assert answer["sent"] == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"]
    qwen2["expected"] = trainer.hf_greedy()
    assert server.completions() == qwen2["expected"]
    assert server.weight_version() == "part"


def test_an_in_place_update_during_a_long_generation(qwen2):
    """Paused in place mid-generation: the request keeps its KV cache, continues on the new
    weights, and SGLang's per-request `weight_versions` say which tokens came from which."""
    trainer, server = qwen2["trainer"], qwen2["server"]
    before = server.weight_version()
    with ThreadPoolExecutor(max_workers=1) as pool:
        long = pool.submit(server.generate, PROMPTS[0], 200)
        _wait_until_generating(server)
        trainer.ask(cmd="round", seed=77, version="in-place", pause_mode="in_place")
        answer = long.result(timeout=300)
    versions = answer["meta_info"]["weight_versions"]
    print(f"\n[in_place] one request's weight_versions: {versions}", file=sys.stderr)
    assert [v["version"] for v in versions] == [before, "in-place"], versions
    assert versions[0]["start"] == 0 and versions[-1]["end"] == 200 and versions[0]["end"] == versions[1]["start"]
    # The prompts' cached prefixes hold KV of the old weights (an in-place round cannot flush
    # while the request holds its cache): flushed now that it is done, as the trainer's docs say.
    assert server.http.post("/flush_cache", params={"timeout": 60}).status_code == 200
    qwen2["expected"] = trainer.hf_greedy()
    assert server.completions() == qwen2["expected"]


def _wait_until_generating(server: SGLangServer, deadline_s: float = 60.0) -> None:
    """Until the server reports a running request (its /server_info load), polled with a deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        info = server.http.get("/server_info").json()
        states = info.get("internal_states") or [{}]
        if any(s.get("num_running_reqs", 0) or s.get("#running-req", 0) for s in states if isinstance(s, dict)):
            return
        if _running_from_log(server):
            return
        time.sleep(0.05)
    raise AssertionError(f"no request running within {deadline_s}s")


def _running_from_log(server: SGLangServer) -> bool:
    return "Decode batch" in server.tail()


def _kill_mid_round(state: dict[str, Any], after_broadcasts: int) -> tuple[dict[str, Any], float]:
    """The test drives SGLang's routes (pause, begin, update) while the trainer sends slowly; the
    trainer is SIGKILLed when it announces broadcast number `after_broadcasts`, 1 s before it.
    Returns SGLang's answer to the update and how long after the kill it came."""
    trainer, http = state["trainer"], state["server"].http
    assert http.post("/pause_generation", json={"mode": "retract"}).status_code == 200
    assert http.post("/begin_weight_update", json={}).status_code == 200
    body = {"names": [], "dtypes": [], "shapes": [], "group_name": "weightsync", "weight_version": "never"}
    with ThreadPoolExecutor(max_workers=1) as pool:
        update = pool.submit(lambda: (http.post("/update_weights_from_distributed", json=body), time.monotonic()))
        trainer.send(cmd="send_slowly", seed=4040, delay=1.0)
        while trainer.next(timeout=60).get("broadcasts", 0) < after_broadcasts:
            pass
        trainer.process.kill()
        killed = time.monotonic()
        response, answered = update.result(timeout=TIMEOUT_S + 60)
    assert http.post("/end_weight_update", json={}).status_code == 200
    assert http.post("/continue_generation", json={}).status_code == 200
    assert response.status_code == 400, response.text
    assert answered - killed < TIMEOUT_S + 5, f"SGLang's update took {answered - killed:.1f}s to fail"
    return response.json(), answered - killed


def _restart_trainer(state: dict[str, Any], name: str, **fields: Any) -> SGLangTrainerProcess:
    """A new trainer process with the same weights the server's checkpoint had (seed 0), joined
    anew (SGLang's workers replace their group)."""
    state["trainer"].stop()
    fresh = state["trainer"] = SGLangTrainerProcess(state["python"], state["tmp"], arch=state["arch"], name=name)
    fresh.ask(cmd="init", url=state["server"].url, master_port=free_port(), fields={**state["fields"], **fields})
    return fresh


def test_the_trainer_killed_mid_round(qwen2):
    """Killed before any tensor was complete: the update fails within timeout_seconds, says the
    weights are intact, and SGLang serves the previous weights under the previous version. Killed
    later without `atomic`: SGLang says its weights are NOT intact, still serves, and a new
    trainer's full round repairs them."""
    server = qwen2["server"]
    version = server.weight_version()
    answer, seconds = _kill_mid_round(qwen2, after_broadcasts=1)
    print(f"\n[killed] update failed {seconds:.2f}s after the kill: {answer['message']}", file=sys.stderr)
    assert "keeps serving the previous weights, intact" in answer["message"], answer
    assert server.completions() == qwen2["expected"]
    assert server.weight_version() == version

    _restart_trainer(qwen2, "trainer-atomic", atomic=True)
    answer, _ = _kill_mid_round(qwen2, after_broadcasts=3)  # chunk 1 went out 1 s ago: staged, not loaded
    assert "keeps serving the previous weights, intact" in answer["message"], answer
    assert server.completions() == qwen2["expected"]

    _restart_trainer(qwen2, "trainer2")
    answer, _ = _kill_mid_round(qwen2, after_broadcasts=3)  # chunk 1 went out 1 s ago: part loaded
    assert "weights are NOT intact" in answer["message"], answer
    assert len(server.completions()) == len(PROMPTS)  # still serving

    fresh = _restart_trainer(qwen2, "trainer3")
    fresh.ask(cmd="round", seed=2024, version="repaired")
    assert server.completions() == fresh.hf_greedy()
    assert server.weight_version() == "repaired"


async def test_the_coordinator_drives_sglang(qwen2):
    """The operator's coordinator drives SGLang as it drives vLLM (client.SglangClient, target
    kind `sglang`): the trainer is a weightsync agent (the demo's, on this server's checkpoint);
    after a training step and a sync, SGLang serves the round's version and its greedy ids equal
    the trainer's HF ones; a second round in `keep` (SGLang's retract) lands too."""
    from weightsync.tokens import TOKEN_ENV
    from weightsync_operator.client import Endpoint
    from weightsync_operator.coordinator import Coordinator, SyncSpec, Timeouts
    from weightsync_operator.local import LocalProcess

    server, python = qwen2["server"], qwen2["python"]
    agent = await LocalProcess.start(
        "trainer", "weightsync_operator.demo.qwen2_trainer",
        ["--model", str(qwen2["trainer"].model_dir), "--backend", "cpu", "--exit-on-stdin-eof"], 180,
        {TOKEN_ENV: ADMIN_KEY}, python=python)
    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as http:
            for number, mode in ((31, "wait"), (32, "keep")):
                spec = SyncSpec(backend="cpu", master_port=free_port(), packed_buffer_size_bytes=1 << 20,
                                transfer_timeout=TIMEOUT_S, pause_mode=mode, timeouts=Timeouts(init=120, update=120))
                async with Coordinator(agent.endpoint, [Endpoint("sglang", server.url, kind="sglang")], spec, http,
                                       ADMIN_KEY) as coordinator:
                    group = await coordinator.init()
                    assert (group.world_size, group.ranks) == (2, {"trainer": 0, "sglang": 1})
                    (await http.post(agent.url + "/demo/train_step")).raise_for_status()
                    result = await coordinator.sync(str(number))
                    assert result.ok, result.reason
                    assert [(t.name, t.weight_version) for t in result.targets] == [("sglang", str(number))]
                reference = (await http.post(agent.url + "/demo/generate",
                                             json={"prompts": PROMPTS, "max_tokens": MAX_TOKENS})).json()
                assert server.completions() == reference["completions"], mode
                assert server.weight_version() == str(number)
        print(f"\n[coordinator] two syncs ({result.bytes:,} bytes each) landed in SGLang; greedy ids equal HF's",
              file=sys.stderr)
    finally:
        await agent.stop()


def test_every_round_lands_in_sglang_llama(sglang_python, tmp_path_factory, qwen2):
    """The second architecture (Llama: no q/k/v biases). Started after the Qwen2 checks, with
    the Qwen2 server stopped first (two servers would not fit 2 cores' time)."""
    _stop(qwen2)
    qwen2["server"] = None
    state = _start(sglang_python, tmp_path_factory.mktemp("sglang-llama"), "llama")
    try:
        _rounds(state, (5, 6))
    finally:
        _stop(state)


async def test_the_sglang_demo_verifies_every_round(sglang_python, tmp_path, monkeypatch):
    """`weightsync demo --engine sglang` (as `make demo-sglang` runs it on a CPU machine): a
    trainer agent, a real SGLang server and the coordinator; every round verified by SGLang's
    greedy completions against the trainer's HF ones."""
    from weightsync_operator.demo.sglang_run import describe, run_sglang_demo

    monkeypatch.setenv("PYTHONPATH", str(CPU_KERNEL))  # SGLang's CPU engine: the kernel stand-in
    said: list[str] = []
    reports = await run_sglang_demo(rounds=2, cpu=True, work_dir=tmp_path, python=sglang_python, say=said.append)
    print("\n[demo] " + "\n[demo] ".join(said), file=sys.stderr)
    assert len(reports) == 2 and all(r.verified for r in reports), [describe(r, {}) for r in reports]
    assert all(r.changed for r in reports), "each training step should change SGLang's completions"
