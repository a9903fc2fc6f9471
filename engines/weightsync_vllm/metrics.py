"""Prometheus metrics of the weightsync backend inside vLLM: the daemon's metric families, from
every vLLM worker process, on a port of the backend's own.

Why the same families: the chart's Grafana dashboard and PrometheusRule read
`weightsync_update_duration_seconds`, `weightsync_received_bytes_total`,
`weightsync_weight_version`, `weightsync_update_failures_total{reason}`,
`weightsync_weights_intact`, ... with the daemon's names, types and labels; a vLLM target must
show up in them unchanged (tests/engines/test_vllm_metrics.py compares the families with the daemon's).
The definitions are the core's (weightsync.metrics), as the daemon's are.

Why a port of its own rather than vLLM's `/metrics`: vLLM 0.32 serves `/metrics` from the API
server process's registry; the workers' registries reach it only in prometheus_client's
multiprocess mode, which vLLM turns on only for several API servers (and then every gauge needs
an aggregation mode and the directory a wipe per run). And vLLM's HTTP port also carries the
unauthenticated weight routes, so a Prometheus admitted to it could also rewrite the weights
(docs/vllm.md, "Security: what vLLM's --api-key protects"). So each worker serves its own registry on
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
from prometheus_client import start_http_server
from prometheus_client.context_managers import Timer

from weightsync import metrics as weightsync_metrics
from weightsync.errors import ProtocolError
from weightsync.metrics import FAILURE_REASONS, WeightsyncMetrics, trailing_number

__all__ = ["FAILURE_REASONS", "WorkerMetrics", "failure_reason", "metrics_port", "serve", "trailing_number"]

logger = logging.getLogger(__name__)

PORT_ENV = "WEIGHTSYNC_METRICS_PORT"
VLLM_URL_ENV = "WEIGHTSYNC_VLLM_URL"
DEFAULT_VLLM_URL = "http://127.0.0.1:8000"
VERSION_READ_SECONDS = 1.0  # a scrape never waits longer than this on vLLM's /weight_info

def failure_reason(error: BaseException) -> str:
    """The `reason` label of an error raised in a worker: the engine refuses a bad init_info
    field with a ValueError naming it, so that is the caller's input too."""
    return weightsync_metrics.failure_reason(error, bad_request=(ProtocolError, ValueError))


class WorkerMetrics(WeightsyncMetrics):
    """One vLLM worker's weightsync metrics, in a registry of their own."""

    def __init__(self, vllm_url: str | None = None) -> None:
        super().__init__()
        self.vllm_url = (vllm_url or os.environ.get(VLLM_URL_ENV) or DEFAULT_VLLM_URL).rstrip("/")
        self.rounds_finished = 0
        self.weight_version.set_function(self._served_version)
        self._set_backend("none")

    # -- events the engine reports ---------------------------------------------------------
    def phase(self, name: str) -> Timer:
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
        self.set_info("receiver", backend)

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
