"""The bridge between the wire's dtype names and PyTorch: a manifest names dtypes as torch
attribute names (`weightsync.protocol.DTYPE_SIZES`), and the trainer's and receivers' tensors carry
torch dtypes. Kept apart from the wire models so that those import without PyTorch (the operator
and the daemon's body parser have none)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from weightsync.errors import ProtocolError
from weightsync.protocol import DTYPE_SIZES, Manifest, TensorSpec

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_SIZES}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire's name of a torch dtype; a dtype no manifest may carry is refused by name."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ProtocolError("dtype_names", f"unsupported dtype {dtype}") from None


def torch_dtype(spec: TensorSpec) -> torch.dtype:
    return DTYPES[spec.dtype]


def tensor_spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    """What a manifest says of `tensor` (its full shape: a DTensor's global one)."""
    return TensorSpec(name=name, dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape))


def tensors_manifest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Manifest:
    return Manifest(tensors=tuple(tensor_spec(name, tensor) for name, tensor in named_tensors))
