"""Pods as the operator sees them: who is ready, where its daemon listens, who it is selected by.

The operator keeps only this small summary of each pod in memory (a kopf index), and selects
members of a group client-side, with the same semantics as Kubernetes label selectors.

Where a pod's weightsync API listens: the `weightsync.dev/daemon-port` annotation, else a
container port named `weightsync`, else the WeightSync's `spec.daemonPort` (8200). The annotation
lets several pods share one address (tests, host networking) with a port each.

Readiness: a pod may carry the readiness gate `weightsync.dev/synced` (`spec.readinessGates`).
Kubernetes then counts it Ready, and a Service sends it traffic, only while the operator holds that
condition True: while the pod serves its WeightSync's current version (see reconciler.py). Such a
pod is a candidate for a group once its containers are ready (`ContainersReady`), since its own
`Ready` waits for the group. A pod without the gate behaves as before: a candidate once Ready.

What serves there: a weightsync daemon, unless the `weightsync.dev/engine` annotation says
`vllm` (a vLLM server with the weightsync backend) or `sglang` (an SGLang server with the
weightsync plugin), whose own routes the coordinator then uses (see client.py). Any other value
leaves the pod out of every group: a typo must not make the operator drive a server through the
wrong routes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from typing import cast, get_args

from weightsync_operator.client import EngineKind, Endpoint
from weightsync_operator.resource import LabelSelector

DAEMON_PORT_ANNOTATION = "weightsync.dev/daemon-port"
RENDEZVOUS_PORT_ANNOTATION = "weightsync.dev/rendezvous-port"
ENGINE_ANNOTATION = "weightsync.dev/engine"
ENGINE_KINDS: tuple[str, ...] = get_args(EngineKind)
PORT_NAME = "weightsync"
SYNCED_CONDITION = "weightsync.dev/synced"  # the readiness gate's condition type


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str
    ip: str | None
    ready: bool
    deleting: bool
    restarts: int
    # Compared (kopf's index keeps a pod's summary until one that differs replaces it: a relabelled
    # pod must read as changed), not hashed (a dict).
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    daemon_port: int | None = None  # from the pod itself; None: the WeightSync's default
    rendezvous_port: int | None = None
    engine: str = "daemon"  # what serves at the port (ENGINE_KINDS; anything else: unusable)
    # The readiness gate: None when the pod has none; else what its condition says now (None:
    # not set yet, which Kubernetes reads as False).
    gated: bool = False
    synced: bool | None = None

    @property
    def usable(self) -> bool:
        """Ready, addressable, served by an engine the coordinator can drive, and not on its way out."""
        return self.ready and bool(self.ip) and not self.deleting and self.engine in ENGINE_KINDS

    @property
    def address(self) -> str:
        """The pod's IP: every pod a group is formed with has one (`usable`)."""
        if not self.ip:
            raise ValueError(f"{self.name}: the pod has no IP yet")
        return self.ip

    def endpoint(self, default_port: int) -> Endpoint:
        host = f"[{self.ip}]" if self.ip and ":" in self.ip else self.ip
        if self.engine not in ENGINE_KINDS:  # `usable` keeps such pods out of a group
            raise ValueError(f"{self.name}: no engine the coordinator can drive ({self.engine!r})")
        engine = cast(EngineKind, self.engine)  # one of ENGINE_KINDS, checked above
        return Endpoint(self.name, f"http://{host}:{self.daemon_port or default_port}", engine)

    def identity(self, default_port: int) -> tuple:
        """What must stay the same for a group formed with this pod to still be valid: a new
        pod, address, port, engine or container restart means the party has to join again."""
        return self.name, self.uid, self.ip, self.daemon_port or default_port, self.restarts, self.engine


def pod_ref(body: Mapping) -> PodRef:
    """Summarise a Pod object (a dict as the API serves it)."""
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {})
    annotations = meta.get("annotations") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    gated = any(g.get("conditionType") == SYNCED_CONDITION for g in spec.get("readinessGates") or [])
    # A gated pod is Ready only once synced: until then, its containers being ready is enough.
    ready = status.get("phase") == "Running" and (
        conditions.get("Ready") == "True" or (gated and conditions.get("ContainersReady") == "True"))
    synced = {"True": True, "False": False}.get(str(conditions.get(SYNCED_CONDITION))) if gated else None
    restarts = sum(int(c.get("restartCount", 0)) for c in status.get("containerStatuses") or [])
    return PodRef(
        namespace=meta.get("namespace", ""), name=meta.get("name", ""), uid=meta.get("uid", ""),
        ip=status.get("podIP") or None, ready=ready, deleting=bool(meta.get("deletionTimestamp")),
        restarts=restarts, labels=dict(meta.get("labels") or {}),
        daemon_port=_port(annotations.get(DAEMON_PORT_ANNOTATION)) or _named_port(spec, PORT_NAME),
        rendezvous_port=_port(annotations.get(RENDEZVOUS_PORT_ANNOTATION)),
        engine=str(annotations.get(ENGINE_ANNOTATION) or "daemon").strip().lower(),
        gated=gated, synced=synced,
    )


def _port(value: object) -> int | None:
    try:
        port = int(str(value))
    except ValueError:
        return None
    return port if 1 <= port <= 65535 else None


def _named_port(spec: Mapping, name: str) -> int | None:
    for container in spec.get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == name:
                return _port(port.get("containerPort"))
    return None


def matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics: every matchLabels pair and every expression holds."""
    for key, value in (selector.match_labels or {}).items():
        if labels.get(key) != value:
            return False
    for req in selector.match_expressions or []:
        present = req.key in labels
        if req.operator == "In" and not (present and labels[req.key] in req.values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in req.values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


def select(pods: Iterable[PodRef], selector: LabelSelector) -> list[PodRef]:
    """The usable pods a selector picks, in a stable order (by name)."""
    return sorted((p for p in pods if p.usable and matches(selector, p.labels)), key=lambda p: p.name)
