"""The pieces of an emulated cluster for the operator's tests and benchmark, all real except the
API server: kmock's emulator (see k8s_emulator.py) serving real HTTP, kopf's real runtime over
our handlers in this event loop, real daemon processes, a real trainer process, and Pod objects
whose IP and `weightsync.dev/daemon-port` annotation point at those processes on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import os
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import yaml

from helpers.k8s_emulator import POD_RESOURCE, STRATEGIC_MERGE, ClusterEmulator
from weightsync_operator import handlers
from weightsync_operator.kube import KubeApi
from weightsync_operator.local import LocalProcess, free_port
from weightsync_operator.pods import DAEMON_PORT_ANNOTATION, RENDEZVOUS_PORT_ANNOTATION, SYNCED_CONDITION
from weightsync_operator.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION
from weightsync_operator.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
# The WeightSync most tests make, and its spec (cpu transport, small buffers, short timeouts).
NS, NAME = "rl", "policy-sync"
HELPERS = Path(__file__).resolve().parent  # the trainers run as `python -m k8s_trainer`
CRD_PATH = ROOT / "crds" / "weightsync.dev_weightsyncs.yaml"
WEIGHTSYNCS = kmock.resource(GROUP, VERSION, PLURAL)
PODS = kmock.resource("", "v1", "pods")
EVENTS = kmock.resource("", "v1", "events")


def spec(rendezvous_port: int, **overrides) -> dict:
    """The WeightSync spec of the operator tests; `overrides` replace its fields."""
    return {
        "backend": "cpu",
        "trainerSelector": {"matchLabels": {"weightsync.dev/role": "trainer", "weightsync.dev/sync": NAME}},
        "targetSelector": {"matchLabels": {"weightsync.dev/role": "inference", "weightsync.dev/sync": NAME}},
        "rendezvousPort": rendezvous_port,
        "packedBufferSizeBytes": 1 << 20,
        "pauseMode": "keep",
        "timeouts": {"requestSeconds": 5, "initSeconds": 20, "startSeconds": 10, "updateSeconds": 30,
                     "finishSeconds": 10, "transferSeconds": 5},
        **overrides,
    }


class Cluster:
    """An emulated API server with the WeightSync CRD installed, and a kubeconfig for it."""

    def __init__(self, emulator: ClusterEmulator, url: str, kubeconfig: Path):
        self.emulator, self.url, self.kubeconfig = emulator, url, kubeconfig
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Made on first use and again after kopf stops: kopf cancels the tasks of its loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(base_url=self.url)
        return self._session

    async def request(self, method: str, path: str, body: Any = None, content_type: str | None = None) -> dict:
        headers = {"Content-Type": content_type} if content_type else {}
        async with self.session.request(method, path, json=body, headers=headers) as response:
            answer = await response.json(content_type=None)
            if response.status >= 400:
                raise RuntimeError(f"{method} {path}: HTTP {response.status}: {answer.get('message')}")
            return answer

    async def apply_crd(self) -> None:
        await self.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                           yaml.safe_load(CRD_PATH.read_text()))

    # -- WeightSyncs ----------------------------------------------------------------------
    async def create_weightsync(self, namespace: str, name: str, spec: dict) -> dict:
        body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace},
                "spec": spec}
        return await self.request("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", body)

    async def patch_weightsync(self, namespace: str, name: str, patch: dict) -> dict:
        return await self.request("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
                                  patch, "application/merge-patch+json")

    async def delete_weightsync(self, namespace: str, name: str) -> None:
        await self.request("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}")

    def weightsync(self, namespace: str, name: str) -> dict | None:
        return self.emulator.get(WEIGHTSYNCS, namespace, name)

    def statuses(self, namespace: str, name: str) -> list[dict]:
        """Every status the WeightSync has had, oldest first."""
        return [v.get("status") or {} for v in self.emulator.history(WEIGHTSYNCS, namespace, name)]

    def events(self, namespace: str, name: str) -> list[dict]:
        """Kubernetes Events posted about a WeightSync."""
        return [obj.raw for (res, ns, _), obj in self.emulator.objects.items()
                if res == EVENTS and ns == namespace and not obj.deleted
                and obj.raw.get("involvedObject", {}).get("name") == name]

    async def wait_for_event(self, namespace: str, name: str, reason: str, contains: str = "",
                             timeout: float = 10.0) -> dict:
        """The first Event with this reason (and text) about the WeightSync (kopf posts them in the
        background)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(namespace, name)
                     if e.get("reason") == reason and contains in e.get("message", "")]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                seen = sorted({e.get("reason") for e in self.events(namespace, name)})
                raise AssertionError(f"no {reason} event {contains!r} about {namespace}/{name} within "
                                     f"{timeout:g}s; saw {seen}")
            await asyncio.sleep(0.02)

    async def fetch_weightsync(self, namespace: str, name: str) -> dict | None:
        """The stored WeightSync (None if there is none), read where the API server keeps it."""
        return self.weightsync(namespace, name)

    async def wait_for(self, namespace: str, name: str, predicate: Callable[[dict], bool], timeout: float,
                       what: str = "the expected state") -> dict:
        """Poll the stored WeightSync until `predicate(obj)` holds; fail with its status if not."""
        deadline = time.monotonic() + timeout
        while True:
            obj = await self.fetch_weightsync(namespace, name)
            if obj is not None and predicate(obj):
                return obj
            if time.monotonic() > deadline:
                status = json.dumps((obj or {}).get("status"), indent=1)[:3000]
                raise AssertionError(f"{namespace}/{name} did not reach {what} within {timeout:g}s; status: {status}")
            await asyncio.sleep(0.02)

    # -- pods -----------------------------------------------------------------------------
    async def create_pod(self, namespace: str, name: str, role: str, sync: str, url: str,
                         rendezvous_port: int | None = None, ready: bool = True, restarts: int = 0,
                         annotations: dict[str, str] | None = None, gated: bool = False) -> dict:
        """A scheduled, running pod whose daemon (or vLLM server) is the local process at `url`;
        `annotations` add to the port's (e.g. `weightsync.dev/engine: vllm`); `gated`: it carries
        the readiness gate `weightsync.dev/synced`."""
        annotations = {**(annotations or {}), DAEMON_PORT_ANNOTATION: url.rsplit(":", 1)[1]}
        if rendezvous_port is not None:
            annotations[RENDEZVOUS_PORT_ANNOTATION] = str(rendezvous_port)
        body = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations,
                         "labels": {"weightsync.dev/role": role, "weightsync.dev/sync": sync}},
            "spec": {"containers": [{"name": "main", "image": f"weightsync/{role}"}],
                     **({"readinessGates": [{"conditionType": SYNCED_CONDITION}]} if gated else {})},
            "status": pod_status(ready, restarts),
        }
        return await self.request("POST", f"/api/v1/namespaces/{namespace}/pods", body)

    def pod(self, namespace: str, name: str) -> dict | None:
        return self.emulator.get(POD_RESOURCE, namespace, name)

    def pod_history(self, namespace: str, name: str) -> list[dict]:
        return self.emulator.history(POD_RESOURCE, namespace, name)

    async def restart_pod(self, namespace: str, name: str, url: str, restarts: int) -> None:
        """The kubelet restarted the pod's container: a new process (here: a new port)."""
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        daemon_port = url.rsplit(":", 1)[1]
        await self.request("PATCH", path, {"metadata": {"annotations": {DAEMON_PORT_ANNOTATION: daemon_port}}},
                           "application/merge-patch+json")
        await self.request("PATCH", path + "/status", {"status": pod_status(True, restarts)}, STRATEGIC_MERGE)

    async def set_pod_ready(self, namespace: str, name: str, ready: bool, restarts: int = 0) -> None:
        """As the kubelet reports it: its own conditions and container statuses change, conditions
        set by others (a readiness gate's) stay."""
        await self.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status",
                           {"status": pod_status(ready, restarts)}, STRATEGIC_MERGE)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def pod_status(ready: bool, restarts: int) -> dict:
    return {"phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"},
                           {"type": "ContainersReady", "status": "True" if ready else "False"}],
            "containerStatuses": [{"name": "main", "ready": ready, "restartCount": restarts}]}


