"""The receiver's live weights: named tensors plus the version they hold.

A store either owns its tensors (a standalone daemon, shaped from a manifest, laid out in one
contiguous allocation so a transport can receive straight into it) or wraps the parameters of a
torch module that an inference process hands it, so received bytes land in the serving model.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import ItemsView, Iterable

import torch

from weightsync.dtypes import tensors_manifest, tensor_spec, torch_dtype
from weightsync.layout import DEFAULT_ALIGNMENT, Layout
from weightsync.packing import as_bytes
from weightsync.protocol import Manifest


class WeightStore:
    def __init__(self, tensors: dict[str, torch.Tensor], flat: torch.Tensor | None = None,
                 layout: Layout | None = None):
        self._tensors = tensors
        self._flat = flat
        self._layout = layout
        self.version: str | None = None
        self.lock = threading.RLock()
        self._adopt = False

    # -- construction -------------------------------------------------------------------
    @classmethod
    def empty(cls, shape_from_first_update: bool = True) -> "WeightStore":
        """A store with no weights yet; by default the first dense update shapes it."""
        store = cls({})
        store._adopt = shape_from_first_update
        return store

    def adopt(self, manifest: Manifest, device: torch.device) -> bool:
        """Shape an empty, adoptable store from a round's manifest; True if it did."""
        if self._tensors or not self._adopt:
            return False
        shaped = WeightStore.from_manifest(manifest, device)
        self._tensors, self._flat, self._layout = shaped._tensors, shaped._flat, shaped._layout
        self._adopt = False
        return True

    @classmethod
    def from_manifest(cls, manifest: Manifest, device: torch.device | str = "cpu",
                      alignment: int = DEFAULT_ALIGNMENT) -> "WeightStore":
        """Allocate every tensor of the manifest in one zeroed, contiguous, aligned buffer."""
        layout = Layout.of_manifest(manifest, alignment)
        flat = torch.zeros(layout.total_bytes, dtype=torch.uint8, device=device)
        tensors = {
            spec.name: flat[off : off + spec.nbytes].view(torch_dtype(spec)).view(spec.shape)
            for spec, off in zip(manifest.tensors, layout.offsets, strict=True)
        }
        return cls(tensors, flat, layout)

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "WeightStore":
        """Wrap a module's parameters in place: received weights land in the serving model."""
        return cls({name: p.data for name, p in module.named_parameters()})

    @classmethod
    def from_tensors(cls, named: Iterable[tuple[str, torch.Tensor]]) -> "WeightStore":
        return cls(dict(named))

    # -- inspection -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def items(self) -> ItemsView[str, torch.Tensor]:
        return self._tensors.items()

    @property
    def manifest(self) -> Manifest:
        return tensors_manifest(list(self._tensors.items()))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    @property
    def device(self) -> torch.device:
        first = next(iter(self._tensors.values()), None)
        return first.device if first is not None else torch.device("cpu")

    def mismatch(self, manifest: Manifest) -> str | None:
        """Why `manifest` cannot be written into this store (naming the parameter), or None.

        A manifest may name any subset of the store's parameters (an update in batches).
        """
        for spec in manifest.tensors:
            tensor = self._tensors.get(spec.name)
            if tensor is None:
                return f"parameter {spec.name!r} is not in the receiver's weights"
            have = tensor_spec(spec.name, tensor)
            if have.dtype != spec.dtype:
                return f"parameter {spec.name!r} has dtype {have.dtype} here but {spec.dtype} from the trainer"
            if have.shape != spec.shape:
                return (f"parameter {spec.name!r} has shape {list(have.shape)} here "
                        f"but {list(spec.shape)} from the trainer")
        return None

    def destinations(self, manifest: Manifest) -> list[torch.Tensor]:
        """Flat uint8 views of the store's tensors, in manifest order, to write into."""
        views = []
        for spec in manifest.tensors:
            tensor = self._tensors[spec.name]
            if not tensor.is_contiguous():
                raise ValueError(f"parameter {spec.name!r} is not contiguous; cannot receive in place")
            views.append(tensor.reshape(-1).view(torch.uint8))
        return views

    def contiguous_target(self, manifest: Manifest, layout: Layout) -> torch.Tensor | None:
        """The store's flat buffer when it is laid out exactly as the round's stream, else None.

        Then a transport may receive each chunk straight into place, with no unpack copy.
        """
        if self._flat is None or self._layout is None:
            return None
        if manifest.names != list(self._tensors) or layout.offsets != self._layout.offsets:
            return None
        return self._flat

    def checksums(self) -> dict[str, str]:
        """SHA-256 of each parameter's bytes, for bit-exact comparison across processes."""
        with self.lock:
            return {name: tensor_digest(t) for name, t in self._tensors.items()}

    def checksum(self) -> str:
        """One SHA-256 over every parameter, in name order."""
        return combine_digests(self.checksums())


def tensor_digest(tensor: torch.Tensor) -> str:
    data = as_bytes(tensor).cpu()
    return hashlib.sha256(data.numpy().data).hexdigest()


def combine_digests(digests: dict[str, str]) -> str:
    total = hashlib.sha256()
    for name in sorted(digests):
        total.update(name.encode())
        total.update(bytes.fromhex(digests[name]))
    return total.hexdigest()


def named_checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The checksum a store holding exactly these tensors would report."""
    return combine_digests({name: tensor_digest(t) for name, t in named})
