"""The weightsync daemon: one process per GPU beside the inference engine.

It holds the live weights, runs one receive engine, and serves the weight-transfer HTTP
protocol (compatible with vLLM's request bodies) plus Prometheus metrics.
"""

from weightsync_daemon.app import create_app
from weightsync_daemon.service import ReceiverService, SenderService

__all__ = ["ReceiverService", "SenderService", "create_app"]
