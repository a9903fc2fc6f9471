"""The trainer's side on Kubernetes: `connect(name, namespace=...)` and `push(...)`.

    from weightsync_operator.trainer_client import connect

    sync = connect("policy-sync", namespace="rl")                 # in the trainer pod
    for step in range(...):
        train_step(model)
        sync.push(model.named_parameters(), version=step)          # returns once every target has it

`connect` serves the trainer agent (rank 0 of the transfer group) on the daemon port, where the
operator finds it through the trainer pod, and waits until the operator has formed the group
(the WeightSync's status then names this pod in `rendezvous`). `push` bumps `spec.version`,
serves exactly these tensors while the operator runs the round, and returns the round's figures
or raises `PushFailed` with the operator's reason. Outside a push the agent serves nothing, so
a round can never read tensors that an optimizer step is changing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from weightsync.errors import PhaseError
from weightsync.source import WeightSource, adapt, is_source
from weightsync.tokens import load_token
from weightsync_daemon.server import EmbeddedServer, serve_embedded
from weightsync_daemon.service import SenderService
from weightsync_operator.kube import KubeApi, KubeError
from weightsync_operator.resource import parse_spec

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
PORT_ENV = "WEIGHTSYNC_DAEMON_PORT"


class PushFailed(RuntimeError):
    """The operator ran the round for this version and it failed; `reason` says who and why."""

    def __init__(self, version: int, reason: str):
        super().__init__(f"version {version} was not applied: {reason}")
        self.version, self.reason = version, reason


@dataclass(frozen=True)
class PushResult:
    version: int
    bytes: int
    seconds: float  # data plane
    total_seconds: float  # pause to resume, as the operator measured it
    gbps: float
    started: str | None
    finished: str | None


class TrainerClient:
    def __init__(self, name: str, namespace: str, kube: KubeApi, server: EmbeddedServer,
                 service: SenderService, pod_name: str | None):
        self.name, self.namespace, self.pod_name = name, namespace, pod_name
        self.kube = kube
        self._server, self._service = server, service
        self._tensors: WeightSource | list[tuple[str, torch.Tensor]] | None = None
        self._tensors_lock = threading.Lock()
        self._push_lock = threading.Lock()

    @property
    def url(self) -> str:
        """Where the trainer agent listens (its port goes in the pod's spec or annotation)."""
        return self._server.url

    @property
    def port(self) -> int:
        return self._server.port

    def _source(self) -> WeightSource | list[tuple[str, torch.Tensor]]:
        with self._tensors_lock:
            if self._tensors is None:
                raise PhaseError("no push in progress: the trainer agent serves weights only during push()")
            return self._tensors

    def rendezvous(self) -> dict | None:
        """The group this trainer leads, as the WeightSync's status reports it."""
        return (self.kube.get(self.namespace, self.name).get("status") or {}).get("rendezvous")

    def wait_ready(self, timeout: float = 300.0) -> dict:
        """Block until the operator has formed the group with this trainer; return the rendezvous."""
        deadline = time.monotonic() + timeout
        obj = self.kube.get(self.namespace, self.name)
        while True:
            rendezvous = (obj.get("status") or {}).get("rendezvous")
            if rendezvous is not None and self._leads(rendezvous) and self._service.phase.value == "ready":
                return dict(rendezvous)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the operator did not form the group of {self.namespace}/{self.name} within "
                                   f"{timeout:g}s (status: {(obj.get('status') or {}).get('message')})")
            # Re-check on every change of the WeightSync, and at least once a second (the agent's
            # own phase says whether the operator has initialised it in this incarnation).
            changes = self.kube.watch(self.namespace, self.name, obj["metadata"].get("resourceVersion"), min(left, 1.0))
            try:
                obj = next(changes, obj)
            finally:
                changes.close()

    def _leads(self, rendezvous: dict | None) -> bool:
        if not rendezvous:
            return False
        return rendezvous.get("trainerPod") == self.pod_name if self.pod_name else True

    def push(self, named_tensors: WeightSource | Iterable[tuple[str, torch.Tensor]], version: int,
             timeout: float = 600.0) -> PushResult:
        """Publish `named_tensors` as `version` to every target; block until the round ended.

        `named_tensors`: (name, tensor) pairs, or a source (`metadata()` + iteration, e.g.
        `weightsync.ModuleSource(model)`, or vLLM's own, 0.32's or 0.33's) that the round streams,
        one tensor materialized at a time."""
        version = int(version)
        named_tensors = adapt(named_tensors)  # a vLLM 0.33 WeightSource reads as a weightsync source
        tensors: WeightSource | list[tuple[str, torch.Tensor]] = (
            named_tensors if is_source(named_tensors) else [(name, tensor.detach()) for name, tensor in named_tensors])
        with self._push_lock:
            obj = self.kube.get(self.namespace, self.name)
            status = obj.get("status") or {}
            have = max(int(obj.get("spec", {}).get("version") or 0),
                       int((status.get("lastSync") or {}).get("version") or 0))
            if version <= have:
                raise ValueError(f"version {version} is not newer than {have}, the WeightSync's latest")
            with self._tensors_lock:
                self._tensors = tensors
            try:
                patched = self.kube.patch_spec(self.namespace, self.name, {"version": version})
                return self._wait_for_round(version, patched["metadata"].get("resourceVersion"), timeout)
            finally:
                with self._tensors_lock:
                    self._tensors = None

    def _wait_for_round(self, version: int, resource_version: str | None, timeout: float) -> PushResult:
        for obj in self.kube.watch(self.namespace, self.name, resource_version, timeout):
            last = (obj.get("status") or {}).get("lastSync") or {}
            done = int(last.get("version") or 0)
            if done == version and last.get("outcome") == "Succeeded":
                return PushResult(version, int(last.get("bytes", 0)), float(last.get("seconds", 0.0)),
                                  float(last.get("totalSeconds", 0.0)), float(last.get("gbps", 0.0)),
                                  last.get("started"), last.get("finished"))
            if done == version:
                raise PushFailed(version, last.get("reason") or "the round failed")
            if done > version:
                raise PushFailed(version, f"superseded by version {done}")
        raise TimeoutError(f"version {version} of {self.namespace}/{self.name} did not finish within {timeout:g}s")

    def close(self) -> None:
        self._server.stop()
        self.kube.close()

    def __enter__(self) -> "TrainerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _get_when_created(kube: KubeApi, namespace: str, name: str, timeout: float) -> dict:
    """The WeightSync, waiting up to `timeout` for it to be created (pods may start first)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return kube.get(namespace, name)
        except KubeError as error:
            if error.status != 404 or time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def default_namespace() -> str:
    """The pod's own namespace in a cluster, else $POD_NAMESPACE, else the kubeconfig's."""
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        import kubernetes

        _, context = kubernetes.config.list_kube_config_contexts(os.environ.get("KUBECONFIG"))
        return context.get("context", {}).get("namespace") or "default"
    except Exception:  # no kubeconfig: the default namespace, as kubectl would use
        return "default"


def connect(name: str, namespace: str | None = None, *, port: int | None = None, host: str = "0.0.0.0",
            device: str | torch.device | None = None, pod_name: str | None = None, kube: KubeApi | None = None,
            token: str | None = None, wait: bool = True, timeout: float = 300.0) -> TrainerClient:
    """Serve this trainer's agent for the WeightSync `name` and (with `wait`) block until the
    operator has formed the group. The port defaults to $WEIGHTSYNC_DAEMON_PORT, else the
    WeightSync's spec.daemonPort; the pod name (to find itself in the status) to $POD_NAME, else
    the hostname; the bearer token to $WEIGHTSYNC_AUTH_TOKEN."""
    kube = kube or KubeApi.from_environment()
    namespace = namespace or default_namespace()
    spec = parse_spec(_get_when_created(kube, namespace, name, timeout).get("spec"))
    if port is None:
        port = int(os.environ.get(PORT_ENV, spec.daemon_port))
    pod_name = pod_name or os.environ.get("POD_NAME") or socket.gethostname()
    client: TrainerClient | None = None

    def source() -> WeightSource | Iterable[tuple[str, torch.Tensor]]:
        """The round's tensors, once push() set them on the client made below."""
        if client is None:
            raise RuntimeError("the trainer's client is not made yet")
        return client._source()

    service = SenderService(source=source, backend=spec.backend, device=device)
    server = serve_embedded(service, host, port, token=token if token is not None else load_token())
    client = TrainerClient(name, namespace, kube, server, service, pod_name)
    if wait:
        try:
            client.wait_ready(timeout)
        except BaseException:
            client.close()
            raise
    return client


__all__ = ["PushFailed", "PushResult", "TrainerClient", "connect"]
