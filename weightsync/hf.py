"""A Hugging Face transformers model as a source in its checkpoint's names and layout.

An engine (vLLM, SGLang) loads what the checkpoint holds, and the backend checks every update against the
checkpoint's names and shapes. transformers 5 lists some parameters in another layout than it
saves them: a mixture-of-experts model's experts are fused 3-D tensors
(`mlp.experts.gate_up_proj` [experts, 2 x intermediate, hidden], `mlp.experts.down_proj`) in
`named_parameters()`, while `save_pretrained` writes one tensor per expert and projection
(`mlp.experts.3.gate_proj.weight`...), through transformers' own `revert_weight_conversion`.
`CheckpointSource` applies that same conversion, one parameter at a time as the round streams
(metadata from meta tensors, so nothing is materialized up front). A model without conversions
passes through unchanged. Trainer side only: no engine import.

    trainer.push(CheckpointSource(model), version="step-7")
    trainer.push(CheckpointSource(model, names=["model.layers.0.mlp.experts.gate_up_proj",
                                                "model.layers.0.mlp.experts.down_proj"]))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from weightsync.dtypes import dtype_name
from weightsync.protocol import Manifest, TensorSpec


def _revert(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """`{checkpoint name: tensor}` for one parameter, as transformers saves it."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 lists parameters as it saves them
        return {name: tensor}
    reverted: dict[str, torch.Tensor] = revert_weight_conversion(model, {name: tensor})
    return reverted


class CheckpointSource:
    """A transformers model's parameters under their checkpoint names (a weightsync source).

    `names`: the model's parameter names to send (default: all), for a partial update;
    `dtype`: the wire dtype, each tensor cast as it is produced."""

    def __init__(self, model: torch.nn.Module, names: Iterable[str] | None = None,
                 dtype: torch.dtype | None = None):
        self.model = model
        self.dtype = dtype
        params = dict(model.named_parameters())
        wanted = list(params) if names is None else list(names)
        unknown = [name for name in wanted if name not in params]
        if unknown:
            raise ValueError(f"names: {unknown[0]!r} is not a parameter of the model")
        self.params = [(name, params[name]) for name in wanted]

    def metadata(self) -> Manifest:
        specs = []
        for name, param in self.params:
            meta = torch.empty_like(param, device="meta")
            for saved, tensor in _revert(self.model, name, meta).items():
                specs.append(TensorSpec(name=saved, dtype=dtype_name(self.dtype or tensor.dtype),
                                        shape=tuple(tensor.shape)))
        return Manifest(tensors=tuple(specs))

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self.params:
            for saved, tensor in _revert(self.model, name, param.detach()).items():
                tensor = tensor if self.dtype is None else tensor.to(self.dtype)
                yield saved, tensor.contiguous()
