"""The trainer client (`weightsync_operator.trainer_client.connect`, `push`) against the emulated API server, without an
operator: what it serves and when, how it bumps the version, and how it reads the round's end
from the status (the operator's side of that contract runs for real in test_operator_k8s.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from helpers.k8s_harness import cluster
from weightsync.store import named_checksum
from weightsync_operator.kube import KubeApi, KubeError
from weightsync_operator.trainer_client import PushFailed, connect

pytestmark = [pytest.mark.k8s]

NS, NAME = "rl", "policy-sync"
SPEC = {"backend": "cpu",
        "trainerSelector": {"matchLabels": {"weightsync.dev/role": "trainer"}},
        "targetSelector": {"matchLabels": {"weightsync.dev/role": "inference"}}}


def test_the_core_library_never_imports_kubernetes():
    code = ("import sys, weightsync; bad = {'kubernetes', 'kopf', 'weightsync_operator'} & set(sys.modules); "
            "assert not bad, bad; assert not hasattr(weightsync, 'connect')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def model() -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [("w", torch.randn(1000, generator=generator)), ("b", torch.randn(10, generator=generator))]


async def test_connect_serves_the_agent_and_push_reads_the_rounds_end(tmp_path, monkeypatch):
    async with cluster(tmp_path) as c:
        monkeypatch.setenv("KUBECONFIG", str(c.kubeconfig))  # its context's namespace is "default"

        # connect waits for the WeightSync to exist (the trainer pod may start first): once the
        # API server has answered its GET with 404, it is still waiting.
        kube, missing = KubeApi.for_url(c.url), threading.Event()
        real_get = kube.get

        def observed_get(namespace: str, name: str) -> dict:
            try:
                return real_get(namespace, name)
            except KubeError as error:
                if error.status == 404:
                    missing.set()
                raise
        kube.get = observed_get
        connecting = asyncio.create_task(asyncio.to_thread(
            connect, NAME, NS, port=0, host="127.0.0.1", pod_name="trainer-0", kube=kube, wait=False, timeout=30))
        assert await asyncio.to_thread(missing.wait, 30), "connect never asked for the WeightSync"
        assert not connecting.done()
        await c.create_weightsync(NS, NAME, {**SPEC, "version": 4})
        client = await asyncio.wait_for(connecting, 30)
        try:
            async with httpx.AsyncClient(base_url=client.url) as http:
                health = (await http.get("/healthz")).json()
                assert (health["role"], health["backend"], health["phase"]) == ("trainer", "cpu", "uninitialized")
                # Outside a push the agent serves no weights at all.
                answer = await http.post("/weight_checker", json={"action": "checksum"})
                assert answer.status_code == 409 and "no push in progress" in answer.json()["detail"]

                with pytest.raises(ValueError, match="not newer than 4"):
                    await asyncio.to_thread(client.push, model(), 4)
                with pytest.raises(TimeoutError, match="version 5"):  # nobody runs the round
                    await asyncio.to_thread(client.push, model(), 5, 1.0)
                assert c.weightsync(NS, NAME)["spec"]["version"] == 5

                # During a push the agent serves exactly the pushed tensors, until the status
                # (written here as the operator would) says how the round ended.
                tensors = model()
                push = asyncio.create_task(asyncio.to_thread(client.push, tensors, 6, 30.0))
                await c.wait_for(NS, NAME, lambda o: o["spec"]["version"] == 6, 10, "version 6 requested")
                served = (await http.post("/weight_checker", json={"action": "checksum"})).json()
                assert served["checksum"] == named_checksum(tensors)
                await c.request("PATCH", f"/apis/weightsync.dev/v1alpha1/namespaces/{NS}/weightsyncs/{NAME}/status",
                                {"status": {"phase": "Succeeded", "lastSync": {
                                    "version": 6, "outcome": "Succeeded", "bytes": 4040, "seconds": 0.002,
                                    "totalSeconds": 0.01, "gbps": 2.02}}}, "application/merge-patch+json")
                result = await asyncio.wait_for(push, 30)
                assert (result.version, result.bytes, result.gbps) == (6, 4040, 2.02)
                assert (await http.post("/weight_checker", json={"action": "checksum"})).status_code == 409

                push = asyncio.create_task(asyncio.to_thread(client.push, model(), 7, 30.0))
                await c.wait_for(NS, NAME, lambda o: o["spec"]["version"] == 7, 10, "version 7 requested")
                await c.request("PATCH", f"/apis/weightsync.dev/v1alpha1/namespaces/{NS}/weightsyncs/{NAME}/status",
                                {"status": {"phase": "Failed", "lastSync": {
                                    "version": 7, "outcome": "Failed", "reason": "infer-1: update failed: gone"}}},
                                "application/merge-patch+json")
                with pytest.raises(PushFailed) as failure:
                    await asyncio.wait_for(push, 30)
                assert failure.value.reason == "infer-1: update failed: gone" and failure.value.version == 7

            # The group is formed when the status names this pod and the agent was initialised.
            began = time.monotonic()
            with pytest.raises(TimeoutError, match="did not form the group"):
                await asyncio.to_thread(client.wait_ready, 1.0)
            assert time.monotonic() - began < 10
        finally:
            await asyncio.to_thread(client.close)


async def test_namespace_defaults_to_the_kubeconfig_context(tmp_path, monkeypatch):
    async with cluster(tmp_path) as c:
        await c.create_weightsync("default", NAME, SPEC)
        monkeypatch.setenv("KUBECONFIG", str(c.kubeconfig))
        monkeypatch.delenv("POD_NAMESPACE", raising=False)
        client = await asyncio.to_thread(connect, NAME, port=0, host="127.0.0.1", wait=False)
        try:
            assert client.namespace == "default"
            assert await asyncio.to_thread(client.rendezvous) is None
        finally:
            await asyncio.to_thread(client.close)
