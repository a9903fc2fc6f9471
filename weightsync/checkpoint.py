"""What the served model's `load_weights` accepts: the checkpoint the engine loaded at startup.

Engine-neutral: the vLLM and SGLang backends (engines/) check every update against it.

The trainer's manifest is checked against the safetensors headers of the model directory the
server was started with (names, shapes, dtypes; only the headers are read, never the data, so
no safetensors library is needed: the header is 8 bytes of length and a JSON object).
These are exactly the Hugging Face names and full, unsharded shapes that an engine's loader
(vLLM's, SGLang's) maps, fuses and shards at startup, so an update that matches them loads the
same way.

Dtype rule: a tensor may come in the checkpoint's dtype, or (for floating-point tensors) in
the dtype the server computes in (`--dtype`); the engine casts either into its parameters exactly
as it does at startup. Anything else is refused, so a trainer never silently loses precision to,
or pays for, a conversion it did not ask for.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsync.dtypes import DTYPE_NAMES
from weightsync.protocol import Manifest

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
    def from_dir(cls, directory: str | os.PathLike[str], served_dtype: torch.dtype | None = None
                 ) -> CheckpointManifest:
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise ValueError(
                f"the served model at {directory} has no *.safetensors files; the weightsync backend "
                "checks every update against the checkpoint's headers and needs a safetensors checkpoint")
        tensors: dict[str, CheckpointTensor] = {}
        for path in files:
            for name, entry in read_header(path).items():
                code = entry["dtype"]
                tensors[name] = CheckpointTensor(_SAFETENSORS_DTYPES.get(code, code), tuple(entry["shape"]))
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
                        f"the engine's load_weights would not know it{self._split_hint(spec.name)}")
            if tuple(spec.shape) != have.shape:
                return (f"parameter {spec.name!r} has shape {list(have.shape)} in the served model's checkpoint "
                        f"but {list(spec.shape)} from the trainer")
            accepted = self.accepted_dtypes(spec.name)
            if spec.dtype not in accepted:
                return (f"parameter {spec.name!r} comes as {spec.dtype} from the trainer; the served model "
                        f"takes {' or '.join(sorted(accepted))}")
        return None

    def _split_hint(self, name: str) -> str:
        """Where the checkpoint holds per-expert tensors under a name the trainer sent fused
        (transformers 5's `mlp.experts.gate_up_proj`), say how to send them."""
        module = name.rpartition(".")[0] + "."
        example = next((have for have in self.tensors if have.startswith(module)
                        and have[len(module):].partition(".")[0].isdigit()), None)
        if example is None:
            return ""
        return (f" (the checkpoint holds it per expert, e.g. {example!r}: push "
                "weightsync.hf.CheckpointSource(model), which sends transformers' fused experts "
                "under the checkpoint's names)")


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def read_header(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """A safetensors file's header: {name: {"dtype", "shape", "data_offsets"}} (the format: an
    8-byte little-endian length, then that many bytes of JSON). Only these bytes are read."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: a safetensors header of {length} bytes is not plausible")
        header: dict[str, dict[str, Any]] = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def model_directory(model: str, revision: str | None = None) -> str:
    """The local directory of the checkpoint an engine serves: the model path itself when it is a
    directory, else the snapshot the engine downloaded into the Hugging Face cache (never a
    download)."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    return str(snapshot_download(model, revision=revision, local_files_only=True,
                                 allow_patterns=["*.safetensors", "*.json"]))
