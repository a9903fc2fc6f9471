"""A trainer's weights as a source with two channels: metadata, and iteration.

A trainer that shards its model (FSDP2: every parameter a `DTensor`) or keeps master weights in
another dtype cannot hand over a list of ready tensors without holding a second full copy of the
model. A source separates what a round needs to know up front from what it needs byte by byte:

- `metadata()`: every parameter's name, wire dtype and *full* shape, in order, without
  materializing anything (a `DTensor`'s `.shape` is already the global shape). The round header
  and the manifest the receivers check come from it.
- iteration: `(name, tensor)` pairs, one materialized tensor at a time, in metadata order
  (`full_tensor()` is a collective over the trainer's ranks, so every rank iterates in the same
  order). The payload streams from it: a streaming transport holds the chunks in flight plus
  the tensor being materialized, never the whole model.

This matches the shape of vLLM 0.32's trainer-side `WeightSource` (`metadata()` of objects with
`name`, `dtype`, `shape`; `__iter__`), so a vLLM source can be passed as it is: `metadata()`
may return a `Manifest` or any sequence of such objects (dtype as `torch.dtype` or its name).
vLLM 0.33 made `metadata` a cached property and replaced iteration by `iter_full()` (full
tensors) and `iter_local()` (this rank's shards); `adapt` presents such a source as the two
channels above (`FullPassSource`), reading `iter_full()`, so either release's sources work.

A source whose iteration disagrees with its metadata (name, order, count, dtype or shape) fails
the round with `SourceMismatch` naming the parameter (`checked_items`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, TypeGuard, TypeVar, runtime_checkable

import torch

from weightsync.dtypes import DTYPES, dtype_name, tensors_manifest
from weightsync.errors import SourceMismatch
from weightsync.protocol import Manifest, TensorSpec


class ParamMeta(Protocol):
    """One entry of a vLLM source's metadata: a parameter's name, dtype and full shape."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> torch.dtype | str: ...
    @property
    def shape(self) -> Sequence[int]: ...


@runtime_checkable
class WeightSource(Protocol):
    """What a round reads from the trainer (structural: no subclassing needed)."""

    def metadata(self) -> Manifest | Sequence[ParamMeta]:
        """Every parameter's name, dtype and full shape, in iteration order; materializes nothing."""

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """A fresh pass: one materialized (name, tensor) at a time, in metadata order."""


def _materialize(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank: a `DTensor`'s `full_tensor()` (a collective over its
    mesh), anything else as it is. Duck-typed, so the core never imports torch.distributed.tensor."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


class ModuleSource:
    """A module's `named_parameters()` as a source; sharded (`DTensor`) or not.

    `dtype`: the wire dtype, when it differs from the parameters' (fp32 master weights sent as
    bf16): each tensor is cast as it is materialized, so the cast copy exists one tensor at a time.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype | None = None):
        self.module = module
        self.dtype = dtype

    def metadata(self) -> Manifest:
        return Manifest(tensors=tuple(
            TensorSpec(name=name, dtype=dtype_name(self.dtype or p.dtype), shape=tuple(p.shape))
            for name, p in self.module.named_parameters()))

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self.module.named_parameters():
            tensor = _materialize(param.detach())
            yield name, tensor if self.dtype is None else tensor.to(self.dtype)


class TensorsSource:
    """Plain `(name, tensor)` pairs as a source (they are resident already: metadata reads them)."""

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]]):
        self.named = list(named_tensors)

    def metadata(self) -> Manifest:
        return tensors_manifest(self.named)  # a DTensor's shape is its full shape

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.named:
            yield name, _materialize(tensor.detach())


class FullPass(Protocol):
    """vLLM 0.33's source: `metadata` a property, `iter_full()` the full tensors."""

    @property
    def metadata(self) -> Sequence[ParamMeta]: ...
    def iter_full(self) -> Iterable[tuple[str, torch.Tensor]]: ...


class FullPassSource:
    """A vLLM 0.33 `WeightSource` (`metadata` a property, `iter_full()` the full tensors) as a
    weightsync source. Duck-typed, so the core never imports vLLM; a source whose `iter_full`
    skips parameters this rank does not own fails the round like any source contradicting its
    metadata (vLLM's `ParamMeta.owners`: whoever calls this must own every parameter)."""

    def __init__(self, source: FullPass):
        self.source = source

    def metadata(self) -> Sequence[ParamMeta]:
        return self.source.metadata

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.source.iter_full())


