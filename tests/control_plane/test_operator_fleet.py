"""The fleet on Kubernetes (issue 25): traffic only to pods that serve the current version. kopf's
real runtime against the emulated API server, real daemon processes and a real trainer process,
and the real kubectl reading the pods as the API server prints them."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import httpx
import yaml

import pytest

from helpers.k8s_harness import (
    NAME, NS, Trainer, VllmTrainer, checksums, cluster, free_port, operator, spec, start_daemons, until,
)
from weightsync_operator.pods import SYNCED_CONDITION

pytestmark = [pytest.mark.k8s, pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl")]


README_TEST = "tests/control_plane/test_operator_fleet.py::test_one_lost_replica_never_fails_the_rest"


def readme_fleet() -> tuple[dict, dict, str]:
    """The README's fleet blocks: the WeightSync's fields, the pods' spec, the sample output."""
    from helpers.snippets import README, snippets

    blocks = [s for s in snippets(README.read_text()) if s.kind == "covered" and s.argument.startswith(README_TEST)]
    (config,) = [b for b in blocks if b.language == "yaml"]
    (sample,) = [b for b in blocks if b.language == ""]
    weightsync, pod = yaml.safe_load_all(config.code)
    return weightsync["spec"], pod["spec"], sample.code


def assert_same_lines(printed: str, sample: str) -> None:
    """kubectl's tables and the README's sample: the same lines and cells, but the measured ones
    (GB/s, duration) and the ages."""
    got, want = [line.split() for line in printed.strip().splitlines()], \
        [line.split() for line in sample.strip().splitlines()]
    assert len(got) == len(want), f"README:\n{sample}\nkubectl:\n{printed}"
    assert got[0] == want[0] and got[1][:4] == want[1][:4] and float(got[1][4]) > 0 and float(got[1][5]) > 0
    age = want[2].index("AGE")
    assert [row[:age] + row[age + 1:] for row in got[2:]] == [row[:age] + row[age + 1:] for row in want[2:]], printed


