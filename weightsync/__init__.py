"""weightsync: move model weights from an RL trainer to inference workers, fast and safely.

The core library: the four-phase protocol's typed messages, packed transfer in bounded
buffers, and pluggable transports. It has no Kubernetes and no HTTP in it.
"""

from weightsync.errors import (
    ManifestMismatch, PhaseError, ProtocolError, SourceMismatch, TransferError, WeightSyncError,
)
from weightsync.protocol import InitInfo, Manifest, TensorSpec, UpdateInfo
from weightsync.source import ModuleSource, WeightSource
from weightsync.store import WeightStore
from weightsync.trainer import WeightSender
from weightsync.transports import SparsePatch, available, get_transport, register


def connect(name: str, namespace: str | None = None, **kwargs):
    """Lead the WeightSync `name` as its trainer, on Kubernetes; returns a client whose
    `push(named_tensors, version)` publishes a version (see weightsync_operator.trainer_client).

    Imported on call: the core library itself never imports Kubernetes."""
    from weightsync_operator.trainer_client import connect as _connect

    return _connect(name, namespace, **kwargs)


__all__ = [
    "connect", "InitInfo", "ManifestMismatch", "Manifest", "ModuleSource", "PhaseError", "ProtocolError",
    "SourceMismatch", "SparsePatch", "TensorSpec", "TransferError", "UpdateInfo", "WeightSender", "WeightSource",
    "WeightStore", "WeightSyncError",
    "available", "get_transport", "register",
]
