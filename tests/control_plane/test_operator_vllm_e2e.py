"""vLLM pods on Kubernetes, end to end: docs/kubernetes.md's vLLM kubectl flow run as written against the
emulated API server, kopf's real runtime over the operator's handlers, real vLLM CPU servers
(weightsync backend, tiny float32 Qwen2, TP 1) as the target pods' processes, and a real trainer
(`weightsync_operator.trainer_client.connect` + `push`, tests/helpers/k8s_vllm_trainer.py) holding the HF model.

What it shows (issue 16 items 1, 2, 4, 5): the operator drives pods annotated
`weightsync.dev/engine: vllm` through vLLM's routes; three pushes each end `Succeeded` and every
vLLM pod's greedy completions then equal the trainer's; a vLLM pod restarted between pushes
rejoins on its checkpoint (version `default`, status `Stale`, Ready False: vLLM cannot be seeded
by a peer) and the next round, which includes it, brings it to the current version; so does a
vLLM process restarted inside an unchanged pod, noticed by the health re-check (its /weight_info
lost the version); a vLLM pod killed mid-round fails that round within its timeouts naming the
pod, the other keeps serving its previous weights (atomic), and the next push succeeds without
it; a daemon pod joins (a mixed group takes the next version), and the killed pod, restarted,
catches up to the current version from the daemon without a push; a vLLM pod that hangs
mid-round (stopped, not dead) fails that round within its deadlines too.

At most two vLLM servers run at once (a restarted server's old process is stopped first).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import httpx
import pytest
import yaml

from helpers.k8s_harness import VllmTrainer, cluster, free_port, operator, pod_status, start_daemons, until
from helpers.snippets import DOCS, page_snippets
from weightsync_operator.demo import qwen2
from weightsync_operator.demo.vllm_run import MAX_TOKENS, completions
from weightsync_operator.demo.vllm_server import VllmServer
from weightsync_operator.local import LocalProcess
from weightsync_operator.pods import DAEMON_PORT_ANNOTATION, ENGINE_ANNOTATION, SYNCED_CONDITION

pytestmark = [pytest.mark.vllm, pytest.mark.k8s,
              pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl")]

NS, NAME = "rl", "qwen-policy"
TEST_ID = "tests/control_plane/test_operator_vllm_e2e.py::test_readme_vllm_flow_end_to_end"
# This machine's settings on top of docs/kubernetes.md's WeightSync: the cpu transport, free ports, and
# timeouts short enough that a dead pod fails the round in seconds.
LOCAL_SPEC = {"backend": "cpu", "rendezvousPort": None, "packedBufferSizeBytes": 1 << 20,
              "timeouts": {"requestSeconds": 10, "initSeconds": 60, "startSeconds": 20, "updateSeconds": 40,
                           "finishSeconds": 30, "transferSeconds": 5}}


def readme_blocks() -> dict[str, str]:
    """docs/kubernetes.md's blocks that this test runs, by language: the pod metadata (yaml), the
    commands (sh, in order) and the sample output (text)."""
    blocks = [s for s in page_snippets(DOCS / "kubernetes.md")
              if s.kind == "covered" and s.argument.startswith(TEST_ID)]
    by_language: dict[str, list[str]] = {}
    for block in blocks:
        by_language.setdefault(block.language or "text", []).append(block.code)
    assert sorted(by_language) == ["sh", "text", "yaml"] and len(by_language["sh"]) == 2, \
        f"docs/kubernetes.md's vLLM flow: expected a yaml, two sh and a text block covered by {TEST_ID}"
    return by_language


def kubectl_shim(directory: Path) -> Path:
    """A `kubectl` first on PATH that runs the real one, adding --validate=false to `apply`:
    the emulated API server serves no OpenAPI document, which kubectl's client-side validation
    downloads. Every command of the page runs otherwise exactly as written."""
    real = shutil.which("kubectl")
    shim = directory / "kubectl"
    shim.write_text(f'#!/bin/sh\nif [ "$1" = apply ]; then exec {real} "$@" --validate=false; fi\nexec {real} "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    return directory


async def run_block(block: str, kubeconfig: Path, bin_dir: Path, timeout: float = 60.0) -> str:
    """A docs sh block as written, with bash -euo pipefail."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    process = await asyncio.create_subprocess_exec("bash", "-euo", "pipefail", "-c", block, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"the docs block timed out:\n{block}") from None
    assert process.returncode == 0, f"the docs block failed ({process.returncode}):\n{block}\n{err.decode()}"
    return out.decode()


