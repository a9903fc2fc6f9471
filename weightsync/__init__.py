"""weightsync: move model weights from an RL trainer to inference workers, fast and safely.

The core library: the four-phase protocol's typed messages, packed transfer in bounded
buffers, and pluggable transports. It has no Kubernetes and no HTTP in it, and imports none of the
outer packages (daemon, vLLM backend, operator; see [tool.importlinter] in pyproject.toml): on
Kubernetes a trainer leads its group with `weightsync_operator.trainer_client.connect`.

The names below are imported on first use: the torch-free modules (`weightsync.limits`,
`weightsync.cli_args`, `weightsync.tokens`) serve the operator, which runs without PyTorch, and
importing any of them runs this file. The data plane needs PyTorch: `pip install 'weightsync[core]'`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Each public name and the module that defines it.
_EXPORTS = {
    "ManifestMismatch": "weightsync.errors", "PhaseError": "weightsync.errors",
    "ProtocolError": "weightsync.errors", "SourceMismatch": "weightsync.errors",
    "TransferError": "weightsync.errors", "WeightSyncError": "weightsync.errors",
    "InitInfo": "weightsync.protocol", "Manifest": "weightsync.protocol",
    "TensorSpec": "weightsync.protocol", "UpdateInfo": "weightsync.protocol",
    "ModuleSource": "weightsync.source", "WeightSource": "weightsync.source",
    "WeightStore": "weightsync.store",
    "WeightSender": "weightsync.trainer",
    "SparsePatch": "weightsync.transports", "available": "weightsync.transports",
    "get_transport": "weightsync.transports", "register": "weightsync.transports",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see (`X as X`: re-exported); at run time __getattr__ imports them
    from weightsync.errors import (
        ManifestMismatch as ManifestMismatch, PhaseError as PhaseError, ProtocolError as ProtocolError,
        SourceMismatch as SourceMismatch, TransferError as TransferError, WeightSyncError as WeightSyncError,
    )
    from weightsync.protocol import (
        InitInfo as InitInfo, Manifest as Manifest, TensorSpec as TensorSpec, UpdateInfo as UpdateInfo,
    )
    from weightsync.source import ModuleSource as ModuleSource, WeightSource as WeightSource
    from weightsync.store import WeightStore as WeightStore
    from weightsync.trainer import WeightSender as WeightSender
    from weightsync.transports import (
        SparsePatch as SparsePatch, available as available, get_transport as get_transport, register as register,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weightsync' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        raise ModuleNotFoundError(f"weightsync.{name} needs PyTorch, which is not installed: "
                                  "pip install 'weightsync[core]' (or [daemon], [trainer])", name="torch") from error
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
