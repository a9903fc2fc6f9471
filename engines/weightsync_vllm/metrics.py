"""Prometheus metrics of the weightsync backend inside vLLM: the daemon's metric families, from
every vLLM worker process, on a port of the backend's own.

Why the same families: the chart's Grafana dashboard and PrometheusRule read
`weightsync_update_duration_seconds`, `weightsync_received_bytes_total`,
`weightsync_weight_version`, `weightsync_update_failures_total{reason}`,
`weightsync_weights_intact`, ... with the daemon's names, types and labels; a vLLM target must
show up in them unchanged (tests/engines/test_vllm_metrics.py compares the families with the daemon's).
The definitions are the core's (weightsync.metrics), as the daemon's are, and so are the events a
worker reports (`EngineWorkerMetrics`, shared with the SGLang plugin).

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

import httpx

from weightsync import metrics as weightsync_metrics
from weightsync.errors import ProtocolError
from weightsync.metrics import (
    FAILURE_REASONS, PORT_ENV, EngineWorkerMetrics, metrics_port, serve_worker, trailing_number,
)

__all__ = ["FAILURE_REASONS", "PORT_ENV", "WorkerMetrics", "failure_reason", "metrics_port", "serve",
           "trailing_number"]

logger = logging.getLogger(__name__)

VLLM_URL_ENV = "WEIGHTSYNC_VLLM_URL"
DEFAULT_VLLM_URL = "http://127.0.0.1:8000"
VERSION_READ_SECONDS = 1.0  # a scrape never waits longer than this on vLLM's /weight_info


def failure_reason(error: BaseException) -> str:
    """The `reason` label of an error raised in a worker: the engine refuses a bad init_info
    field with a ValueError naming it, so that is the caller's input too."""
    return weightsync_metrics.failure_reason(error, bad_request=(ProtocolError, ValueError))


class WorkerMetrics(EngineWorkerMetrics):
    """One vLLM worker's weightsync metrics, in a registry of their own (the events are the
    core's `EngineWorkerMetrics`; the served label is vLLM's `/weight_info`)."""

    def __init__(self, vllm_url: str | None = None) -> None:
        self.vllm_url = (vllm_url or os.environ.get(VLLM_URL_ENV) or DEFAULT_VLLM_URL).rstrip("/")
        super().__init__()

    def served_label(self) -> str | None:
        try:
            answer = httpx.get(f"{self.vllm_url}/weight_info", timeout=VERSION_READ_SECONDS)
            answer.raise_for_status()
            label = answer.json().get("weight_version")
        except (httpx.HTTPError, ValueError, AttributeError) as error:
            logger.debug("weightsync metrics: vLLM's /weight_info unreadable (%s)", error)
            return None
        return None if label is None else str(label)


def serve(metrics: WorkerMetrics, local_rank: int) -> int | None:
    """Serve `metrics` on this worker's port (`$WEIGHTSYNC_METRICS_PORT + local_rank`); the port,
    or None when off (weightsync.metrics.serve_worker)."""
    return serve_worker(metrics, local_rank)
