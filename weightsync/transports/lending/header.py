"""A lent round's header: the trainer's update_info (names, dtypes, shapes and the CUDA IPC
handles of `cuda_ipc`), written by the trainer and read by every receiver.

Both ends cache, because a repeat round is meant to cost only its copy: the trainer exports each
storage once and rebuilds the body only when a storage or a placement changed; a receiver
validates a body once and reuses it while it stays the same (the round's own flags aside).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from weightsync.dtypes import tensor_spec
from weightsync.errors import ProtocolError, TransferError
from weightsync.layout import DEFAULT_ALIGNMENT
from weightsync.protocol import Manifest, TensorSpec, UpdateInfo
from weightsync.transports.cuda_ipc import (
    GpuHandles, Placement, StorageHandle, content_key, export_storage, gpu_uuid, parse_handles, rebind_device,
)

MAX_CACHED_SPECS = 100_000


@dataclass(frozen=True)
class RoundFlags:
    """The entries of a GPU's handles that change from round to round (the rest is cached)."""

    round_id: str
    more: bool  # another batch of this round follows
    verify: bool  # the trainer publishes its checksum under round_id
    sampled: bool  # ... of a sample of the stream (checksums.Coverage.SAMPLE)

    @classmethod
    def of(cls, handles: GpuHandles) -> "RoundFlags":
        return cls(handles.round_id, handles.more, handles.verify, handles.sampled)

    def as_json(self) -> dict[str, Any]:
        return {"round_id": self.round_id, "more": self.more, "verify": self.verify, "sampled": self.sampled}


@dataclass(frozen=True)
class LentPlacement:
    """Where one lent view sits: the export record of its storage, and its bytes in it."""

    handle: StorageHandle
    offset: int
    nbytes: int


@dataclass(frozen=True)
class _Export:
    storage: StorageWeakRef  # tells when the storage is gone (its record then is stale)
    handle: StorageHandle


@dataclass(frozen=True)
class _Body:
    key: tuple[Any, ...]  # kind, specs and every placement: what the body was built from
    body: dict[str, Any]  # update_info, but for the round's flags


class HandleExporter:
    """Trainer side of the header: export each lent storage once (reused while the storage
    lives) and build the round's update_info, rebuilding its body only when a storage or a
    placement changed, so that a receiver recognizes handles it already opened."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._exports: dict[tuple[int, int], _Export] = {}
        self._anchor: torch.Tensor | None = None  # a storage to name for empty tensors
        self._specs: dict[tuple[Any, ...], TensorSpec] = {}
        self._body: _Body | None = None

    def spec(self, name: str, tensor: torch.Tensor) -> TensorSpec:
        """The manifest entry of `tensor` (cached: the same parameters come every round)."""
        key = (name, tensor.dtype, tuple(tensor.shape))
        spec = self._specs.get(key)
        if spec is None:
            if len(self._specs) > MAX_CACHED_SPECS:
                self._specs.clear()
            spec = self._specs[key] = tensor_spec(name, tensor)
        return spec

    def _export(self, view: torch.Tensor) -> LentPlacement:
        """The (cached) export record of the storage under `view`, and the view's placement."""
        if view.numel() == 0:  # nothing to read, but a placement needs some storage to name
            if self._anchor is None:
                self._anchor = torch.zeros(DEFAULT_ALIGNMENT, dtype=torch.uint8, device=self._device)
            view = self._anchor[:0]
        storage = view.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        cached = self._exports.get(key)
        if cached is None or cached.storage.expired():
            cached = _Export(StorageWeakRef(storage), export_storage(storage))
            self._exports[key] = cached
        return LentPlacement(cached.handle, view.data_ptr() - storage.data_ptr(), view.numel())

    def update_info(self, kind: str, specs: list[TensorSpec], views: list[torch.Tensor], flags: RoundFlags
                    ) -> dict[str, Any]:
        """update_info for these views: names, dtypes, shapes and this GPU's handles."""
        records = [self._export(v) for v in views]
        key = (kind, tuple(specs), tuple((r.handle.handle, r.handle.offset_bytes, r.offset, r.nbytes)
                                         for r in records))
        if self._body is None or self._body.key != key:
            storages: list[StorageHandle] = []
            index: dict[int, int] = {}
            placements = []
            for record in records:
                if id(record.handle) not in index:
                    index[id(record.handle)] = len(storages)
                    storages.append(record.handle)
                placements.append(Placement(storage=index[id(record.handle)], offset=record.offset,
                                            nbytes=record.nbytes))
            device = self._device.index
            gpu = GpuHandles(round_id=flags.round_id, device=device, storages=storages, tensors=placements,
                             key=content_key(device, storages, placements))
            body = {"update_kind": kind, "names": [s.name for s in specs],
                    "dtype_names": [s.dtype for s in specs], "shapes": [list(s.shape) for s in specs],
                    "ipc_handles": {gpu_uuid(device): gpu.model_dump(mode="json")}}
            self._body = _Body(key, body)
        return self.compose(self._body.body, flags)

    @property
    def body(self) -> dict[str, Any]:
        """The body of the last update_info (what a repeat of that round sends again)."""
        if self._body is None:
            raise TransferError("no round was lent yet: nothing to repeat")
        return self._body.body

    @staticmethod
    def compose(body: dict[str, Any], flags: RoundFlags) -> dict[str, Any]:
        """A body with this round's flags."""
        ((uuid_, gpu),) = body["ipc_handles"].items()
        return {**body, "ipc_handles": {uuid_: {**gpu, **flags.as_json()}}}

    def close(self) -> None:
        self._exports.clear()


