"""A vLLM-shaped model for measuring (and GPU-testing) weightsync's loader sink without vLLM:
q/k/v fused into one preallocated `qkv_proj` parameter and gate/up into `gate_up_proj` (tensor
parallel 1), and a `load_weights` that copies each Hugging Face tensor into its slice of the
fused parameter, as vLLM's stacked-parameter loaders do.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch

from weightsync.protocol import Manifest

# (HF part, fused part, position among the fused parts)
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def fused_name(name: str) -> tuple[str, int]:
    """'model.layers.0.self_attn.k_proj.weight' -> ('model.layers.0.self_attn.qkv_proj.weight', 1)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in FUSED:
        fused, position = FUSED[parts[-2]]
        return ".".join(parts[:-2] + [fused, parts[-1]]), position
    return name, 0


class FusedModel:
    """The engine's parameters, fused and preallocated, and the route of every HF tensor into them."""

    def __init__(self, shapes: Iterable[tuple[str, tuple[int, ...]]], dtype: torch.dtype, device):
        members: dict[str, list[tuple[int, str, tuple[int, ...]]]] = {}
        for name, shape in shapes:
            fused, position = fused_name(name)
            members.setdefault(fused, []).append((position, name, tuple(shape)))
        self.dtype = dtype
        self.params: dict[str, torch.Tensor] = {}
        self.route: dict[str, tuple[str, int, tuple[int, ...]]] = {}  # HF name -> (param, first row, shape)
        for fused, parts in members.items():
            parts.sort()
            rows = sum(shape[0] for _, _, shape in parts)
            self.params[fused] = torch.zeros((rows, *parts[0][2][1:]), dtype=dtype, device=device)
            start = 0
            for _, name, shape in parts:
                self.route[name] = (fused, start, shape)
                start += shape[0]

    def check(self, manifest: Manifest) -> str | None:
        """What vLLM's loader would refuse: a name it has no place for, another shape or dtype."""
        dtype = str(self.dtype).removeprefix("torch.")
        for spec in manifest.tensors:
            route = self.route.get(spec.name)
            if route is None:
                return f"parameter {spec.name!r} has no place in the engine's model"
            if tuple(spec.shape) != route[2] or spec.dtype != dtype:
                return (f"parameter {spec.name!r}: the engine loads {dtype}{list(route[2])}, "
                        f"the trainer sends {spec.dtype}{list(spec.shape)}")
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each HF tensor into its slice of the fused parameter (vLLM: weight_loader)."""
        for name, tensor in weights:
            fused, start, shape = self.route[name]
            self.params[fused].narrow(0, start, shape[0]).copy_(tensor, non_blocking=True)

    def slice(self, name: str) -> torch.Tensor:
        fused, start, shape = self.route[name]
        return self.params[fused].narrow(0, start, shape[0])

    def digest(self, names: Iterable[str]) -> str:
        """SHA-256 over the loaded slices of `names`, in order (compare with `tensors_digest`)."""
        return tensors_digest(self.slice(name) for name in names)


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    total = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
        total.update(memoryview(flat.numpy()))
    return total.hexdigest()


def nbytes(shapes: Iterable[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> int:
    return sum(math.prod(shape) * dtype.itemsize for _, shape in shapes)
