"""weightsync: move model weights from an RL trainer to inference workers, fast and safely.

The core library: the four-phase protocol's typed messages, packed transfer in bounded
buffers, and pluggable transports. It has no Kubernetes and no HTTP in it, and imports none of the
outer packages (daemon, vLLM backend, operator; see [tool.importlinter] in pyproject.toml): on
Kubernetes a trainer leads its group with `weightsync_operator.trainer_client.connect`.
"""

from weightsync.errors import (
    ManifestMismatch, PhaseError, ProtocolError, SourceMismatch, TransferError, WeightSyncError,
)
from weightsync.protocol import InitInfo, Manifest, TensorSpec, UpdateInfo
from weightsync.source import ModuleSource, WeightSource
from weightsync.store import WeightStore
from weightsync.trainer import WeightSender
from weightsync.transports import SparsePatch, available, get_transport, register


__all__ = [
    "InitInfo", "ManifestMismatch", "Manifest", "ModuleSource", "PhaseError", "ProtocolError",
    "SourceMismatch", "SparsePatch", "TensorSpec", "TransferError", "UpdateInfo", "WeightSender", "WeightSource",
    "WeightStore", "WeightSyncError",
    "available", "get_transport", "register",
]
