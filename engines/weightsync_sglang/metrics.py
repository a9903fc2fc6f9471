"""Prometheus metrics of the weightsync plugin inside SGLang: the daemon's metric families, from
every SGLang scheduler process (one per tensor-parallel rank), on a port of the plugin's own.

The families and the events are the core's (`weightsync.metrics.EngineWorkerMetrics`, as for the
vLLM backend), so the chart's dashboard and alerts read SGLang workers as they read daemons. Each
worker serves its registry on `$WEIGHTSYNC_METRICS_PORT + its tensor-parallel rank` (unset: no
port, the metrics are still kept), not on SGLang's own port, whose weight-update routes a
Prometheus admitted to it could call. The served version is SGLang's (`/model_info`'s
`weight_version`), read at each scrape from this server (`$WEIGHTSYNC_SGLANG_URL`, else SGLang's
own port on 127.0.0.1); its trailing number is the gauge's value, as for daemons.
"""

from __future__ import annotations

import logging
import os

import httpx

from weightsync.metrics import EngineWorkerMetrics

logger = logging.getLogger(__name__)

SGLANG_URL_ENV = "WEIGHTSYNC_SGLANG_URL"
VERSION_READ_SECONDS = 1.0  # a scrape never waits longer than this on SGLang's /model_info


class SGLangWorkerMetrics(EngineWorkerMetrics):
    """One SGLang worker's weightsync metrics; the served label is SGLang's `/model_info`."""

    def __init__(self, sglang_url: str, api_key: str | None = None) -> None:
        self.sglang_url = sglang_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        super().__init__()

    def served_label(self) -> str | None:
        try:
            answer = httpx.get(f"{self.sglang_url}/model_info", timeout=VERSION_READ_SECONDS, headers=self._headers)
            answer.raise_for_status()
            label = answer.json().get("weight_version")
        except (httpx.HTTPError, ValueError, AttributeError) as error:
            logger.debug("weightsync metrics: SGLang's /model_info unreadable (%s)", error)
            return None
        return None if label is None else str(label)


def server_url() -> tuple[str, str | None]:
    """Where this SGLang server answers (`$WEIGHTSYNC_SGLANG_URL`, else its own port on this
    host) and the key its routes take (its `--api-key`), from SGLang's server arguments."""
    from sglang.srt.runtime_context import get_server_args

    args = get_server_args()
    url = os.environ.get(SGLANG_URL_ENV) or f"http://127.0.0.1:{int(args.port)}"
    return url, getattr(args, "api_key", None)