def write_kubeconfig(path: Path, url: str, namespace: str = "default") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "contexts": [{"name": "emulator",
                      "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}],
        "users": [{"name": "tester", "user": {"token": "not-checked"}}],
    }))
    return path


@contextlib.asynccontextmanager
async def cluster(workdir: Path, install_crd: bool = True) -> AsyncIterator[Cluster]:
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        url = str(server.url).rstrip("/")
        handle = Cluster(emulator, url, write_kubeconfig(workdir / "kubeconfig", url))
        try:
            if install_crd:
                await handle.apply_crd()
            yield handle
        finally:
            await handle.close()


class RemoteCluster(Cluster):
    """An emulated API server in a process of its own (k8s_api_process.py), reached over HTTP
    only: what reads the in-process emulator's store (history, events, request counts) is not
    available; `wait_for` polls with GET requests."""

    def __init__(self, process: LocalProcess, kubeconfig: Path):
        super().__init__(None, process.url, kubeconfig)  # type: ignore[arg-type]  # no emulator here
        self.process = process

    async def fetch_weightsync(self, namespace: str, name: str) -> dict | None:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
        async with self.session.get(path) as response:
            return None if response.status == 404 else await response.json(content_type=None)


@contextlib.asynccontextmanager
async def remote_cluster(workdir: Path) -> AsyncIterator[RemoteCluster]:
    """`cluster`, with the API server in a process of its own (the operator's CPU is its own)."""
    env = {"PYTHONPATH": os.pathsep.join([str(HELPERS.parent), os.environ.get("PYTHONPATH", "")])}
    process = await LocalProcess.start("api-server", "helpers.k8s_api_process", [], timeout=60, env=env)
    handle = RemoteCluster(process, write_kubeconfig(workdir / "kubeconfig", process.url))
    try:
        await handle.apply_crd()
        yield handle
    finally:
        await handle.close()
        await process.stop()


