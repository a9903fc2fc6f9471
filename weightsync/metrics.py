"""The weightsync metric families, one definition for every kind of party.

A weightsync daemon and the weightsync backend inside a vLLM worker export the same families
with the same names, types and labels, so the chart's Grafana dashboard and PrometheusRule read
either unchanged. Each party keeps them in a registry of its own, so that several can live in
one process (tests, a trainer that also serves). A daemon serves its registry on its own routes;
an engine worker (`EngineWorkerMetrics`) on a port of its own (`serve_worker`).
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.context_managers import Timer

from weightsync.errors import IntegrityError, ManifestMismatch, PhaseError, ProtocolError, TransferError

logger = logging.getLogger(__name__)

PHASES = ("init", "start", "update", "finish")
FAILURE_REASONS = ("manifest_mismatch", "integrity", "transfer_error", "bad_request", "conflict", "internal")
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MAX_GAUGE_DIGITS = 15  # a float gauge holds integers this long exactly


def failure_reason(error: BaseException, bad_request: tuple[type[BaseException], ...] = (ProtocolError,)) -> str:
    """The bounded `reason` label of an error: that of the first error in its `raise ... from`
    chain that says more than "internal" (an engine may re-raise a round's error as the message
    its host answers with, caused by the transport's). `bad_request`: the error types that mean
    the caller's input was wrong."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        match current:
            case IntegrityError():
                return "integrity"
            case ManifestMismatch():
                return "manifest_mismatch"
            case TransferError():
                return "transfer_error"
            case PhaseError():
                return "conflict"
        if isinstance(current, bad_request):
            return "bad_request"
        current = current.__cause__
    return "internal"


def trailing_number(label: str | None) -> int | None:
    """The number a version label ends in ("step-42" → 42, "7" → 7), or None (none, or too long
    for the gauge). One backwards scan over ASCII digits: linear in the label."""
    label = label or ""
    start = len(label)
    while start > 0 and "0" <= label[start - 1] <= "9":
        start -= 1
    digits = label[start:]
    if not digits or len(digits.lstrip("0")) > MAX_GAUGE_DIGITS:
        return None
    return int(digits)


def numeric_version(label: str | None, fallback: int) -> int:
    """`trailing_number(label)`, or `fallback` where the label has none."""
    number = trailing_number(label)
    return fallback if number is None else number


class WeightsyncMetrics:
    """Every weightsync metric family, in a registry of its own, with every label value
    pre-created (a series that exists at 0 lets `increase()` see its first event)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.phase_seconds = Histogram(
            "weightsync_update_duration_seconds", "Time spent in each protocol phase.",
            ["phase"], buckets=DURATION_BUCKETS, registry=r)
        self.received_bytes = Counter(
            "weightsync_received_bytes", "Payload bytes received from the trainer.", registry=r)
        self.sent_bytes = Counter(
            "weightsync_sent_bytes", "Payload bytes sent to receivers (trainer role).", registry=r)
        self.weight_version = Gauge(
            "weightsync_weight_version", "Numeric weight version now live (the label's trailing number).",
            registry=r)
        self.updates = Counter("weightsync_updates", "Weight updates by outcome.", ["outcome"], registry=r)
        self.failures = Counter(
            "weightsync_update_failures", "Failed protocol calls by reason.", ["reason"], registry=r)
        self.last_success = Gauge(
            "weightsync_last_success_timestamp_seconds", "Unix time of the last applied update.", registry=r)
        self.paused = Gauge("weightsync_paused", "1 while generation is paused for a sync.", registry=r)
        self.weights_bytes = Gauge("weightsync_weights_bytes", "Bytes of weights held.", registry=r)
        self.weights_intact = Gauge(
            "weightsync_weights_intact",
            "0 while the weights hold part of a failed round (non-atomic receive), else 1.", registry=r)
        self.weights_intact.set(1)
        self.info = Gauge("weightsync_info", "Constant 1, labelled with the daemon's role and backend.",
                          ["role", "backend"], registry=r)
        for phase in PHASES:
            self.phase_seconds.labels(phase=phase)
        for outcome in ("success", "failure"):
            self.updates.labels(outcome=outcome)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason=reason)

    def set_info(self, role: str, backend: str) -> None:
        self.info.clear()
        self.info.labels(role=role, backend=backend).set(1)


# -- an engine worker's metrics (the vLLM backend's, the SGLang plugin's) ---------------------
PORT_ENV = "WEIGHTSYNC_METRICS_PORT"


class EngineWorkerMetrics(WeightsyncMetrics):
    """One inference-engine worker's weightsync metrics, in a registry of their own: the events a
    backend inside an engine reports, with the daemon's families and labels (so the chart's
    dashboard and alerts read an engine's workers as daemons). The served version comes from the
    engine (`served_label`, read at each scrape); where it cannot say, the count of rounds this
    worker finished."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds_finished = 0
        self.weight_version.set_function(self._served_version)
        self.set_info("receiver", "none")

    def served_label(self) -> str | None:
        """The engine's label of the weights it serves, or None where it cannot say."""
        return None

    def phase(self, name: str) -> Timer:
        """Context manager timing one protocol phase of this worker."""
        return self.phase_seconds.labels(phase=name).time()

    def joined(self, backend: str) -> None:
        self.set_info("receiver", backend)

    def call_failed(self, error: BaseException) -> None:
        # An engine refuses a bad init_info field with a ValueError naming it: the caller's input.
        self.failures.labels(reason=failure_reason(error, bad_request=(ProtocolError, ValueError))).inc()

    def round_started(self) -> None:
        self.paused.set(1)

    def received(self, payload_bytes: int) -> None:
        self.received_bytes.inc(payload_bytes)

    def round_finished(self) -> None:
        self.rounds_finished += 1
        self.updates.labels(outcome="success").inc()
        self.last_success.set(time.time())
        self.weights_intact.set(1)
        self.paused.set(0)

    def round_failed(self, weights_intact: bool) -> None:
        self.updates.labels(outcome="failure").inc()
        self.weights_intact.set(1 if weights_intact else 0)
        self.paused.set(0)

    def _served_version(self) -> float:
        number = trailing_number(self.served_label())
        return float(self.rounds_finished if number is None else number)


def metrics_port(local_rank: int) -> int | None:
    """A worker's metrics port: `$WEIGHTSYNC_METRICS_PORT + local_rank`; None when unset."""
    raw = os.environ.get(PORT_ENV, "").strip()
    if not raw:
        return None
    try:
        base = int(raw)
    except ValueError:
        raise ValueError(f"{PORT_ENV}={raw!r}: not a port number") from None
    port = base + local_rank
    if not 0 < base or port > 65535:
        raise ValueError(f"{PORT_ENV}={raw!r}: worker {local_rank} would listen on {port}, not a TCP port")
    return port


def serve_worker(metrics: WeightsyncMetrics, local_rank: int) -> int | None:
    """Serve `metrics` on this worker's port (`metrics_port`); the port, or None when off.

    A port already taken fails the worker's start with the reason: a silently missing target
    would only show up as an alert much later."""
    port = metrics_port(local_rank)
    if port is None:
        return None
    try:
        start_http_server(port, addr="0.0.0.0", registry=metrics.registry)
    except OSError as error:
        raise OSError(f"weightsync metrics: worker {local_rank} cannot listen on port {port} "
                      f"({PORT_ENV} + local rank): {error}") from error
    logger.info("weightsync: metrics of worker %d on port %d", local_rank, port)
    return port
