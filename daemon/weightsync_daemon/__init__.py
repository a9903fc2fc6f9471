"""The weightsync daemon: one process per GPU beside the inference engine.

It holds the live weights, runs one receive engine, and serves the weight-transfer HTTP
protocol (compatible with vLLM's request bodies) plus Prometheus metrics.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Imported on first use: the torch-free modules (`models`, `bodies`) run in the daemon's body
# parser, a child process that must not import PyTorch (see bodies.py).
_EXPORTS = {"create_app": "weightsync_daemon.app", "ReceiverService": "weightsync_daemon.service",
            "SenderService": "weightsync_daemon.service"}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from weightsync_daemon.app import create_app as create_app
    from weightsync_daemon.service import ReceiverService as ReceiverService, SenderService as SenderService


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weightsync_daemon' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