@dataclass(frozen=True)
class _Parsed:
    raw: dict[str, Any]  # the entry as it came, with the validated flags
    handles: GpuHandles


class HandleReader:
    """Receiver side of the header: this receiver's entry of update_info.ipc_handles, validated,
    rebound to its device; a body it validated before (the trainer's content key, or the same
    JSON) is not validated again. `version` changes whenever the entry (its flags aside) does."""

    def __init__(self, transport: str, device: torch.device) -> None:
        self._transport = transport
        self._device = device
        self._parsed: _Parsed | None = None
        self.version = 0

    def read(self, ipc_handles: object, choose_gpu: Callable[[list[str]], str]) -> GpuHandles:
        """`choose_gpu`: which of the trainer's GPUs (by UUID) this receiver reads from."""
        if not isinstance(ipc_handles, dict) or not ipc_handles:
            raise ProtocolError("update_info.ipc_handles",
                                f"the {self._transport} transport needs the trainer's handles "
                                "(the coordinator passes the trainer's update_info)")
        uuid_ = choose_gpu(list(ipc_handles))
        raw = ipc_handles[uuid_]
        if isinstance(raw, dict) and self._parsed is not None:
            cached = self._parsed
            flags = {"round_id": raw.get("round_id"), "more": raw.get("more", False),
                     "verify": raw.get("verify", True), "sampled": raw.get("sampled", False)}
            rid = flags["round_id"]
            if isinstance(rid, str) and 0 < len(rid) <= 64 and \
                    all(isinstance(flags[name], bool) for name in ("more", "verify", "sampled")):
                # The trainer's content key names exactly what was validated and opened before (a
                # body that claims it but differs gets those same validated handles, nothing else).
                same = (cached.handles.key is not None and raw.get("key") == cached.handles.key) or \
                    {**raw, **RoundFlags.of(cached.handles).as_json()} == cached.raw
                if same:
                    return cached.handles.model_copy(update=flags)
        handles = rebind_device(parse_handles({uuid_: raw})[uuid_], self._device.index)
        self.version += 1
        self._parsed = _Parsed({**raw, **RoundFlags.of(handles).as_json()}, handles)
        return handles


@dataclass(frozen=True)
class _Named:
    key: tuple[Any, ...]  # names, dtypes and shapes as they came
    manifest: Manifest


class ManifestReader:
    """Receiver side: the round's manifest from update_info, built once while names, dtypes and
    shapes stay the same; `version` changes whenever they do."""

    def __init__(self, transport: str) -> None:
        self._transport = transport
        self._named: _Named | None = None
        self.version = 0

    def read(self, info: UpdateInfo) -> Manifest:
        key = (info.names, info.dtype_names, info.shapes)
        if self._named is not None and self._named.key == key:
            return self._named.manifest
        manifest = info.manifest
        if manifest is None:
            raise ProtocolError("update_info.names",
                                f"the {self._transport} transport needs the manifest with the handles")
        self.version += 1
        self._named = _Named(key, manifest)
        return manifest
