"""Prometheus metrics of the weightsync backend inside vLLM: the daemon's metric families, from
every vLLM worker process, on a port of the backend's own.

Why the same families: the chart's Grafana dashboard and PrometheusRule read
`weightsync_update_duration_seconds`, `weightsync_received_bytes_total`,
`weightsync_weight_version`, `weightsync_update_failures_total{reason}`,
`weightsync_weights_intact`, ... with the daemon's names, types and labels; a vLLM target must
show up in them unchanged (tests/test_vllm_metrics.py compares the families with the daemon's).
The definitions are repeated here rather than imported because importing `weightsync_daemon`
would pull the daemon's web app into every vLLM worker.

Why a port of its own rather than vLLM's `/metrics`: vLLM 0.32 serves `/metrics` from the API
server process's registry; the workers' registries reach it only in prometheus_client's
multiprocess mode, which vLLM turns on only for several API servers (and then every gauge needs
an aggregation mode and the directory a wipe per run). And vLLM's HTTP port also carries the
unauthenticated weight routes, so a Prometheus admitted to it could also rewrite the weights
(README, "vLLM: what --api-key protects"). So each worker serves its own registry on
`$WEIGHTSYNC_METRICS_PORT + its local rank` (8200, 8201, ... in a TP-2 pod); unset, no port
is opened (the metrics are still kept, e.g. for tests in the same process).

The served weight version: vLLM keeps the label of `/finish_weight_update {"weight_version"}`
in its engine core, out of the workers' reach; at each scrape the gauge reads it from vLLM's
own `GET /weight_info` at `$WEIGHTSYNC_VLLM_URL` (default http://127.0.0.1:8000) and exports
its trailing number, as daemons do; where vLLM cannot say, the count of rounds this worker
finished.
"""

from __future__ import annotations

import logging
import os
import time

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from weightsync.errors import IntegrityError, ManifestMismatch, ProtocolError, TransferError

logger = logging.getLogger(__name__)

PORT_ENV = "WEIGHTSYNC_METRICS_PORT"
VLLM_URL_ENV = "WEIGHTSYNC_VLLM_URL"
DEFAULT_VLLM_URL = "http://127.0.0.1:8000"
VERSION_READ_SECONDS = 1.0  # a scrape never waits longer than this on vLLM's /weight_info

# The daemon's (daemon/weightsync_daemon/metrics.py): the dashboard and alerts depend on them.
PHASES = ("init", "start", "update", "finish")
FAILURE_REASONS = ("manifest_mismatch", "integrity", "transfer_error", "bad_request", "conflict", "internal")
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MAX_GAUGE_DIGITS = 15  # a float gauge holds integers this long exactly


def failure_reason(error: BaseException) -> str:
    """The bounded `reason` label of an error raised in a worker: of the first error in its
    `raise ... from` chain that says more than "internal" (the engine re-raises a round's
    error as the message vLLM answers with, caused by the transport's)."""
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
            case ProtocolError() | ValueError():
                return "bad_request"  # a body or init_info that names the bad field
        current = current.__cause__
    return "internal"


def trailing_number(label: str | None) -> int | None:
    """The number a version label ends in ("step-42" → 42), or None (none, or too long)."""
    label = label or ""
    start = len(label)
    while start > 0 and "0" <= label[start - 1] <= "9":
        start -= 1
    digits = label[start:]
    if not digits or len(digits.lstrip("0")) > MAX_GAUGE_DIGITS:
        return None
    return int(digits)


class WorkerMetrics:
    """One vLLM worker's weightsync metrics, in a registry of their own."""

    def __init__(self, vllm_url: str | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.vllm_url = (vllm_url or os.environ.get(VLLM_URL_ENV) or DEFAULT_VLLM_URL).rstrip("/")
        self.rounds_finished = 0
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
        self.weight_version.set_function(self._served_version)
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
        self._set_backend("none")
        for phase in PHASES:
            self.phase_seconds.labels(phase=phase)
        for outcome in ("success", "failure"):
            self.updates.labels(outcome=outcome)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason=reason)

    # -- events the engine reports ---------------------------------------------------------
    def phase(self, name: str):
        """Context manager timing one protocol phase of this worker."""
        return self.phase_seconds.labels(phase=name).time()

    def joined(self, backend: str) -> None:
        self._set_backend(backend)

    def call_failed(self, error: BaseException) -> None:
        self.failures.labels(reason=failure_reason(error)).inc()

    def round_started(self) -> None:
        self.paused.set(1)  # the layers are being reloaded: vLLM must not serve until finish

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

    # -- internals -------------------------------------------------------------------------
    def _set_backend(self, backend: str) -> None:
        self.info.clear()
        self.info.labels(role="receiver", backend=backend).set(1)

    def _served_version(self) -> float:
        try:
            answer = httpx.get(f"{self.vllm_url}/weight_info", timeout=VERSION_READ_SECONDS)
            answer.raise_for_status()
            number = trailing_number(answer.json().get("weight_version"))
        except (httpx.HTTPError, ValueError, AttributeError) as error:
            logger.debug("weightsync metrics: vLLM's /weight_info unreadable (%s)", error)
            number = None
        return float(self.rounds_finished if number is None else number)


def metrics_port(local_rank: int) -> int | None:
    """This worker's metrics port: `$WEIGHTSYNC_METRICS_PORT + local_rank`; None when unset."""
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


def serve(metrics: WorkerMetrics, local_rank: int) -> int | None:
    """Serve `metrics` on this worker's port (see module doc); the port, or None when off.

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