@contextlib.asynccontextmanager
async def operator(url: str, recheck_interval: float = 30.0) -> AsyncIterator[Runtime]:
    """kopf's real runtime over our handlers, in this event loop, until the block ends."""
    registry = handlers.register(kopf.OperatorRegistry())

    @kopf.on.login(registry=registry)
    def login(**_):
        return kopf.ConnectionInfo(server=url, scheme="Bearer", token="not-checked")

    runtime = Runtime(KubeApi.for_url(url), recheck_interval=recheck_interval)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, standalone=True, clusterwide=True,
                                             stop_flag=stop, ready_flag=ready, memo=kopf.Memo(runtime=runtime)))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        yield runtime
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        runtime.kube.close()


@contextlib.asynccontextmanager
async def operator_process(kubeconfig: Path, log: Path, recheck_interval: float = 2.0
                           ) -> AsyncIterator[asyncio.subprocess.Process]:
    """`weightsync operator` as its own process, as it runs in a pod; killed at the end if the
    caller has not stopped it already."""
    with log.open("ab") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "weightsync_cli", "operator", "--standalone", "--all-namespaces",
            "--recheck-interval", str(recheck_interval), env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await asyncio.wait_for(process.wait(), 10)


async def start_daemons(count: int, prefix: str = "infer", timeout: float = 60.0,
                        batch: int | None = None) -> list[LocalProcess]:
    """`count` standalone daemon processes on the cpu transport. With `batch`, at most that many
    start at a time, each batch within `timeout`: tens of processes importing torch at once on
    two cores would otherwise all miss a deadline that one of them meets easily."""
    started: list[LocalProcess] = []
    size = batch or max(count, 1)
    for first in range(0, count, size):
        names = [f"{prefix}-{i}" for i in range(first, min(first + size, count))]
        answers = await asyncio.gather(*(
            LocalProcess.start(name, "weightsync_daemon",
                               ["--host", "127.0.0.1", "--port", "0", "--backend", "cpu", "--exit-on-stdin-eof"],
                               timeout)
            for name in names), return_exceptions=True)
        started += [a for a in answers if isinstance(a, LocalProcess)]
        failures = [a for a in answers if isinstance(a, BaseException)]
        if failures:
            await asyncio.gather(*(s.stop() for s in started))
            raise failures[0]
    return started


@dataclasses.dataclass
class Fleet:
    """One WeightSync with a trainer process and `len(daemons)` daemon targets, its group Ready."""

    namespace: str
    name: str
    trainer: "Trainer"
    daemons: list[LocalProcess]


def fleet_spec(name: str, rendezvous_port: int, **overrides) -> dict:
    """A cpu-transport WeightSync selecting the pods labelled with its own name (several may
    share a namespace)."""
    return {"backend": "cpu", "pauseMode": "keep", "rendezvousPort": rendezvous_port,
            "packedBufferSizeBytes": 1 << 22,
            "timeouts": {"transferSeconds": 30, "updateSeconds": 60, "initSeconds": 120},
            "trainerSelector": {"matchLabels": {"weightsync.dev/role": "trainer", "weightsync.dev/sync": name}},
            "targetSelector": {"matchLabels": {"weightsync.dev/role": "inference", "weightsync.dev/sync": name}},
            **overrides}


