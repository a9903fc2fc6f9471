"""The daemon's Prometheus metrics: weightsync's metric families (weightsync.metrics), labelled
with this daemon's role and backend."""

from __future__ import annotations

from weightsync.metrics import WeightsyncMetrics, numeric_version

__all__ = ["DaemonMetrics", "numeric_version"]


class DaemonMetrics(WeightsyncMetrics):
    def __init__(self, role: str, backend: str):
        super().__init__()
        self.set_info(role, backend)