def _is_full_pass(obj: object) -> TypeGuard[FullPass]:
    """vLLM 0.33's source shape: `iter_full()` and a `metadata` that is not a method."""
    return callable(getattr(type(obj), "iter_full", None)) and hasattr(type(obj), "metadata") \
        and not callable(getattr(type(obj), "metadata", None))


_T = TypeVar("_T")


def adapt(obj: _T) -> _T | FullPassSource:
    """`obj` as weightsync reads a source: a vLLM 0.33 source wrapped in `FullPassSource`,
    anything else (a weightsync or vLLM 0.32 source, or pairs) as it is."""
    return FullPassSource(obj) if _is_full_pass(obj) else obj


def is_source(obj: object) -> TypeGuard[WeightSource]:
    """Whether `obj` has both channels (a weightsync or vLLM source), not just pairs."""
    return callable(getattr(obj, "metadata", None)) and hasattr(obj, "__iter__")


def as_source(obj: WeightSource | Iterable[tuple[str, torch.Tensor]]) -> WeightSource:
    adapted = adapt(obj)
    return adapted if is_source(adapted) else TensorsSource(adapted)


def manifest_of(source: WeightSource) -> Manifest:
    """The source's metadata as a validated manifest (ProtocolError naming the bad entry)."""
    meta = source.metadata()
    if isinstance(meta, Manifest):
        return meta
    specs = []
    for index, entry in enumerate(meta):
        dtype = entry.dtype if isinstance(entry.dtype, str) else dtype_name(entry.dtype)
        if dtype.startswith("torch."):
            dtype = dtype[len("torch."):]
        if dtype not in DTYPES:
            raise SourceMismatch(f"metadata()[{index}] ({entry.name!r}): unsupported dtype {entry.dtype}")
        specs.append(TensorSpec(name=entry.name, dtype=dtype, shape=tuple(int(n) for n in entry.shape)))
    return Manifest(tensors=tuple(specs))


def disagreement(spec: TensorSpec, name: str, tensor: torch.Tensor) -> str | None:
    """Why one item of the iteration is not what the metadata promised at its position, or None."""
    if name != spec.name:
        return (f"parameter {spec.name!r}: the source's metadata names it here but its iteration "
                f"yields {name!r} (metadata and iteration must list the same parameters in the same order)")
    try:
        got = dtype_name(tensor.dtype)
    except Exception:  # noqa: BLE001 - an unsupported dtype is a disagreement too
        got = str(tensor.dtype)
    if got != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
        return (f"parameter {spec.name!r}: the source's metadata says {spec.dtype}{list(spec.shape)} "
                f"but its iteration yields {got}{list(tensor.shape)}")
    return None


def checked_items(manifest: Manifest, items: Iterable[tuple[str, torch.Tensor]]
                  ) -> Iterator[torch.Tensor]:
    """The iteration's tensors, each checked against the manifest at its position; raises
    SourceMismatch naming the parameter at the first disagreement (name, order, dtype, shape,
    too few or too many)."""
    iterator = iter(items)
    for spec in manifest.tensors:
        item = next(iterator, None)
        if item is None:
            raise SourceMismatch(f"parameter {spec.name!r}: the source's iteration ended before it "
                                 f"(its metadata names {len(manifest.tensors)} parameters)")
        name, tensor = item
        problem = disagreement(spec, name, tensor)
        if problem is not None:
            raise SourceMismatch(problem)
        yield tensor
    extra = next(iterator, None)
    if extra is not None:
        raise SourceMismatch(f"parameter {extra[0]!r}: the source's iteration yields it beyond the "
                             f"{len(manifest.tensors)} parameters its metadata names")


def resident(source: WeightSource) -> tuple[Manifest, list[tuple[str, torch.Tensor]]]:
    """Every tensor of the source at once, checked against its metadata: for transports that
    lend the trainer's memory to receivers for the whole round (ipc, p2p), which cannot stream."""
    manifest = manifest_of(source)
    tensors = list(checked_items(manifest, source))
    return manifest, [(spec.name, t) for spec, t in zip(manifest.tensors, tensors, strict=True)]
