"""The README's flow with the real kubectl against the emulated API server, and the operator
run as `weightsync operator` (the console script the chart runs): apply the CRD, create the
example WeightSync, watch `kubectl get wsync` while the trainer publishes, delete it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import httpx
import pytest

from helpers.k8s_harness import ROOT, Trainer, cluster, free_port, start_daemons, until

pytestmark = [pytest.mark.k8s, pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl")]

NS, NAME = "rl", "grpo-policy"


class Kubectl:
    def __init__(self, kubeconfig: Path):
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    async def __call__(self, *args: str, stdin: str | None = None, timeout: float = 60.0) -> str:
        process = await asyncio.create_subprocess_exec(
            "kubectl", *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self.env)
        try:
            out, err = await asyncio.wait_for(process.communicate(stdin.encode() if stdin else None), timeout)
        except TimeoutError:
            process.kill()
            out, err = await process.communicate()
            raise AssertionError(f"kubectl {' '.join(args)} timed out: {err.decode()[-3000:]}") from None
        assert process.returncode == 0, f"kubectl {' '.join(args)}: {err.decode()}"
        return out.decode()

    async def watch(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec("kubectl", *args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL, env=self.env)


async def test_readme_kubectl_flow(tmp_path):
    async with cluster(tmp_path, install_crd=False) as c:
        kubectl = Kubectl(c.kubeconfig)
        crd_yaml = str(ROOT / "crds/weightsync.dev_weightsyncs.yaml")
        assert "created" in await kubectl("apply", "--validate=false", "-f", crd_yaml)
        # (`kubectl create namespace rl` is left out: kmock reads /api/v1/namespaces as a namespace
        # prefix, and namespaces need not exist in the emulator.)

        # The operator, as the chart runs it (the emulator's kubeconfig stands for the cluster).
        health = free_port()
        operator = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "weightsync"), "operator", "--standalone", "--all-namespaces",
            "--liveness", f"http://127.0.0.1:{health}/healthz", "--recheck-interval", "5",
            env={**os.environ, "KUBECONFIG": str(c.kubeconfig)}, stdin=asyncio.subprocess.DEVNULL)
        trainer = daemon = watcher = None
        try:
            async with httpx.AsyncClient() as http:
                async def alive():
                    try:
                        return (await http.get(f"http://127.0.0.1:{health}/healthz")).status_code == 200
                    except httpx.HTTPError:
                        return False
                await until(alive, 60, "the operator's liveness endpoint")

            # The example as shipped (NCCL), then moved to the cpu transport for this machine.
            assert "created" in await kubectl("apply", "--validate=false", "-f", str(ROOT / "examples/weightsync.yaml"))
            await kubectl("patch", "wsync", NAME, "-n", NS, "--type=merge", "-p", json.dumps(
                {"spec": {"backend": "cpu", "rendezvousPort": free_port(), "packedBufferSizeBytes": 1 << 20,
                          "timeouts": {"initSeconds": 20, "updateSeconds": 30, "transferSeconds": 5}}}))
            watcher = await kubectl.watch("get", "wsync", "-n", NS, "-w")

            async def phase():
                return await kubectl("get", "wsync", NAME, "-n", NS, "-o", "jsonpath={.status.phase}")
            assert await until(phase, 30, "a status") == "Pending"

            (daemon,), trainer = await asyncio.gather(start_daemons(1), Trainer.start(c, NS, NAME, "grpo-trainer-0"))
            await c.create_pod(NS, "grpo-trainer-0", "trainer", NAME, trainer.url)
            await c.create_pod(NS, "grpo-inference-0", "inference", NAME, daemon.url)
            assert (await trainer.wait_ready())["ok"]
            answer = await trainer.push(1)
            assert answer["ok"], answer

            table = await kubectl("get", "wsync", "-n", NS)
            header, row = table.splitlines()
            assert header.split() == ["NAME", "PHASE", "VERSION", "READY", "LAST", "GB/S", "LAST", "DURATION", "AGE"]
            cells = row.split()
            assert cells[:4] == [NAME, "Succeeded", "1", "1/1"] and float(cells[4]) > 0 and float(cells[5]) > 0
            ready = await kubectl("get", "wsync", NAME, "-n", NS, "-o",
                                  "jsonpath={.status.conditions[?(@.type=='Ready')].status}")
            assert ready == "True"

            # `kubectl delete` returns once the operator's finalizer has torn the group down.
            await kubectl("delete", "wsync", NAME, "-n", NS, "--timeout=30s", timeout=40)
            assert "No resources found" in await kubectl("get", "wsync", "-n", NS) + " No resources found"
            assert c.weightsync(NS, NAME) is None
            async with httpx.AsyncClient() as http:
                assert (await http.get(daemon.url + "/healthz")).json()["phase"] == "uninitialized"

            watcher.terminate()
            seen = (await asyncio.wait_for(watcher.stdout.read(), 10)).decode()
            phases = [line.split()[1] for line in seen.splitlines()[1:]
                      if line.startswith(NAME) and len(line.split()) > 2]
            assert "Pending" in phases and "Succeeded" in phases, seen
        finally:
            for process in (watcher,):
                if process is not None and process.returncode is None:
                    process.kill()
            operator.send_signal(signal.SIGTERM)
            try:
                assert await asyncio.wait_for(operator.wait(), 20) == 0
            finally:
                if operator.returncode is None:
                    operator.kill()
                if trainer is not None:
                    await trainer.stop()
                if daemon is not None:
                    await daemon.stop()
