"""The operator end to end: kopf's real runtime against an emulated API server (real HTTP, watch
streams), real daemon processes, a real trainer process on the cpu transport, and Pod objects
whose IPs and ports point at those processes."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from helpers.k8s_emulator import schema_problems
from helpers.k8s_harness import NAME, NS, Trainer, checksums, cluster, free_port, operator, spec, start_daemons
from weightsync_operator.crd import build_crd

pytestmark = [pytest.mark.k8s]

SCHEMA = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def condition(obj: dict, type_: str) -> dict:
    return next(c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_)


def phase_is(*phases: str):
    return lambda obj: obj.get("status", {}).get("phase") in phases


async def test_create_init_sync_succeeds_with_figures(tmp_path):
    async with cluster(tmp_path) as c, operator(c.url, recheck_interval=0.5):
        await c.create_weightsync(NS, NAME, spec(free_port()))
        daemons, trainer = await asyncio.gather(start_daemons(2), Trainer.start(c, NS, NAME, "trainer-0"))
        try:
            await c.create_pod(NS, "trainer-0", "trainer", NAME, trainer.url)
            for d in daemons:
                await c.create_pod(NS, d.name, "inference", NAME, d.url)

            obj = await c.wait_for(NS, NAME,
                                   lambda o: phase_is("Ready")(o) and o["status"].get("readyTargets") == "2/2",
                                   60, "phase Ready with both targets")
            status = obj["status"]
            assert status["rendezvous"]["trainerPod"] == "trainer-0"
            assert status["rendezvous"]["worldSize"] == 3
            assert condition(obj, "Ready")["status"] == "True"
            assert condition(obj, "Ready")["observedGeneration"] == obj["metadata"]["generation"]
            assert (await trainer.wait_ready())["ok"]

            answer = await trainer.push(1)
            assert answer["ok"], answer
            obj = c.weightsync(NS, NAME)
            status = obj["status"]
            assert status["phase"] == "Succeeded"
            assert status["currentVersion"] == 1
            assert status["readyTargets"] == "2/2"
            last = status["lastSync"]
            assert last["outcome"] == "Succeeded" and last["version"] == 1
            assert last["bytes"] >= 4_000_000 and last["seconds"] > 0 and last["gbps"] > 0
            assert last["started"] <= last["finished"]
            assert answer["result"]["bytes"] == last["bytes"]
            assert re.fullmatch(r"[0-9a-f]{32}", last["checksum"])  # the stream checksum every target verified
            assert [t["state"] for t in status["targets"]] == ["Synced", "Synced"]
            assert [t["version"] for t in status["targets"]] == ["1", "1"]
            for type_, value in (("Ready", "True"), ("Progressing", "False"), ("Degraded", "False")):
                assert condition(obj, type_)["status"] == value, type_
            async with httpx.AsyncClient() as http:
                sums = await checksums(http, [d.url for d in daemons])
            assert sums == [("1", answer["checksum"])] * 2  # bit-exact on every daemon

            # Every status the operator ever wrote satisfies the CRD's schema.
            for past in c.emulator.history(("weightsync.dev", "v1alpha1", "weightsyncs"), NS, NAME):
                assert schema_problems(past, SCHEMA) == []
            await c.wait_for_event(NS, NAME, "GroupFormed", "world size 3")
            await c.wait_for_event(NS, NAME, "Synced", "version 1 live on 2 target(s)")

            # Level-based: a daemon that lost its group (as after an in-place restart) is noticed
            # by the periodic re-check, and the group is formed again around it.
            group = status["rendezvous"]["groupName"]
            async with httpx.AsyncClient() as http:
                (await http.post(daemons[0].url + "/close_weight_transfer_engine")).raise_for_status()
            await c.wait_for_event(NS, NAME, "PartyLost", daemons[0].name)
            obj = await c.wait_for(NS, NAME, lambda o: o["status"]["phase"] == "Ready"
                                   and o["status"]["rendezvous"]["groupName"] != group, 30, "a new group")
            assert obj["status"]["readyTargets"] == "2/2"  # both still hold version 1

            # The API server rejects what the schema forbids; the operator rejects what it cannot
            # express (a transfer timeout above the update timeout), until the spec is fixed.
            with pytest.raises(RuntimeError, match="422"):
                await c.patch_weightsync(NS, NAME, {"spec": {"pauseMode": "sometimes"}})
            await c.patch_weightsync(NS, NAME, {"spec": {"timeouts": {"transferSeconds": 40}}})
            obj = await c.wait_for(NS, NAME, lambda o: condition(o, "Degraded")["reason"] == "InvalidSpec", 30,
                                   "InvalidSpec")
            assert obj["status"]["phase"] == "Failed" and "transferSeconds" in obj["status"]["message"]
            assert condition(obj, "Degraded")["observedGeneration"] == obj["metadata"]["generation"]
            await c.wait_for_event(NS, NAME, "InvalidSpec")
            await c.patch_weightsync(NS, NAME, {"spec": {"timeouts": {"transferSeconds": 5}}})
            await c.wait_for(NS, NAME, lambda o: o["status"]["phase"] == "Ready", 30, "Ready again")
            answer = await trainer.push(2)
            assert answer["ok"], answer
            async with httpx.AsyncClient() as http:
                assert await checksums(http, [d.url for d in daemons]) == [("2", answer["checksum"])] * 2
        finally:
            await trainer.stop()
            await asyncio.gather(*(d.stop() for d in daemons))


async def test_pod_added_catches_up_pod_removed_regroups_delete_tears_down(tmp_path):
    async with cluster(tmp_path) as c, operator(c.url):
        await c.create_weightsync(NS, NAME, spec(free_port()))
        daemons, trainer = await asyncio.gather(start_daemons(3), Trainer.start(c, NS, NAME, "trainer-0"))
        first, late = daemons[:2], daemons[2]
        try:
            await c.create_pod(NS, "trainer-0", "trainer", NAME, trainer.url)
            for d in first:
                await c.create_pod(NS, d.name, "inference", NAME, d.url, rendezvous_port=free_port())
            await c.wait_for(NS, NAME, lambda o: o.get("status", {}).get("readyTargets") == "2/2", 60, "2/2 ready")
            assert (await trainer.wait_ready())["ok"]
            pushed = await trainer.push(1)
            assert pushed["ok"], pushed

            # A pod that becomes ready after the sync gets version 1 from a peer, not the trainer.
            await c.create_pod(NS, late.name, "inference", NAME, late.url, rendezvous_port=free_port())
            obj = await c.wait_for(NS, NAME, lambda o: o.get("status", {}).get("readyTargets") == "3/3"
                                   and o["status"]["phase"] == "Ready", 60, "3/3 ready")
            status = obj["status"]
            assert status["currentVersion"] == 1 and status["rendezvous"]["worldSize"] == 4
            catch_up = status["lastCatchUp"]
            assert catch_up["outcome"] == "Succeeded" and catch_up["version"] == 1
            assert catch_up["source"] in {d.name for d in first} and catch_up["targets"] == [late.name]
            assert catch_up["bytes"] == status["lastSync"]["bytes"]
            assert status["lastSync"]["version"] == 1  # the trainer sent nothing more
            async with httpx.AsyncClient() as http:
                assert await checksums(http, [d.url for d in daemons]) == [("1", pushed["checksum"])] * 3

                # The next version reaches all three.
                pushed = await trainer.push(2)
                assert pushed["ok"], pushed
                assert await checksums(http, [d.url for d in daemons]) == [("2", pushed["checksum"])] * 3
                await c.wait_for_event(NS, NAME, "CaughtUp", late.name)

                # A pod removed: the group is formed again without it, and the gone pod's daemon
                # (still running here) has left the old group.
                await c.request("DELETE", f"/api/v1/namespaces/{NS}/pods/{first[0].name}")
                obj = await c.wait_for(NS, NAME, lambda o: o["status"]["phase"] == "Ready"
                                       and o["status"]["rendezvous"]["worldSize"] == 3, 30, "a group of 3")
                assert [t["pod"] for t in obj["status"]["targets"]] == [first[1].name, late.name]
                assert (await http.get(first[0].url + "/healthz")).json()["phase"] == "uninitialized"
                pushed = await trainer.push(3)
                assert pushed["ok"], pushed
                assert await checksums(http, [first[1].url, late.url]) == [("3", pushed["checksum"])] * 2

                # Deleting the WeightSync: the finalizer makes every party leave the group first.
                assert c.weightsync(NS, NAME)["metadata"]["finalizers"] == ["weightsync.dev/finalizer"]
                await c.delete_weightsync(NS, NAME)
                deadline = asyncio.get_running_loop().time() + 30
                while c.weightsync(NS, NAME) is not None:
                    assert asyncio.get_running_loop().time() < deadline, "the finalizer was never removed"
                    await asyncio.sleep(0.05)
                for url in [trainer.url, first[1].url, late.url]:
                    health = (await http.get(url + "/healthz")).json()
                    assert health["phase"] == "uninitialized", (url, health)
                    if url != trainer.url:
                        assert health["weight_version"] == "3"  # leaving the group keeps the weights
        finally:
            await trainer.stop()
            await asyncio.gather(*(d.stop() for d in daemons))


async def test_daemon_killed_mid_sync_fails_with_reason_then_next_version_succeeds(tmp_path):
    async with cluster(tmp_path) as c, operator(c.url):
        await c.create_weightsync(NS, NAME, spec(free_port(), packedBufferSizeBytes=1 << 16))
        (healthy, victim), trainer = await asyncio.gather(
            start_daemons(2), Trainer.start(c, NS, NAME, "trainer-0", mbytes=48))
        replacement = None
        try:
            await c.create_pod(NS, "trainer-0", "trainer", NAME, trainer.url)
            for d in (healthy, victim):
                await c.create_pod(NS, d.name, "inference", NAME, d.url, rendezvous_port=free_port())
            assert (await trainer.wait_ready())["ok"]
            assert (await trainer.push(1))["ok"]

            async with httpx.AsyncClient() as http:
                push = asyncio.create_task(trainer.push(2))
                deadline = asyncio.get_running_loop().time() + 30
                while (await http.get(victim.url + "/healthz")).json()["phase"] != "updating":
                    assert asyncio.get_running_loop().time() < deadline, "the round never started"
                    await asyncio.sleep(0.005)
                victim.kill()
                answer = await push
            assert not answer["ok"] and answer["error"] == "PushFailed"
            failed = [s for s in c.statuses(NS, NAME) if s.get("lastSync", {}).get("version") == 2]
            assert failed and failed[0]["phase"] == "Failed"
            last = failed[0]["lastSync"]
            assert last["outcome"] == "Failed" and victim.name in last["reason"]
            assert answer["reason"] == last["reason"]
            degraded = next(c for c in failed[0]["conditions"] if c["type"] == "Degraded")
            assert degraded["status"] == "True" and degraded["reason"] == "SyncFailed"
            target = next(t for t in failed[0]["targets"] if t["pod"] == victim.name)
            assert target["state"] == "Failed" and target["reason"]
            await c.wait_for_event(NS, NAME, "SyncFailed", victim.name)

            # The kubelet restarts the container: a new daemon process (on a new port here).
            (replacement,) = await start_daemons(1, prefix="restarted")
            await c.restart_pod(NS, victim.name, replacement.url, restarts=1)
            obj = await c.wait_for(NS, NAME, lambda o: o.get("status", {}).get("phase") == "Ready"
                                   and any(t.get("rank") for t in o["status"]["targets"]
                                           if t["pod"] == victim.name), 60, "the group re-formed")
            # If the failed round left parts of itself in the survivor's weights (no atomic mode),
            # nobody holds an intact version 1 and both wait for the trainer's next version;
            # otherwise the restarted pod got version 1 from the survivor.
            targets = {t["pod"]: t for t in obj["status"]["targets"]}
            for t in targets.values():
                assert (t["state"] == "Synced") == (t.get("version") == "1"), t
            if targets[victim.name]["state"] == "Synced":
                assert obj["status"]["lastCatchUp"]["outcome"] == "Succeeded"
                assert obj["status"]["lastCatchUp"]["source"] == healthy.name
            else:
                assert targets[healthy.name]["state"] == "Stale"
            answer = await trainer.push(3)
            assert answer["ok"], answer
            obj = c.weightsync(NS, NAME)
            assert obj["status"]["phase"] == "Succeeded" and obj["status"]["currentVersion"] == 3
            async with httpx.AsyncClient() as http:
                assert await checksums(http, [healthy.url, replacement.url]) == [("3", answer["checksum"])] * 2
        finally:
            await trainer.stop()
            await asyncio.gather(*(d.stop() for d in (healthy, victim, replacement) if d is not None))


async def test_pending_without_pods_and_ambiguous_trainer(tmp_path):
    async with cluster(tmp_path) as c, operator(c.url):
        await c.create_weightsync(NS, NAME, spec(free_port()))
        obj = await c.wait_for(NS, NAME, phase_is("Pending"), 30, "Pending")
        assert obj["status"]["message"] == "waiting for a ready trainer pod and ready target pods"
        assert condition(obj, "Ready")["reason"] == "WaitingForPods"
        assert condition(obj, "Degraded")["status"] == "False"
        # Two ready pods match trainerSelector: the operator refuses to guess (and contacts neither).
        for pod in ("trainer-a", "trainer-b"):
            await c.create_pod(NS, pod, "trainer", NAME, "http://127.0.0.1:9")
        await c.create_pod(NS, "infer-0", "inference", NAME, "http://127.0.0.1:9")
        obj = await c.wait_for(NS, NAME, lambda o: condition(o, "Degraded")["reason"] == "AmbiguousTrainer"
                               and o["status"].get("targets"), 30, "AmbiguousTrainer")
        assert obj["status"]["phase"] == "Pending" and "trainer-a, trainer-b" in obj["status"]["message"]
        assert obj["status"]["targets"] == [{"pod": "infer-0", "endpoint": "http://127.0.0.1:9", "state": "Joining"}]
        # A pod that is not ready does not count.
        await c.set_pod_ready(NS, "trainer-b", False)
        obj = await c.wait_for(NS, NAME, lambda o: condition(o, "Degraded")["reason"] != "AmbiguousTrainer",
                               30, "one trainer")


async def test_a_group_that_fails_to_form_is_retried_by_kopf(tmp_path, caplog):
    """A ready trainer pod whose agent does not answer yet: the init fails, the pass raises
    kopf.TemporaryError and kopf runs the WeightSync's loop again after that error's delay (which
    doubles with each failure in a row), saying so in its log; each failure is an InitFailed
    event. Once the pod's agent answers, a retry forms the group, and a round lands."""
    async with cluster(tmp_path) as c, operator(c.url, recheck_interval=0.5):
        await c.create_weightsync(NS, NAME, spec(free_port()))
        daemons, trainer = await asyncio.gather(start_daemons(1), Trainer.start(c, NS, NAME, "trainer-0"))
        try:
            await c.create_pod(NS, "trainer-0", "trainer", NAME, f"http://127.0.0.1:{free_port()}")  # nobody there
            await c.create_pod(NS, daemons[0].name, "inference", NAME, daemons[0].url)
            deadline = asyncio.get_running_loop().time() + 60
            while len(failed := [e for e in c.events(NS, NAME) if e.get("reason") == "InitFailed"]) < 3:
                assert asyncio.get_running_loop().time() < deadline, f"{len(failed)} InitFailed events in 60 s"
                await asyncio.sleep(0.1)
            assert all("trainer-0" in e["message"] and "unreachable" in e["message"] for e in failed), failed
            retries = [r for r in caplog.records if "Daemon 'run_weightsync' failed temporarily" in r.getMessage()]
            assert len(retries) >= 2 and "init failed" in retries[0].getMessage(), "kopf did not do the retrying"
            assert c.weightsync(NS, NAME)["status"]["phase"] == "Failed"

            await c.restart_pod(NS, "trainer-0", trainer.url, restarts=1)  # its agent answers now
            obj = await c.wait_for(NS, NAME, phase_is("Ready"), 30, "Ready once the trainer answers")
            assert condition(obj, "Degraded")["status"] == "False"
            assert (await trainer.wait_ready())["ok"]
            answer = await trainer.push(1)
            assert answer["ok"], answer
        finally:
            await trainer.stop()
            await asyncio.gather(*(d.stop() for d in daemons))
