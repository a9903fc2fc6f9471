"""The transport registry: a transport is one module plus one `register` call."""

from __future__ import annotations

import importlib
import importlib.util

import torch

from weightsync.transports.base import RoundStats, SparsePatch, Transport

_REGISTRY: dict[str, type[Transport]] = {}
# Built-in transports, imported on first use so that a CPU-only install never touches CUDA.
_BUILTIN_MODULES = {
    "cpu": "weightsync.transports.cpu",
    "nccl": "weightsync.transports.nccl",
    "ipc": "weightsync.transports.ipc",
    "p2p": "weightsync.transports.p2p",
}


def register(cls: type[Transport]) -> type[Transport]:
    """Class decorator: make a transport available under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def get_transport(name: str) -> type[Transport]:
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        try:
            importlib.import_module(_BUILTIN_MODULES[name])
        except ModuleNotFoundError:
            pass
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {available()}") from None


def default_device(backend: str) -> torch.device:
    """Where a party's buffers live: the current GPU for GPU backends, else the CPU."""
    if backend == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def available() -> list[str]:
    """Names of the transports that can be loaded here."""
    names = set(_REGISTRY)
    for name, module in _BUILTIN_MODULES.items():
        if importlib.util.find_spec(module) is not None:
            names.add(name)
    return sorted(names)


__all__ = ["RoundStats", "SparsePatch", "Transport", "available", "default_device", "get_transport", "register"]
