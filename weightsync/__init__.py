"""weightsync: move model weights from an RL trainer to inference workers, fast and safely.

The core library: the four-phase protocol's typed messages, packed transfer in bounded
buffers, and pluggable transports. It has no Kubernetes and no HTTP in it.
"""

from weightsync.errors import ManifestMismatch, PhaseError, ProtocolError, TransferError, WeightSyncError
from weightsync.protocol import InitInfo, Manifest, TensorSpec, UpdateInfo
from weightsync.store import WeightStore
from weightsync.trainer import WeightSender
from weightsync.transports import SparsePatch, available, get_transport, register

__all__ = [
    "InitInfo", "ManifestMismatch", "Manifest", "PhaseError", "ProtocolError", "SparsePatch",
    "TensorSpec", "TransferError", "UpdateInfo", "WeightSender", "WeightStore", "WeightSyncError",
    "available", "get_transport", "register",
]
