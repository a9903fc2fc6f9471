"""The transport registry: a transport is one module plus one `register` call."""

from __future__ import annotations

import importlib
import importlib.util

import torch

from weightsync.transports.base import RoundStats, SparsePatch, Transport

_REGISTRY: dict[str, type[Transport]] = {}
# The built-in transports, in one place: each loaded from its module on first use, so that a
# CPU-only install never touches CUDA. Others join with `register`.
BUILTINS: dict[str, tuple[str, str]] = {
    "cpu": ("weightsync.transports.cpu", "CpuTransport"),
    "nccl": ("weightsync.transports.nccl", "NcclTransport"),
    "ipc": ("weightsync.transports.ipc", "IpcTransport"),
    "p2p": ("weightsync.transports.p2p", "P2pTransport"),
}


def register(cls: type[Transport]) -> type[Transport]:
    """Class decorator for a transport outside weightsync: make it available under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in BUILTINS:
        raise ValueError(f"{cls.name!r} is a built-in transport's name")
    _REGISTRY[cls.name] = cls
    return cls


def get_transport(name: str) -> type[Transport]:
    """The transport class registered as `name`; a built-in one is imported on first use. A
    built-in transport that fails to import says so, with the import's error chained."""
    if name not in _REGISTRY and name in BUILTINS:
        module, attribute = BUILTINS[name]
        try:
            _REGISTRY[name] = getattr(importlib.import_module(module), attribute)
        except ImportError as error:
            raise ValueError(f"the {name} backend could not be loaded: {type(error).__name__}: {error}") from error
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
    for name, (module, _) in BUILTINS.items():
        if importlib.util.find_spec(module) is not None:
            names.add(name)
    return sorted(names)


__all__ = ["RoundStats", "SparsePatch", "Transport", "available", "default_device", "get_transport", "register"]
