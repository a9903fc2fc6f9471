"""Which of the served model's layers each checkpoint tensor loads into, learned from the model.

vLLM's layerwise reload (`vllm.model_executor.model_loader.reload`) rebuilds a layer (a module
holding parameters: `qkv_proj`, `gate_up_proj`, a mixture-of-experts layer whose experts are
stacked into `w13_weight` and `w2_weight`, a norm...) in new, uninitialised memory as soon as
any weight is loaded into it, and at the end of the reload processes it however much of it
arrived. A round that sends only part of the checkpoint tensors a layer is built from (`q_proj`
without `k_proj` and `v_proj`, one expert of a layer) therefore serves garbage. So every update
must bring, for each layer it touches, every checkpoint tensor that layer is built from; an
update that does not is refused by name before any byte moves.

Which tensors build which layer is not a table kept here: it is learned once from the model
itself, by a dry run of its own `load_weights` over the checkpoint's names with empty (meta)
tensors while every parameter's `weight_loader` only records whose parameter it was called for.
Fusion tables, stacked-expert mappings and renames are thereby the model's own.

Also here: the repair of mixture-of-experts layers after a reload (`repack_experts`). vLLM 0.32's
unquantized fused-MoE method skips its experts kernel's `process_weights_after_loading` on a
weight update; on CPU that step is the prepack into the grouped-GEMM layout, so reloaded experts
were served from unpacked values (logprobs off by up to 2.3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.dtypes import DTYPES
from weightsync.protocol import Manifest

from weightsync_vllm.checkpoint import CheckpointManifest

logger = logging.getLogger(__name__)
_SHOWN = 4  # missing names quoted in a refusal; the rest are counted


@dataclass(frozen=True)
class LoadTargets:
    """The served model's layers per checkpoint tensor, and the checkpoint tensors per layer."""

    layers_of: dict[str, tuple[str, ...]]  # checkpoint name -> layers its load writes into
    sources_of: dict[str, tuple[str, ...]]  # layer -> checkpoint names it is built from

    @classmethod
    def of_pairs(cls, pairs: Iterable[tuple[str, str]]) -> "LoadTargets":
        """From (checkpoint name, layer) pairs, as the dry run records them."""
        layers_of: dict[str, list[str]] = {}
        sources_of: dict[str, list[str]] = {}
        for name, layer in pairs:
            for table, key, value in ((layers_of, name, layer), (sources_of, layer, name)):
                values = table.setdefault(key, [])
                if value not in values:
                    values.append(value)
        return cls({k: tuple(v) for k, v in layers_of.items()}, {k: tuple(v) for k, v in sources_of.items()})

    def split(self, manifest: Manifest) -> str | None:
        """Why this update would leave a layer half loaded (naming a tensor sent, the layer and
        the tensors missing), or None when every layer it touches gets all of its tensors."""
        sent = set(manifest.names)
        for name in manifest.names:
            for layer in self.layers_of.get(name, ()):
                missing = [other for other in self.sources_of[layer] if other not in sent]
                if missing:
                    return _split_message(name, layer, missing)
        return None

    def touched(self, names: Iterable[str]) -> set[str]:
        """The layers these checkpoint tensors load into."""
        return {layer for name in names for layer in self.layers_of.get(name, ())}

    def group_key(self, fallback: Callable[[str], str]) -> Callable[[str], str]:
        """The loader's group key: the layer a tensor loads into (`fallback` for a tensor the
        dry run did not place), so that a layer's tensors, when consecutive, reach
        `load_weights` in one call and the layer is rebuilt while its staging is still held."""
        def group_of(name: str) -> str:
            layers = self.layers_of.get(name)
            return layers[0] if layers else fallback(name)

        return group_of

    def outliving(self, batch: list[tuple[str, torch.Tensor]], loaded: set[str]) -> list[tuple[str, torch.Tensor]]:
        """`batch` with a copy of each tensor whose layer is still incomplete once `loaded` (the
        names loaded in this reload, the batch's included) are in: vLLM keeps such a tensor
        until its layer is complete, beyond the staging the view points into (a layer's
        tensors not consecutive in the update). The others are handed as they are."""
        def incomplete(name: str) -> bool:
            return any(other not in loaded for layer in self.layers_of.get(name, ())
                       for other in self.sources_of[layer])

        return [(name, tensor.clone() if incomplete(name) else tensor) for name, tensor in batch]


def _split_message(name: str, layer: str, missing: list[str]) -> str:
    shown = ", ".join(repr(m) for m in missing[:_SHOWN])
    more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
    return (f"parameter {name!r} loads into vLLM's layer {layer!r}, which is also built from {shown}{more}, "
            "not in this update; vLLM rebuilds a layer from whatever of it arrives, so a partial "
            "update must bring every tensor of each layer it touches (q/k/v together, gate/up "
            "together, all experts of a mixture-of-experts layer)")


# -- learning the targets: a dry run of the model's own load_weights -----------------------------
_NO_LOADER = object()


