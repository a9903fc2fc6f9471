"""CUDA IPC handles as validated JSON: what the ipc and p2p transports put in `update_info`.

A trainer lends its GPU memory to receivers on the same host: for every CUDA storage that holds a
tensor of the round it exports the raw `cudaIpcMemHandle` of the allocation (plus torch's
reference-count slot and ready-event), and for every tensor where in which storage it sits.
Nothing is pickled: the handle bytes travel base64-encoded inside explicit, size-checked fields,
validated by the pydantic models below before anything is opened.

`update_info.ipc_handles` maps the physical GPU UUID of each trainer GPU to that GPU's
`GpuHandles`; a trainer with several GPUs may put each GPU's there, and every receiver picks
its own. The trainer's device index means nothing in the receiver's process:
`rebind_device` is the one place where it is replaced by the receiver's own index.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from weightsync.errors import ProtocolError
from weightsync.protocol import parse

FORMAT: Literal["weightsync-ipc/1"] = "weightsync-ipc/1"
MAX_HANDLE_BYTES = 1024  # a cudaIpcMemHandle is 64 bytes; torch may prefix a few more
NonNegative = Annotated[int, Field(ge=0)]


def _b64(value: str, what: str, max_bytes: int = MAX_HANDLE_BYTES) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not standard base64") from None
    if len(raw) > max_bytes:
        raise ValueError(f"{what} has {len(raw)} bytes, more than {max_bytes}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageHandle(_Strict):
    """One exported CUDA storage: enough for `torch.UntypedStorage._new_shared_cuda`."""

    handle: str  # base64 of the allocation's IPC handle
    size_bytes: NonNegative
    offset_bytes: NonNegative  # where the storage starts inside the allocation
    ref_counter_handle: str  # base64 of torch's shared reference-counter file name
    ref_counter_offset: NonNegative
    event_handle: str | None = None  # base64 of the IPC event recorded when it was exported
    event_sync_required: bool = False

    @field_validator("handle", "ref_counter_handle", "event_handle")
    @classmethod
    def _base64(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _b64(value, str(info.field_name))

    def open_args(self, device_index: int) -> tuple[int, bytes, int, int, bytes, int, bytes, bool]:
        return (device_index, base64.b64decode(self.handle), self.size_bytes, self.offset_bytes,
                base64.b64decode(self.ref_counter_handle), self.ref_counter_offset,
                base64.b64decode(self.event_handle) if self.event_handle else b"", self.event_sync_required)


class Placement(_Strict):
    """Bytes [offset, offset + nbytes) of storage number `storage`."""

    storage: NonNegative
    offset: NonNegative
    nbytes: NonNegative


class GpuHandles(_Strict):
    """One trainer GPU's share of a round: its storages, and where each stream tensor sits."""

    format: Literal["weightsync-ipc/1"] = FORMAT
    round_id: Annotated[str, Field(min_length=1, max_length=64)]
    device: NonNegative  # the trainer's device index, meaningful only in the trainer's process
    storages: list[StorageHandle]
    # Parallel to the manifest (sparse: indices then values of each patch).
    tensors: list[Placement]
    verify: bool = True  # the trainer publishes its checksum of the round under `round_id`
    # That checksum covers `integrity.sample_ranges` of the stream, not every byte (see ipc.py).
    sampled: bool = False
    more: bool = False  # another batch of this round follows
    # A digest of `device`, `storages` and `tensors`: a receiver that validated and opened handles
    # under this key before reuses them without comparing the whole body again.
    key: Annotated[str, Field(max_length=128)] | None = None

    @model_validator(mode="after")
    def _inside_storages(self) -> "GpuHandles":
        for i, placement in enumerate(self.tensors):
            if placement.storage >= len(self.storages):
                raise ValueError(f"tensors[{i}] names storage {placement.storage} of {len(self.storages)}")
            if placement.offset + placement.nbytes > self.storages[placement.storage].size_bytes:
                raise ValueError(f"tensors[{i}] reaches past the end of its storage")
        return self


def content_key(device: int, storages: list[StorageHandle], tensors: list[Placement]) -> str:
    """The `key` of a GpuHandles body: a hash of everything but the round's own fields."""
    body = json.dumps({"device": device, "storages": [s.model_dump(mode="json") for s in storages],
                       "tensors": [t.model_dump(mode="json") for t in tensors]}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def parse_handles(ipc_handles: object) -> dict[str, GpuHandles]:
    """Validate `update_info.ipc_handles`: {gpu_uuid: GpuHandles}; errors name the field."""
    if not isinstance(ipc_handles, dict) or not ipc_handles:
        raise ProtocolError("update_info.ipc_handles", "expected an object mapping GPU UUIDs to handles")
    out = {}
    for uuid, value in ipc_handles.items():
        if not isinstance(uuid, str) or not 0 < len(uuid) <= 128:
            raise ProtocolError("update_info.ipc_handles", f"{uuid!r} is not a GPU UUID")
        out[uuid] = parse(GpuHandles, value, f"update_info.ipc_handles.{uuid}")
    return out


# -- GPUs by physical identity --------------------------------------------------------------
def gpu_uuid(index: int) -> str:
    """The physical UUID of local CUDA device `index` (stable across processes and
    CUDA_VISIBLE_DEVICES orderings)."""
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device_index(uuid: str) -> int | None:
    """This process's index of the GPU with that UUID, or None if it cannot see it."""
    for index in range(torch.cuda.device_count()):
        if gpu_uuid(index) == uuid:
            return index
    return None


def rebind_device(handles: GpuHandles, local_index: int) -> GpuHandles:
    """The one place a trainer's device index becomes the receiver's: every storage of
    `handles` is then opened into device `local_index` of this process."""
    return handles.model_copy(update={"device": local_index})


# -- export and open --------------------------------------------------------------------------
def export_storage(storage: torch.UntypedStorage) -> StorageHandle:
    """Share one CUDA storage (torch records a ready-event and a reference-count slot for it)."""
    (_device, handle, size_bytes, offset_bytes, ref_counter_handle, ref_counter_offset,
     event_handle, _event_sync_required) = storage._share_cuda_()

    def encode(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return StorageHandle(handle=encode(handle), size_bytes=size_bytes, offset_bytes=offset_bytes,
                         ref_counter_handle=encode(ref_counter_handle), ref_counter_offset=ref_counter_offset,
                         event_handle=encode(event_handle) if event_handle else None,
                         # The trainer synchronizes its stream before it lends anything, so receivers
                         # need not wait on torch's ready-event (nor open it, on another GPU).
                         event_sync_required=False)


def open_storage(handle: StorageHandle, device_index: int) -> torch.Tensor:
    """Map an exported storage into this process on device `device_index`: a flat uint8 tensor
    over the trainer's memory (valid while it is referenced)."""
    storage = torch.UntypedStorage._new_shared_cuda(*handle.open_args(device_index))
    flat = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", device_index))
    flat.set_(storage, 0, (storage.nbytes(),), (1,))
    return flat