async def kubectl(kubeconfig, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "kubectl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)})
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


def conditions(pod: dict | None) -> dict[str, str]:
    return {c["type"]: c["status"] for c in ((pod or {}).get("status") or {}).get("conditions") or []}


async def kubectl_pods(kubeconfig, namespace: str) -> dict[str, dict[str, str]]:
    """`kubectl get pods -o wide`, as columns by pod name."""
    out = await kubectl(kubeconfig, "get", "pods", "-n", namespace, "-o", "wide")
    header, *rows = out.splitlines()
    starts = [header.index(column) for column in ("NAME", "READY", "STATUS", "RESTARTS", "READINESS GATES")]
    print(out)
    return {row[:starts[1]].strip(): {"READY": row[starts[1]:starts[2]].strip(),
                                      "READINESS GATES": row[starts[4]:].strip()} for row in rows}


async def test_only_pods_on_the_current_version_are_ready(tmp_path):
    """Two gated daemon pods and one without the gate: gates 0/1 until the group holds the
    current version, 1/1 once it does; a restarted pod goes 0/1 (Ready False) until it caught up
    from its peer, then 1/1 again. The pod without the gate is left alone."""
    async with cluster(tmp_path) as c, operator(c.url, recheck_interval=0.5):
        await c.create_weightsync(NS, NAME, spec(free_port()))
        daemons, trainer = await asyncio.gather(start_daemons(4), Trainer.start(c, NS, NAME, "trainer-0"))
        try:
            gated, plain = daemons[:2], daemons[2]
            for d in gated:
                await c.create_pod(NS, d.name, "inference", NAME, d.url, gated=True)
            await c.create_pod(NS, plain.name, "inference", NAME, plain.url)
            # No trainer yet, so no group: the gated pods are not ready. (Once a group forms, a
            # target holds version 0, "nothing published", at once: its gate turns True.)
            pods = await kubectl_pods(c.kubeconfig, NS)
            assert [pods[d.name]["READINESS GATES"] for d in gated] == ["0/1", "0/1"]
            assert pods[plain.name]["READINESS GATES"] == "<none>" and pods[plain.name]["READY"] == "1/1"
            assert all(conditions(c.pod(NS, d.name))["Ready"] == "False" for d in gated)
            await c.create_pod(NS, "trainer-0", "trainer", NAME, trainer.url)

            await c.wait_for(NS, NAME, lambda o: (o.get("status") or {}).get("readyTargets") == "3/3", 60,
                             "the group formed with all three targets")
            assert (await trainer.wait_ready())["ok"]
            answer = await trainer.push(1)
            assert answer["ok"], answer
            await until(lambda: all(conditions(c.pod(NS, d.name)).get(SYNCED_CONDITION) == "True" for d in gated),
                        30, "both gates True")
            pods = await kubectl_pods(c.kubeconfig, NS)
            assert [pods[d.name]["READINESS GATES"] for d in gated] == ["1/1", "1/1"]
            assert all(conditions(c.pod(NS, d.name))["Ready"] == "True" for d in gated)
            assert SYNCED_CONDITION not in conditions(c.pod(NS, plain.name))

            # The container of a gated pod restarts: the kubelet reports it restarted and not yet
            # ready (its readiness probe pending). Its gate goes False, so that once the probe
            # passes the pod stays out of its Service; it is Ready again only once it caught up
            # from a peer (a new daemon process, with no weights).
            restarted = gated[0]
            spare = daemons[3]
            await c.set_pod_ready(NS, restarted.name, False, restarts=1)
            await until(lambda: conditions(c.pod(NS, restarted.name)).get(SYNCED_CONDITION) == "False", 30,
                        "the restarted pod's gate False")
            await c.restart_pod(NS, restarted.name, spare.url, restarts=1)  # the probe passed
            history = [conditions(p) for p in c.pod_history(NS, restarted.name)
                       if p["status"]["containerStatuses"][0]["restartCount"] == 1]
            assert all(h.get("Ready") == "False" for h in history), history
            obj = await c.wait_for(NS, NAME, lambda o: o["status"].get("readyTargets") == "3/3"
                                   and o["status"].get("phase") == "Ready", 60, "the restarted pod caught up")
            await until(lambda: conditions(c.pod(NS, restarted.name)).get(SYNCED_CONDITION) == "True", 30,
                        "the restarted pod's gate True again")
            assert conditions(c.pod(NS, restarted.name))["Ready"] == "True"
            assert {t["pod"]: t["version"] for t in obj["status"]["targets"]}[restarted.name] == "1"
            pods = await kubectl_pods(c.kubeconfig, NS)
            assert pods[restarted.name]["READINESS GATES"] == "1/1"

            # A gated pod that leaves the selection (relabelled) is no member any more: gate False.
            await c.request("PATCH", f"/api/v1/namespaces/{NS}/pods/{gated[1].name}",
                            {"metadata": {"labels": {"weightsync.dev/sync": "elsewhere"}}},
                            "application/merge-patch+json")
            await until(lambda: conditions(c.pod(NS, gated[1].name)).get(SYNCED_CONDITION) == "False", 30,
                        "the relabelled pod's gate False")
        finally:
            await trainer.stop()
            await asyncio.gather(*(d.stop() for d in daemons))


def kill_before_its_update(runtime, pod: str, kill) -> dict:
    """Call `kill()` the moment the coordinator next asks `pod` to receive (every party started,
    the trainer about to send): a replica that dies mid-round. Returns {"at": monotonic time}."""
    killed: dict = {}
    victim = next(t for t in runtime.existing(NS, NAME).coordinator.targets if t.name == pod)
    real_update = victim.update

    async def kill_then_update(update_info, timeout):
        killed["at"] = time.monotonic()
        kill()
        return await real_update(update_info, timeout)

    victim.update = kill_then_update
    return killed


def target_states(obj: dict) -> dict[str, tuple[str, str | None]]:
    return {t["pod"]: (t["state"], t.get("version")) for t in obj["status"]["targets"]}


async def push_losing(c, trainer, runtime, version: int, kills: dict) -> dict:
    """Push `version` while the targets in `kills` (pod → a kill) die the moment they are asked to
    receive; the push must succeed on the others, the killed ones Stale. Returns the WeightSync."""
    killed = [kill_before_its_update(runtime, pod, kill) for pod, kill in kills.items()]
    answer = await trainer.push(version)
    survived = time.monotonic() - killed[0]["at"]
    assert answer["ok"], answer
    obj = c.weightsync(NS, NAME)
    print(f"version {version}: {', '.join(kills)} killed mid-round; live on the others {survived:.2f}s after the "
          f"kill: {obj['status']['message']}")
    states = target_states(obj)
    assert [states.pop(pod)[0] for pod in kills] == ["Stale"] * len(kills)
    assert set(states.values()) == {("Synced", str(version))}
    obj["answer"] = answer
    return obj


async def test_one_lost_replica_never_fails_the_rest(tmp_path):
    """failurePolicy.maxFailed 1, six daemon pods: one killed mid-round, the version still goes live
    on the other five (the group formed again without it, the version sent again); it is Stale and
    unready, then, restarted, catches up from a peer; strict (maxFailed 0) fails the round as before."""
    fields, pod_spec, sample = readme_fleet()
    assert fields["failurePolicy"] == {"maxFailed": 1} and pod_spec["readinessGates"] == [
        {"conditionType": SYNCED_CONDITION}]
    async with cluster(tmp_path) as c, operator(c.url, recheck_interval=0.5) as runtime:
        await c.create_weightsync(NS, NAME, spec(free_port(), **fields))
        daemons, trainer = await asyncio.gather(start_daemons(7), Trainer.start(c, NS, NAME, "trainer-0"))
        members, spare = daemons[:6], daemons[6]
        try:
            await c.create_pod(NS, "trainer-0", "trainer", NAME, trainer.url)
            for d in members:
                await c.create_pod(NS, d.name, "inference", NAME, d.url, gated=True)
            await c.wait_for(NS, NAME, lambda o: (o.get("status") or {}).get("readyTargets") == "6/6", 90,
                             "the group with six targets")
            assert (await trainer.wait_ready())["ok"]
            assert (await trainer.push(1))["ok"]

            victim = members[2]
            obj = await push_losing(c, trainer, runtime, 2, {victim.name: victim.kill})
            answer = obj.pop("answer")
            assert obj["status"]["phase"] == "Succeeded" and obj["status"]["readyTargets"] == "5/6"
            degraded = next(x for x in obj["status"]["conditions"] if x["type"] == "Degraded")
            assert degraded["status"] == "True" and degraded["reason"] == "TargetsLeftOut"
            assert victim.name in degraded["message"]
            await c.wait_for_event(NS, NAME, "TargetsLeftOut", victim.name, 10)
            async with httpx.AsyncClient() as http:
                sums = await checksums(http, [d.url for d in members if d is not victim])
            assert sums == [("2", answer["checksum"])] * 5
            await until(lambda: conditions(c.pod(NS, victim.name)).get(SYNCED_CONDITION) == "False", 10,
                        "the lost pod unready")
            printed = await kubectl(c.kubeconfig, "get", "wsync", "-n", NS) + \
                await kubectl(c.kubeconfig, "get", "pods", "-n", NS, "-o", "wide")
            print(printed)
            assert_same_lines(printed, sample)

            # Its container restarts (a new process, no weights): it rejoins and catches up from a peer.
            began = time.monotonic()
            await c.restart_pod(NS, victim.name, spare.url, restarts=1)
            obj = await c.wait_for(NS, NAME, lambda o: o["status"].get("readyTargets") == "6/6", 60,
                                   "the restarted pod caught up")
            print(f"{victim.name} restarted and caught up in {time.monotonic() - began:.2f}s from "
                  f"{obj['status']['lastCatchUp']['source']}")
            assert next(x for x in obj["status"]["conditions"] if x["type"] == "Degraded")["status"] == "False"
            await until(lambda: conditions(c.pod(NS, victim.name)).get(SYNCED_CONDITION) == "True", 10,
                        "the restarted pod ready")
            assert (await trainer.push(3))["ok"]
            async with httpx.AsyncClient() as http:
                sums = await checksums(http, [d.url for d in [*members[:2], spare, *members[3:]]])
            assert len({s for s in sums}) == 1 and sums[0][0] == "3"

            # Strict: the same loss fails the round for everyone, as before.
            await c.patch_weightsync(NS, NAME, {"spec": {"failurePolicy": {"maxFailed": 0}}})
            await c.wait_for(NS, NAME, lambda o: o["status"].get("phase") in ("Ready", "Succeeded")
                             and o["status"].get("observedGeneration") == o["metadata"]["generation"], 30,
                             "the strict spec seen")
            second = members[4]
            kill_before_its_update(runtime, second.name, second.kill)
            answer = await trainer.push(4)
            assert not answer["ok"] and second.name in answer["reason"], answer
        finally:
            await trainer.stop()
            await asyncio.gather(*(d.stop() for d in daemons))


@pytest.mark.vllm
async def test_a_lost_daemon_and_a_lost_vllm_server_never_fail_the_rest(tmp_path, vllm_python):
    """failurePolicy.maxFailed 2, six daemon pods and a real vLLM server (TP 1, tiny Qwen2) fed by the
    HF trainer: a daemon and the vLLM server killed in the same round; the version goes live on the
    other five daemons; both come back and catch up from a daemon peer (vLLM too: a daemon seeds it),
    after which vLLM's greedy completions equal the trainer's."""
    from weightsync_operator.demo import qwen2
    from weightsync_operator.demo.vllm_run import MAX_TOKENS, completions
    from weightsync_operator.demo.vllm_server import VllmServer
    from weightsync_operator.pods import ENGINE_ANNOTATION

    timeouts = {"requestSeconds": 10, "initSeconds": 60, "startSeconds": 20, "updateSeconds": 40,
                "finishSeconds": 30, "transferSeconds": 5}
    model = tmp_path / "model"
    prompts = qwen2.prompts()
    async with cluster(tmp_path) as c, operator(c.url, recheck_interval=1) as runtime, httpx.AsyncClient() as http:
        await c.create_weightsync(NS, NAME, spec(free_port(), failurePolicy={"maxFailed": 2}, atomic=True,
                                                 timeouts=timeouts))
        trainer = await VllmTrainer.start(vllm_python, c.kubeconfig, model, "trainer-0", NS, NAME)
        daemons, server = await asyncio.gather(
            start_daemons(7), VllmServer.start(model, free_port(), tmp_path / "vllm-a", python=vllm_python))
        members, spare = daemons[:6], daemons[6]
        try:
            await c.create_pod(NS, "trainer-0", "trainer", NAME, trainer.url)
            await c.create_pod(NS, "vllm-0", "inference", NAME, server.url, gated=True,
                               annotations={ENGINE_ANNOTATION: "vllm"})
            for d in members:
                await c.create_pod(NS, d.name, "inference", NAME, d.url, gated=True)
            assert (await trainer.wait_ready())["ok"]
            assert (await trainer.push(1))["ok"]
            await c.wait_for(NS, NAME, lambda o: o["status"].get("readyTargets") == "7/7", 30, "all seven on version 1")

            victim = members[3]
            obj = await push_losing(c, trainer, runtime, 2, {
                victim.name: victim.kill, "vllm-0": lambda: os.killpg(server.process.pid, signal.SIGKILL)})
            assert obj["status"]["readyTargets"] == "5/7"
            expected = await trainer.expected(prompts, MAX_TOKENS)

            # Both come back (new processes) and catch up to version 2 from a daemon peer, no push.
            began = time.monotonic()
            await server.stop()
            server = await VllmServer.start(model, free_port(), tmp_path / "vllm-b", python=vllm_python)
            await c.restart_pod(NS, "vllm-0", server.url, restarts=1)
            await c.restart_pod(NS, victim.name, spare.url, restarts=1)
            obj = await c.wait_for(NS, NAME, lambda o: o["status"].get("readyTargets") == "7/7", 120,
                                   "both caught up")
            print(f"both back on version 2 {time.monotonic() - began:.1f}s after their restart "
                  f"(vLLM start included), from {obj['status']['lastCatchUp']['source']}")
            assert set(target_states(obj).values()) == {("Synced", "2")}
            assert await completions(http, server.url, str(model), prompts) == expected
            await until(lambda: conditions(c.pod(NS, "vllm-0")).get(SYNCED_CONDITION) == "True", 10, "vllm-0 ready")
        finally:
            await trainer.stop()
            await server.stop()
            await asyncio.gather(*(d.stop() for d in daemons))


async def test_waves_keep_all_but_max_unavailable_targets_serving(tmp_path):
    """strategy Waves, maxUnavailable 34% of six daemon pods (two): no more than two daemons are
    ever paused at once (each daemon's /is_paused polled throughout the push); the first wave gets
    the version from the trainer, later ones from a daemon of an earlier wave; the status names
    each wave as it starts; every daemon ends bit-exact on the version."""
    async with cluster(tmp_path) as c, operator(c.url, recheck_interval=0.5), httpx.AsyncClient() as http:
        await c.create_weightsync(NS, NAME, spec(free_port(), strategy={"type": "Waves", "maxUnavailable": "34%"}))
        daemons, trainer = await asyncio.gather(start_daemons(6), Trainer.start(c, NS, NAME, "trainer-0"))
        try:
            await c.create_pod(NS, "trainer-0", "trainer", NAME, trainer.url)
            for d in daemons:
                await c.create_pod(NS, d.name, "inference", NAME, d.url, rendezvous_port=free_port())
            await c.wait_for(NS, NAME, lambda o: (o.get("status") or {}).get("readyTargets") == "6/6", 90,
                             "the group with six targets")
            assert (await trainer.wait_ready())["ok"]
            for version in (1, 2):
                most_paused, stop = 0, asyncio.Event()

                async def watch_pauses(stop: asyncio.Event = stop) -> None:
                    nonlocal most_paused
                    while not stop.is_set():
                        answers = await asyncio.gather(*(http.get(d.url + "/is_paused") for d in daemons))
                        most_paused = max(most_paused, sum(a.json()["is_paused"] for a in answers))
                        await asyncio.sleep(0.005)

                watcher = asyncio.ensure_future(watch_pauses())
                answer = await trainer.push(version)
                stop.set()
                await watcher
                assert answer["ok"], answer
                obj = c.weightsync(NS, NAME)
                print(f"version {version}: at most {most_paused} of 6 paused at once; {obj['status']['message']}")
                assert 1 <= most_paused <= 2
                assert set(target_states(obj).values()) == {("Synced", str(version))}
                waves = [cond["message"] for s in c.statuses(NS, NAME) for cond in s.get("conditions") or []
                         if cond["type"] == "Progressing" and cond["reason"] == "RollingOut"
                         and cond["message"].startswith(f"version {version}:")]
                assert [m.split(" (")[0] for m in dict.fromkeys(waves)] == \
                    [f"version {version}: wave {n} of 3" for n in (1, 2, 3)], waves
                assert waves[0].endswith("from trainer-0") and "from infer-" in waves[-1]
                sums = await checksums(http, [d.url for d in daemons])
                assert sums == [(str(version), answer["checksum"])] * 6
        finally:
            await trainer.stop()
            await asyncio.gather(*(d.stop() for d in daemons))
