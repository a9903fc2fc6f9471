"""What the served model's `load_weights` accepts: the checkpoint vLLM loaded at startup.

The trainer's manifest is checked against the safetensors headers of the model directory the
server was started with (names, shapes, dtypes; only the headers are read, never the data).
These are exactly the Hugging Face names and full, unsharded shapes that vLLM's loader maps,
fuses and shards at startup, so an update that matches them loads the same way.

Dtype rule: a tensor may come in the checkpoint's dtype, or (for floating-point tensors) in
the dtype the server computes in (`--dtype`); vLLM casts either into its parameters exactly as
it does at startup. Anything else is refused, so a trainer never silently loses precision to,
or pays for, a conversion it did not ask for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from weightsync.protocol import DTYPE_NAMES, Manifest

# safetensors' dtype codes → weightsync's dtype names (torch attribute names).
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
_FLOATING = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}


@dataclass(frozen=True)
class CheckpointTensor:
    dtype: str
    shape: tuple[int, ...]


class CheckpointManifest:
    """The tensors of a safetensors checkpoint, and the check of a trainer's manifest against them."""

    def __init__(self, tensors: dict[str, CheckpointTensor], served_dtype: str | None, source: str):
        self.tensors = tensors
        self.served_dtype = served_dtype
        self.source = source

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, served_dtype: torch.dtype | None = None) -> "CheckpointManifest":
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise ValueError(
                f"the served model at {directory} has no *.safetensors files; the weightsync backend "
                "checks every update against the checkpoint's headers and needs a safetensors checkpoint")
        tensors: dict[str, CheckpointTensor] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    code = piece.get_dtype()
                    tensors[name] = CheckpointTensor(_SAFETENSORS_DTYPES.get(code, code), tuple(piece.get_shape()))
        served = DTYPE_NAMES.get(served_dtype) if served_dtype is not None else None
        return cls(tensors, served, str(directory))

    def accepted_dtypes(self, name: str) -> set[str]:
        have = self.tensors[name].dtype
        if have in _FLOATING and self.served_dtype is not None:
            return {have, self.served_dtype}
        return {have}

    def mismatch(self, manifest: Manifest) -> str | None:
        """Why the served model cannot load `manifest` (naming the first offending tensor), or None."""
        for spec in manifest.tensors:
            have = self.tensors.get(spec.name)
            if have is None:
                return (f"parameter {spec.name!r} is not in the served model's checkpoint ({self.source}); "
                        "vLLM's load_weights would not know it")
            if tuple(spec.shape) != have.shape:
                return (f"parameter {spec.name!r} has shape {list(have.shape)} in the served model's checkpoint "
                        f"but {list(spec.shape)} from the trainer")
            accepted = self.accepted_dtypes(spec.name)
            if spec.dtype not in accepted:
                return (f"parameter {spec.name!r} comes as {spec.dtype} from the trainer; the served model "
                        f"takes {' or '.join(sorted(accepted))}")
        return None


def model_directory(model: str, revision: str | None = None) -> str:
    """The local directory of the checkpoint vLLM serves: `--model` itself when it is a
    directory, else the snapshot vLLM downloaded into the Hugging Face cache (never a download)."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(model, revision=revision, local_files_only=True,
                             allow_patterns=["*.safetensors", "*.json"])
