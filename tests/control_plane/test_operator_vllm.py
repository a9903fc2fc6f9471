"""The operator with a vLLM target pod (annotation `weightsync.dev/engine: vllm`): a spec that
cannot drive it (pauseMode none: vLLM must not serve while its layers reload) is reported on
the WeightSync, and fixing the spec moves on to forming the group. kopf's real runtime against
the emulated API server; the group never gets as far as calling the pods."""

from __future__ import annotations

import pytest

from helpers.k8s_harness import cluster, free_port, operator
from weightsync_operator.pods import DAEMON_PORT_ANNOTATION, ENGINE_ANNOTATION

pytestmark = [pytest.mark.k8s]

NS, NAME = "rl", "vllm-sync"


async def create_pod(c, name: str, role: str, annotations: dict) -> None:
    await c.request("POST", f"/api/v1/namespaces/{NS}/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "annotations": annotations,
                     "labels": {"weightsync.dev/role": role, "weightsync.dev/sync": NAME}},
        "spec": {"containers": [{"name": "main", "image": f"weightsync/{role}"}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}],
                   "containerStatuses": [{"name": "main", "restartCount": 0}]},
    })


async def test_vllm_targets_with_pause_mode_none_are_reported_then_the_fixed_spec_forms_the_group(tmp_path):
    closed = free_port()  # nothing listens: the group is refused before any call, then init fails
    spec = {
        "backend": "cpu", "rendezvousPort": free_port(), "pauseMode": "none",
        "trainerSelector": {"matchLabels": {"weightsync.dev/role": "trainer", "weightsync.dev/sync": NAME}},
        "targetSelector": {"matchLabels": {"weightsync.dev/role": "inference", "weightsync.dev/sync": NAME}},
        "timeouts": {"requestSeconds": 1, "initSeconds": 2},
    }
    async with cluster(tmp_path) as c, operator(c.url, recheck_interval=0.5):
        await c.create_weightsync(NS, NAME, spec)
        await create_pod(c, "trainer-0", "trainer", {DAEMON_PORT_ANNOTATION: str(closed)})
        await create_pod(c, "vllm-0", "inference", {DAEMON_PORT_ANNOTATION: str(closed), ENGINE_ANNOTATION: "vllm"})
        obj = await c.wait_for(NS, NAME,
                               lambda o: "cannot drive vLLM targets" in o.get("status", {}).get("message", ""),
                               30, "the refused group in the status")
        status = obj["status"]
        assert status["phase"] == "Failed"
        assert status["message"].startswith("cannot form the group: pause_mode none cannot drive vLLM targets (vllm-0)")
        degraded = next(x for x in status["conditions"] if x["type"] == "Degraded")
        assert (degraded["status"], degraded["reason"]) == ("True", "InvalidGroup")
        await c.wait_for_event(NS, NAME, "InvalidGroup", "vllm-0", 10)
        await c.patch_weightsync(NS, NAME, {"spec": {"pauseMode": "abort"}})
        obj = await c.wait_for(NS, NAME, lambda o: o.get("status", {}).get("message", "").startswith("init failed"),
                               30, "the group formed with the vLLM target (and refused: nothing listens)")
        assert "vllm-0" in obj["status"]["message"]