def learn_load_targets(model: torch.nn.Module, checkpoint: CheckpointManifest,
                       load: Callable[[Iterable[tuple[str, torch.Tensor]]], object]) -> LoadTargets:
    """Run `load` (the model's `load_weights`) over every checkpoint name with meta tensors, every
    weight loader replaced by a recorder that loads nothing: the layer owning each parameter a
    name's load reaches is recorded. The model's tensors are untouched; its loaders restored."""
    owners = _tensor_owners(model)
    current: list[str] = []
    pairs: list[tuple[str, str]] = []

    def record(*args: Any, **kwargs: Any) -> bool:
        target = kwargs.get("param", args[0] if args else None)
        layer = owners.get(id(target))
        if layer is not None and current:
            pairs.append((current[-1], layer))
        return True  # loaders asked for `return_success` (the experts') report a load

    def meta_weights(names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            entry = checkpoint.tensors[name]
            current.append(name)
            yield name, torch.empty(entry.shape, dtype=DTYPES.get(entry.dtype, torch.uint8), device="meta")

    restores = [_swap_loader(tensor, record) for tensor in _loadable_tensors(model)]
    try:
        try:
            load(meta_weights(checkpoint.tensors))
        except Exception:  # noqa: BLE001 - some model code cannot take a meta tensor: one at a time
            pairs.clear()
            unlearned = [name for name in checkpoint.tensors if not _dry_load_one(load, meta_weights([name]))]
            logger.warning("weightsync: the dry run of load_weights failed for %d checkpoint tensor(s) "
                           "(e.g. %s): a partial update of their layers is not refused", len(unlearned),
                           unlearned[:3])
    finally:
        for restore in reversed(restores):
            restore()
    return LoadTargets.of_pairs(pairs)


def _dry_load_one(load: Callable[[Iterable[tuple[str, torch.Tensor]]], object],
                  weights: Iterable[tuple[str, torch.Tensor]]) -> bool:
    try:
        load(weights)
        return True
    except Exception:  # noqa: BLE001 - reported by the caller
        return False


def _loadable_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None:
                seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def _tensor_owners(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter or buffer) -> the name of the module holding it directly (the unit vLLM's
    layerwise reload rebuilds); a tensor shared by two modules (tied embeddings) counts once."""
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None:
                owners.setdefault(id(tensor), name)
    return owners


def _swap_loader(tensor: torch.Tensor, loader: Callable[..., object]) -> Callable[[], None]:
    """Set `tensor.weight_loader` to `loader`; returns how to put the previous one back. vLLM's
    parameter classes keep it behind a property (`_weight_loader`); plain ones as an attribute,
    or not at all (then the model's code falls back to its default loader)."""
    if isinstance(getattr(type(tensor), "weight_loader", None), property):
        # vLLM's parameter classes add these attributes to torch's Tensor:
        previous = tensor._weight_loader  # type: ignore[attr-defined]
        tensor._weight_loader = loader  # type: ignore[attr-defined]
        return lambda: setattr(tensor, "_weight_loader", previous)
    previous = tensor.__dict__.get("weight_loader", _NO_LOADER)
    tensor.weight_loader = loader  # type: ignore[attr-defined]  # read by vLLM's model code

    def restore() -> None:
        if previous is _NO_LOADER:
            tensor.__dict__.pop("weight_loader", None)
        else:
            tensor.weight_loader = previous  # type: ignore[attr-defined]

    return restore


# -- the repair after a reload -----------------------------------------------------------------
def repack_experts(model: torch.nn.Module, layers: set[str]) -> list[str]:
    """Finish what vLLM's unquantized fused-MoE method leaves undone on a weight update: run its
    experts kernel's `process_weights_after_loading` (on CPU, the prepack into the grouped-GEMM
    layout) on each reloaded mixture-of-experts layer, as the first load does. The repacked
    values are copied into the parameters vLLM serves from where shapes allow (their storage may
    be captured by graphs). Returns the layers repacked."""
    repacked = []
    modules = dict(model.named_modules())
    for name in sorted(layers):
        layer = modules.get(name)
        experts = _experts_kernel_left_stale(layer)
        if layer is None or experts is None:
            continue
        kept = dict(layer._parameters)
        experts.process_weights_after_loading(layer)
        _keep_storage(layer, kept)
        repacked.append(name)
    return repacked


def _experts_kernel_left_stale(layer: torch.nn.Module | None) -> Any:
    """The experts kernel whose `process_weights_after_loading` vLLM skipped on this layer's
    reload, or None: only the unquantized method skips it (once its kernel exists), and only a
    kernel that overrides the base no-op has anything to redo."""
    method = getattr(layer, "quant_method", None)
    if not any(klass.__name__ == "UnquantizedFusedMoEMethod" for klass in type(method).__mro__):
        return None  # fp8 and the other quantized methods rebuild their kernel on every call
    kernel = getattr(method, "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    if experts is None:
        return None
    base = _base_process(type(experts))
    own = type(experts).process_weights_after_loading
    return experts if base is None or own is not base else None


def _base_process(cls: type) -> object | None:
    """The no-op `process_weights_after_loading` of vLLM's experts base class, if found."""
    for klass in reversed(cls.__mro__):
        method: object | None = klass.__dict__.get("process_weights_after_loading")
        if method is not None:
            return method
    return None


def _keep_storage(layer: torch.nn.Module, kept: dict[str, torch.nn.Parameter | None]) -> None:
    """Where processing replaced a parameter by one of the same shape and dtype, copy the new
    values into the old parameter and put it back, so that its storage stays the served one."""
    for name, old in kept.items():
        new = layer._parameters.get(name)
        if old is None or new is None or new is old:
            continue
        if new.shape == old.shape and new.dtype == old.dtype and new.stride() == old.stride():
            old.data.copy_(new.data)
            layer.register_parameter(name, old)