async def create_pod(c, name: str, template: dict | None, role: str, port: int, restarts: int = 0) -> None:
    """A running pod whose process listens on 127.0.0.1:`port`: a vLLM pod takes the page's
    metadata and readiness gate as written, but its port (every server here shares one address)."""
    if template is None:
        template = {"metadata": {"labels": {"weightsync.dev/role": role, "weightsync.dev/sync": NAME}}}
    metadata = template["metadata"]
    annotations = {**metadata.get("annotations", {}), DAEMON_PORT_ANNOTATION: str(port)}
    await c.request("POST", f"/api/v1/namespaces/{NS}/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": metadata["labels"], "annotations": annotations},
        "spec": {"containers": [{"name": "main", "image": f"weightsync/{role}"}], **template.get("spec", {})},
        "status": pod_status(True, restarts)})


def gate(c, pod: str) -> tuple[str | None, str | None]:
    """(the pod's weightsync.dev/synced condition, its Ready condition), as the API server holds them."""
    conditions = {x["type"]: x["status"] for x in (c.pod(NS, pod) or {}).get("status", {}).get("conditions", [])}
    return conditions.get(SYNCED_CONDITION), conditions.get("Ready")


def signal_before_its_update(runtime, pod: str, server: VllmServer, sig: signal.Signals) -> None:
    """Send `sig` to `pod`'s vLLM server the moment the coordinator next asks it to receive, after
    every party started (its update session is open, the trainer about to send)."""
    victim = next(t for t in runtime.existing(NS, NAME).coordinator.targets if t.name == pod)
    real_update = victim.update

    async def signal_then_update(update_info, timeout):
        os.killpg(server.process.pid, sig)
        return await real_update(update_info, timeout)

    victim.update = signal_then_update


def target(obj: dict, pod: str) -> dict:
    return next((t for t in (obj.get("status") or {}).get("targets") or [] if t["pod"] == pod), {})


