"""The checkpoint vLLM serves (the manifest check now lives in the core, `weightsync.checkpoint`,
shared with the SGLang backend; its names are re-exported here), and vLLM's fused-group key."""

from __future__ import annotations

from collections.abc import Callable

from weightsync.checkpoint import (
    MAX_HEADER_BYTES, CheckpointManifest, CheckpointTensor, model_directory, read_header,
)

__all__ = ["MAX_HEADER_BYTES", "CheckpointManifest", "CheckpointTensor", "fused_group_key", "model_directory",
           "read_header"]


def fused_group_key(packed_modules_mapping: dict[str, list[str]]) -> Callable[[str], str]:
    """The loader's group key from the model's own fusion table (vLLM's
    `packed_modules_mapping`, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}): the tensors of
    modules vLLM fuses share a key ("model.layers.0.self_attn.qkv_proj"); any other tensor's
    key is its own module, so staging holds no more than one fused parameter's inputs."""
    fused_of = {member: fused for fused, members in packed_modules_mapping.items() for member in members}

    def group_of(name: str) -> str:
        module = name.rpartition(".")[0]
        parent, _, leaf = module.rpartition(".")
        fused = fused_of.get(leaf)
        return f"{parent}.{fused}" if fused is not None else module

    return group_of