@contextlib.asynccontextmanager
async def daemon_fleet(c: Cluster, namespace: str, name: str, targets: int, mbytes: float = 4.0,
                       batch: int = 8, ready_timeout: float = 180.0) -> AsyncIterator[Fleet]:
    """A WeightSync over `targets` daemon pods (each with the readiness gate) and a trainer pod,
    all real processes, started `batch` daemons at a time; yields once the group is Ready and
    the trainer knows it. Everything stops when the block ends."""
    await c.create_weightsync(namespace, name, fleet_spec(name, free_port()))
    trainer = await Trainer.start(c, namespace, name, f"{name}-trainer", mbytes=mbytes)
    daemons: list[LocalProcess] = []
    try:
        daemons = await start_daemons(targets, prefix=f"{name}-infer", timeout=120.0, batch=batch)
        await c.create_pod(namespace, f"{name}-trainer", "trainer", name, trainer.url)
        for d in daemons:
            await c.create_pod(namespace, d.name, "inference", name, d.url, gated=True)
        await c.wait_for(namespace, name, lambda o: o.get("status", {}).get("readyTargets") == f"{targets}/{targets}"
                         and o["status"]["phase"] == "Ready", ready_timeout, f"{name}'s group of {targets}")
        assert (await trainer.wait_ready())["ok"]
        yield Fleet(namespace, name, trainer, daemons)
    finally:
        await trainer.stop()
        await asyncio.gather(*(d.stop() for d in daemons))


class Trainer:
    """The trainer process (tests/helpers/k8s_trainer.py), driven through its stdin."""

    def __init__(self, process: LocalProcess):
        self.process = process

    @property
    def url(self) -> str:
        return self.process.url

    @classmethod
    async def start(cls, c: Cluster, namespace: str, name: str, pod: str, mbytes: float = 4.0,
                    push_timeout: float = 60.0) -> "Trainer":
        env = {"PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
        process = await LocalProcess.start(pod, "k8s_trainer", [
            "--name", name, "--namespace", namespace, "--pod", pod, "--kubeconfig", str(c.kubeconfig),
            "--mbytes", str(mbytes), "--push-timeout", str(push_timeout)], env=env)
        return cls(process)

    async def command(self, deadline: float, **command) -> dict:
        self.process.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.process.stdin.drain()
        line = await asyncio.wait_for(self.process.process.stdout.readline(), deadline)
        if not line:
            raise RuntimeError(f"the trainer process exited (code {self.process.process.returncode})")
        return json.loads(line)

    async def push(self, version: int, timeout: float = 90.0, hold: Path | None = None) -> dict:
        """`hold`: the round waits after its first tensor until this file exists."""
        if hold is None:
            return await self.command(timeout, cmd="push", version=version)
        return await self.command(timeout, cmd="push", version=version, hold=str(hold))

    async def wait_ready(self, timeout: float = 60.0) -> dict:
        return await self.command(timeout + 5, cmd="wait_ready", timeout=timeout)

    async def stop(self) -> None:
        await self.process.stop()


class VllmTrainer(Trainer):
    """tests/helpers/k8s_vllm_trainer.py (the HF model; it builds the checkpoint the vLLM servers load),
    run with the vLLM venv's Python, driven through its stdin like `Trainer`."""

    @classmethod
    async def start(cls, python: str, kubeconfig: Path, model: Path, pod: str, namespace: str,
                    name: str) -> "VllmTrainer":
        env = {"PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]),
               # this venv's `kubernetes` package, for the trainer's client (not in vLLM's lock)
               "WEIGHTSYNC_KUBE_SITE": sysconfig.get_paths()["purelib"],
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        process = await LocalProcess.start(pod, "k8s_vllm_trainer", [
            "--name", name, "--namespace", namespace, "--pod", pod, "--kubeconfig", str(kubeconfig),
            "--model", str(model), "--push-timeout", "150"], timeout=180, env=env, python=python)
        return cls(process)

    async def push(self, version: int, timeout: float = 170.0, hold: Path | None = None) -> dict:
        return await super().push(version, timeout, hold)

    async def wait_ready(self, timeout: float = 100.0) -> dict:
        return await super().wait_ready(timeout)

    async def expected(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """The trainer model's greedy completions of `prompts` (HF's generate)."""
        answer = await self.command(120, cmd="generate", prompts=prompts, max_tokens=max_tokens)
        assert answer["ok"], answer
        return answer["completions"]


async def checksums(http, urls: list[str]) -> list[tuple[str | None, str]]:
    """(weight version, combined SHA-256) of each daemon's weights."""
    answers = []
    for url in urls:
        response = await http.post(url + "/weight_checker", json={"action": "checksum"}, timeout=30)
        response.raise_for_status()
        body = response.json()
        answers.append((body["weight_version"], body["checksum"]))
    return answers


__all__ = ["Cluster", "Fleet", "Trainer", "checksums", "cluster", "daemon_fleet", "fleet_spec", "free_port",
           "operator", "start_daemons"]


async def until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll a predicate (a coroutine function, or a plain one) until it returns something truthy;
    fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        await asyncio.sleep(interval)