async def test_readme_vllm_flow_end_to_end(tmp_path, vllm_python):
    blocks = readme_blocks()
    pod_template = yaml.safe_load(blocks["yaml"][0])
    assert pod_template["metadata"]["annotations"][ENGINE_ANNOTATION] == "vllm"
    assert pod_template["spec"]["readinessGates"] == [{"conditionType": SYNCED_CONDITION}]
    prompts = qwen2.prompts()
    bin_dir = kubectl_shim(tmp_path)
    servers: dict[str, VllmServer] = {}
    daemons: dict[str, LocalProcess] = {}
    trainer: VllmTrainer | None = None
    async with cluster(tmp_path) as c, operator(c.url, recheck_interval=5) as runtime, \
            httpx.AsyncClient() as http:
        try:
            # The page's WeightSync, applied as written; then this machine's transport and ports.
            assert "created" in await run_block(blocks["sh"][0], c.kubeconfig, bin_dir)
            await c.patch_weightsync(NS, NAME, {"spec": {**LOCAL_SPEC, "rendezvousPort": free_port()}})
            await c.wait_for(NS, NAME, lambda o: (o.get("status") or {}).get("phase") == "Pending", 30, "Pending")

            began = time.monotonic()
            trainer = await VllmTrainer.start(vllm_python, c.kubeconfig, tmp_path / "model", "qwen-trainer-0", NS, NAME)
            started = await asyncio.gather(*(VllmServer.start(tmp_path / "model", free_port(), tmp_path / name,
                                                              python=vllm_python)
                                             for name in ("vllm-0", "vllm-1")))
            servers = {"qwen-vllm-0": started[0], "qwen-vllm-1": started[1]}
            print(f"trainer and two vLLM servers up in {time.monotonic() - began:.1f}s")
            for name, server in servers.items():
                await create_pod(c, name, pod_template, "inference", int(server.url.rsplit(":", 1)[1]))
            await create_pod(c, "qwen-trainer-0", None, "trainer", int(trainer.process.url.rsplit(":", 1)[1]))
            ready = await trainer.command(120, cmd="wait_ready", timeout=100)
            assert ready["ok"] and ready["rendezvous"]["worldSize"] == 3, ready  # a rank per vLLM worker
            assert {t["pod"]: t["rank"] for t in c.weightsync(NS, NAME)["status"]["targets"]} == \
                {"qwen-vllm-0": 1, "qwen-vllm-1": 2}

            async def served() -> dict[str, list[list[int]]]:
                answers = await asyncio.gather(*(completions(http, s.url, str(tmp_path / "model"), prompts)
                                                 for s in servers.values()))
                return dict(zip(servers, answers, strict=True))

            async def push_and_check(version: int) -> list[list[int]]:
                t0 = time.monotonic()
                answer = await trainer.push(version)
                assert answer["ok"], answer
                obj = c.weightsync(NS, NAME)
                status = obj["status"]
                assert (status["phase"], status["currentVersion"], status["lastSync"]["outcome"]) == \
                    ("Succeeded", version, "Succeeded"), status
                members = [*servers, *daemons]
                assert status["readyTargets"] == f"{len(members)}/{len(members)}"
                assert {t["pod"]: (t["state"], t["version"]) for t in status["targets"]} == \
                    {name: ("Synced", str(version)) for name in members}
                expected = await trainer.expected(prompts, MAX_TOKENS)
                for name, got in (await served()).items():
                    assert got == expected, f"version {version}: {name} serves {got}, the trainer {expected}"
                print(f"version {version}: Succeeded, {status['lastSync']['bytes']} bytes, round "
                      f"{status['lastSync']['totalSeconds']:.3f}s, push {time.monotonic() - t0:.2f}s; "
                      f"{len(servers)} vLLM pod(s) equal the trainer's greedy completions"
                      + (f", {len(daemons)} daemon pod(s) Synced" if daemons else ""))
                return expected

            initial = (await served())["qwen-vllm-0"]
            first = await push_and_check(1)
            assert first != initial  # the training step changed what is served

            # A vLLM pod restarted between pushes: a new process (here on a new port) with its
            # checkpoint's weights. It rejoins on them (vLLM's version `default`); the next round includes it.
            await servers["qwen-vllm-1"].stop()
            t0 = time.monotonic()
            servers["qwen-vllm-1"] = await VllmServer.start(tmp_path / "model", free_port(), tmp_path / "vllm-1b",
                                                            python=vllm_python)
            print(f"qwen-vllm-1 restarted in {time.monotonic() - t0:.1f}s")
            await c.restart_pod(NS, "qwen-vllm-1", servers["qwen-vllm-1"].url, restarts=1)
            obj = await c.wait_for(NS, NAME, lambda o: o["status"].get("phase") == "Ready"
                                   and target(o, "qwen-vllm-1").get("state") == "Stale", 120,
                                   "the group re-formed with the restarted pod, Stale")
            assert target(obj, "qwen-vllm-0")["state"] == "Synced" and obj["status"]["readyTargets"] == "1/2"
            assert target(obj, "qwen-vllm-1")["version"] == "default"  # vLLM's label for its checkpoint
            ready_condition = next(x for x in obj["status"]["conditions"] if x["type"] == "Ready")
            assert ready_condition["status"] == "False"
            # Its readiness gate holds it out of its Service while it serves its checkpoint.
            await until(lambda: gate(c, "qwen-vllm-1") == ("False", "False"), 10, "qwen-vllm-1 not Ready")
            await until(lambda: gate(c, "qwen-vllm-0") == ("True", "True"), 10, "qwen-vllm-0 still Ready")
            # ... and it never went unready while the group re-formed around the other pod.
            assert all({x["type"]: x["status"] for x in p["status"]["conditions"]}.get(SYNCED_CONDITION) != "False"
                       for p in c.pod_history(NS, "qwen-vllm-0"))
            assert (await served())["qwen-vllm-1"] == initial  # its checkpoint, until the next round
            await push_and_check(2)  # back on the current version, with the round that includes it
            await until(lambda: gate(c, "qwen-vllm-1") == ("True", "True"), 10, "qwen-vllm-1 Ready again")

            # A vLLM process restarted inside an unchanged pod (a supervisor, no restartCount):
            # nothing about the pod changes, and vLLM's /health cannot say it left the group. The
            # health re-check sees /weight_info no longer on the version of its last round and
            # re-forms the group. (No re-check runs while the server is down, as with a long
            # --recheck-interval, so only that check can notice it.)
            reconciler = runtime.existing(NS, NAME)
            reconciler.recheck_interval = 3600
            port = int(servers["qwen-vllm-0"].url.rsplit(":", 1)[1])
            await servers["qwen-vllm-0"].stop()
            servers["qwen-vllm-0"] = await VllmServer.start(tmp_path / "model", port, tmp_path / "vllm-0b",
                                                            python=vllm_python)
            reconciler.recheck_interval = 1
            reconciler.wake.set()
            await c.wait_for_event(NS, NAME, "PartyLost", "qwen-vllm-0 serves version default, not 2 (restarted?)", 30)
            obj = await c.wait_for(NS, NAME, lambda o: o["status"].get("phase") == "Ready"
                                   and target(o, "qwen-vllm-0").get("state") == "Stale", 60,
                                   "the group re-formed with the restarted process, Stale")
            assert target(obj, "qwen-vllm-1")["state"] == "Synced"
            # Restarted inside its pod: nothing about the pod changed, yet its gate goes False.
            await until(lambda: gate(c, "qwen-vllm-0") == ("False", "False"), 10, "qwen-vllm-0 not Ready")
            reconciler.recheck_interval = 5
            third = await push_and_check(3)
            await until(lambda: gate(c, "qwen-vllm-0") == ("True", "True"), 10, "qwen-vllm-0 Ready again")

            # The page's inspection commands, as written.
            table = await run_block(blocks["sh"][1], c.kubeconfig, bin_dir)
            assert_matches_sample(table, blocks["text"][0])

            # A vLLM pod killed mid-round: the moment the coordinator asks it to receive, after
            # every party started (its update session is open, the trainer about to send).
            killed = servers["qwen-vllm-1"]
            signal_before_its_update(runtime, "qwen-vllm-1", killed, signal.SIGKILL)
            t0 = time.monotonic()
            answer = await trainer.push(4)
            elapsed = time.monotonic() - t0
            assert not answer["ok"] and "qwen-vllm-1" in answer["reason"], answer
            print(f"version 4: Failed after {elapsed:.1f}s: {answer['reason'][:300]}")
            assert elapsed < 60  # within the round's timeouts (request 10 s, transfer 5 s)
            status = c.weightsync(NS, NAME)["status"]
            assert status["phase"] == "Failed" and "qwen-vllm-1" in status["message"]
            assert status["lastSync"]["outcome"] == "Failed" and status["currentVersion"] == 3
            assert target(c.weightsync(NS, NAME), "qwen-vllm-1")["state"] in ("Failed", "Unreachable")
            await c.wait_for_event(NS, NAME, "SyncFailed", "qwen-vllm-1", 10)
            # The other pod keeps serving version 3 (atomic: nothing of the failed round loaded).
            survivor = servers["qwen-vllm-0"]
            assert (await http.get(survivor.url + "/health")).status_code == 200
            assert (await http.get(survivor.url + "/weight_info")).json()["weight_version"] == "3"
            assert not (await http.get(survivor.url + "/is_paused")).json()["is_paused"]
            assert await completions(http, survivor.url, str(tmp_path / "model"), prompts) == third

            # The kubelet sees the dead container; the group re-forms without it and the next push lands.
            await killed.stop()
            del servers["qwen-vllm-1"]
            await c.set_pod_ready(NS, "qwen-vllm-1", False, restarts=1)
            await push_and_check(5)

            # A mixed group: a weightsync daemon pod joins the vLLM pod (one receives through its
            # daemon's routes, the other through vLLM's) and both take version 6.
            (daemons["qwen-daemon-0"],) = await start_daemons(1, "qwen-daemon")
            await c.create_pod(NS, "qwen-daemon-0", "inference", NAME, daemons["qwen-daemon-0"].url,
                               rendezvous_port=free_port())
            await c.wait_for(NS, NAME, lambda o: o["status"].get("phase") == "Ready"
                             and target(o, "qwen-daemon-0").get("rank") is not None, 60, "the mixed group")
            sixth = await push_and_check(6)

            # The killed pod's container restarts: it rejoins on its checkpoint and catches up to
            # version 6 from the daemon that holds it (vLLM cannot seed, a daemon can), no push.
            t0 = time.monotonic()
            servers["qwen-vllm-1"] = await VllmServer.start(tmp_path / "model", free_port(), tmp_path / "vllm-1c",
                                                            python=vllm_python)
            await c.restart_pod(NS, "qwen-vllm-1", servers["qwen-vllm-1"].url, restarts=2)
            caught = await c.wait_for_event(NS, NAME, "CaughtUp", "qwen-vllm-1", 120)
            obj = await c.wait_for(NS, NAME, lambda o: o["status"].get("phase") == "Ready"
                                   and target(o, "qwen-vllm-1").get("state") == "Synced", 60,
                                   "the restarted pod caught up and in the group")
            assert target(obj, "qwen-vllm-1")["version"] == "6" and obj["status"]["readyTargets"] == "3/3"
            assert obj["status"]["lastCatchUp"]["source"] == "qwen-daemon-0"
            assert (await served())["qwen-vllm-1"] == sixth
            print(f"qwen-vllm-1 back after {time.monotonic() - t0:.1f}s on version 6 from the daemon: "
                  f"{caught['message']}")
            seventh = await push_and_check(7)

            # A vLLM pod that hangs mid-round (SIGSTOP: alive, silent) instead of dying: every
            # call to it has a deadline, so the round still ends, Failed, naming it, and the
            # others keep serving version 7.
            hung = servers["qwen-vllm-1"]
            signal_before_its_update(runtime, "qwen-vllm-1", hung, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                answer = await trainer.push(8)
            finally:
                os.killpg(hung.process.pid, signal.SIGKILL)  # never resumed: its session is broken
            elapsed = time.monotonic() - t0
            print(f"version 8 (qwen-vllm-1 hung): Failed after {elapsed:.1f}s: {answer.get('reason', '')[:300]}")
            assert not answer["ok"] and "qwen-vllm-1" in answer["reason"], answer
            # Bounded by its deadlines: the others' grace and the abort and resume calls to the
            # silent pod (requestSeconds 10 each), the collectives' transferSeconds (5).
            assert elapsed < 90
            status = c.weightsync(NS, NAME)["status"]
            assert status["phase"] == "Failed" and status["lastSync"]["outcome"] == "Failed"
            assert status["currentVersion"] == 7
            assert await completions(http, servers["qwen-vllm-0"].url, str(tmp_path / "model"), prompts) == seventh
            daemon_health = (await http.get(daemons["qwen-daemon-0"].url + "/healthz")).json()
            assert (daemon_health["weight_version"], daemon_health["weights_intact"]) == ("7", True), daemon_health
        finally:
            if trainer is not None:
                await trainer.process.stop()
            await asyncio.gather(*(s.stop() for s in [*servers.values(), *daemons.values()]),
                                 return_exceptions=True)


def assert_matches_sample(table: str, sample: str) -> None:
    """The page's sample output and what its commands printed: the same header, the same row
    cells but the measured ones (GB/s, duration, age), the same targets' lines."""
    got, want = table.strip().splitlines(), sample.strip().splitlines()
    assert len(got) == len(want), f"docs sample:\n{sample}\nkubectl printed:\n{table}"
    assert got[0].split() == want[0].split()
    assert got[1].split()[:4] == want[1].split()[:4]
    assert [float(x) > 0 for x in got[1].split()[4:6]] == [True, True]
    assert [line.split() for line in got[2:]] == [line.split() for line in want[2:]], table
