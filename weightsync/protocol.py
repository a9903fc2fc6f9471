"""Typed, validated messages of the four-phase protocol (init → start → update → finish).

Everything that crosses a process boundary is one of these pydantic models and travels as
JSON: nothing is ever pickled. Field names follow vLLM's weight-transfer HTTP API so that
trainers written for vLLM can drive a weightsync daemon unchanged.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from weightsync.errors import ProtocolError
from weightsync.limits import (
    DEFAULT_BUFFER_SIZE_BYTES, DEFAULT_NUM_BUFFERS, BufferSize, NumBuffers, Printable, StrictBufferSize,
    StrictNumBuffers,
)

DEFAULT_TIMEOUT_SECONDS = 120.0
# What `/pause?mode=` does to the generations in flight (vLLM's modes; the daemon takes the same):
# `abort` ends them, `wait` lets them finish first, `keep` freezes them until the resume.
PauseMode = Literal["abort", "wait", "keep"]
NCCL_UNIQUE_ID_BYTES = 128  # sizeof(ncclUniqueId)

# A caller's numbers and flags are what JSON says they are: "2" is no world size, true no port.
StrictCount = Annotated[int, Strict(), Field(ge=0)]
StrictFlag = Annotated[bool, Strict()]
Seconds = Annotated[float, Strict(), Field(gt=0, le=3600)]  # a JSON integer is accepted as seconds

# The dtypes a manifest may name, with their sizes in bytes; names match torch attribute names
# (as vLLM's dtype_names). Held as names: this module imports no PyTorch (the daemon validates
# large bodies in a torch-free child process; the operator builds its bodies from these models and
# has no PyTorch). weightsync.dtypes maps the names to torch's dtypes and tensors to specs.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8, "bool": 1,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One parameter of a manifest: its name, dtype and shape."""

    name: Annotated[str, Field(min_length=1, max_length=1024)]
    dtype: str
    shape: tuple[Annotated[int, Field(ge=0)], ...]

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPE_SIZES:
            raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(DTYPE_SIZES)}")
        return value

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


class Manifest(_Strict):
    """The ordered list of parameters one update carries."""

    tensors: tuple[TensorSpec, ...]

    @field_validator("tensors")
    @classmethod
    def _unique_names(cls, tensors: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        seen: set[str] = set()
        for spec in tensors:
            if spec.name in seen:
                raise ValueError(f"parameter {spec.name!r} appears twice")
            seen.add(spec.name)
        return tensors

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class InitInfo(_Strict):
    """How a party joins the transfer group (vLLM's NCCL init_info, plus packing knobs).

    The trainer is rank 0; a receiver with `world_size_local` workers takes ranks
    `rank_offset .. rank_offset + world_size_local - 1` out of `world_size`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Annotated[str, Strict(), Field(min_length=1, max_length=32), Printable] | None = None
    master_address: Annotated[str, Strict(), Field(min_length=1, max_length=253), Printable] | None = None
    master_port: Annotated[int, Strict(), Field(ge=1, le=65535)] | None = None
    rank_offset: StrictCount = 0
    world_size: Annotated[int, Strict(), Field(ge=1, le=65536)]
    # NCCL's own rendezvous: the trainer's ncclUniqueId, standard base64 (only the nccl backend).
    nccl_unique_id_b64: Annotated[str, Strict(), Field(max_length=256)] | None = None
    # vLLM 0.33's place for the packing knobs (see UpdateInfo.packed for what `packed` means).
    packed: StrictFlag = True
    packed_buffer_size_bytes: StrictBufferSize = DEFAULT_BUFFER_SIZE_BYTES
    packed_num_buffers: StrictNumBuffers = DEFAULT_NUM_BUFFERS
    # How long a collective may wait for a peer (a lost peer fails the round after this)...
    timeout_seconds: Seconds = DEFAULT_TIMEOUT_SECONDS
    # ...and how long joining may wait for every party to arrive.
    init_timeout_seconds: Seconds = DEFAULT_TIMEOUT_SECONDS
    # Trainer: checksum every round's stream; receivers verify it before committing.
    verify: StrictFlag = True
    # Receiver: land each round in a second copy and switch it in only once verified, so a failed
    # round leaves the serving weights untouched even without pausing (costs one more copy).
    atomic: StrictFlag = False
    group_name: Annotated[str, Strict(), Field(min_length=1, max_length=128), Printable] = "weightsync"
    # A sharded trainer whose every rank sends what it owns (a planned round, weightsync.planned;
    # the cpu backend): its number of ranks, which take the group's ranks 0..trainer_ranks-1, the
    # receivers the ranks after them. None: trainer rank 0 alone sends (a sharded trainer gathers).
    trainer_ranks: Annotated[int, Strict(), Field(ge=1, le=65536)] | None = None
    # The transport's own options: every choice that changes what travels or how (e.g. nccl's
    # packed/lead/control, ipc's verify). Each transport validates them with its own typed model
    # (`Transport.options_model`, see weightsync.transports.options); every party of a group must
    # join with the same values once defaults are filled in, else init fails on every party
    # naming the option and both values. Kept as plain JSON here: the core knows no transport.
    options: Annotated[dict[Annotated[str, Field(min_length=1, max_length=64)], bool | int | float | str | None],
                       Field(max_length=32)] = {}

    _always_packed = field_validator("packed")(lambda value: _require_packed(value))

    @field_validator("nccl_unique_id_b64")
    @classmethod
    def _unique_id(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            size = len(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise ValueError("is not standard base64") from None
        if size != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"decodes to {size} bytes; an NCCL unique id has {NCCL_UNIQUE_ID_BYTES}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_rendezvous(cls, data: object) -> object:
        if isinstance(data, dict) and not {"world_size", "master_address", "nccl_unique_id_b64"} & data.keys():
            # vLLM's IPC engine needs no init (its init_info is empty); weightsync's ipc receivers
            # join the trainer's rendezvous, over which every round's checksum is agreed.
            raise ValueError("world_size and master_address/master_port are required (vLLM's empty IPC "
                             "init_info is not enough: weightsync's ipc receivers join the trainer's "
                             "rendezvous to verify every round)")
        return data

    @model_validator(mode="after")
    def _rendezvous(self) -> "InitInfo":
        if self.nccl_unique_id_b64 is None and (self.master_address is None or self.master_port is None):
            raise ValueError("master_address and master_port are required (or nccl_unique_id_b64)")
        if self.rank_offset >= self.world_size:
            raise ValueError(f"rank_offset {self.rank_offset} must be below world_size {self.world_size}")
        return self


UpdateKind = Literal["dense", "sparse_flat"]


def _require_packed(value: bool) -> bool:
    """vLLM's `packed: false` asks for one broadcast per tensor; a weightsync trainer always
    sends its packed, checksummed stream, so a body that says otherwise is refused, not ignored."""
    if not value:
        raise ValueError("packed is false, but weightsync always moves weights in packed buffers "
                         "(the trainer's round header sets their size); send packed: true or leave it out")
    return value


def _require_checkpoint_format(value: bool) -> bool:
    """vLLM's `is_checkpoint_format: false` says the tensors are already in the engine's own
    layout (fused, sharded); weightsync receivers hold the checkpoint's parameters by name."""
    if not value:
        raise ValueError("is_checkpoint_format is false, but weightsync receivers take weights in "
                         "checkpoint format (the parameters as the manifest names them); send true or leave it out")
    return value


class UpdateInfo(_Strict):
    """One update batch, as vLLM's update_info: parallel lists of names, dtype names, shapes.

    All three lists empty means "take the manifest from the trainer's header" (vLLM: reuse the
    previous metadata). For `sparse_flat`, each parameter carries nnz flat indices (int64) and as
    many values of the parameter's dtype. Two spellings: weightsync's, where a parameter's
    `shapes` entry is `[nnz]`; and vLLM's, where `num_updates_list[i]` is its nnz and `shapes[i]`
    the patched parameter's own shape (checked against the receiver's weights).
    """

    update_kind: UpdateKind | None = None  # None: whatever the trainer's header says
    names: list[Annotated[str, Strict(), Field(min_length=1, max_length=1024)]] = []
    dtype_names: list[Annotated[str, Strict()]] = []
    shapes: list[list[StrictCount]] = []
    num_updates_list: list[StrictCount] | None = None
    # vLLM's knobs; only the values weightsync honours are accepted (see _require_packed). A
    # receiver checks the trainer's buffer size against packed_buffer_size_bytes. vLLM's
    # packed_num_buffers and ipc `tensor_sizes` are not fields (the trainer's round header sets
    # the buffers, `ipc_handles` every tensor's place): a body carrying them is refused.
    packed: StrictFlag = True
    packed_buffer_size_bytes: StrictBufferSize | None = None
    is_checkpoint_format: StrictFlag = True
    # Backend-specific payloads (ipc / p2p handles) travel as explicit JSON, never pickle.
    ipc_handles: list[dict[str, Any]] | dict[str, Any] | None = None

    _always_packed = field_validator("packed")(lambda value: _require_packed(value))
    _checkpoint_format = field_validator("is_checkpoint_format")(lambda value: _require_checkpoint_format(value))

    @model_validator(mode="after")
    def _parallel_lists(self) -> "UpdateInfo":
        n = len(self.names)
        if self.num_updates_list is not None:  # vLLM's sparse spelling, with vLLM's rules
            if self.update_kind != "sparse_flat":
                raise ValueError("num_updates_list is only for update_kind 'sparse_flat'")
            if not self.num_updates_list or len(self.num_updates_list) != n:
                raise ValueError(f"num_updates_list has {len(self.num_updates_list)} entries but names has {n}")
        if len(self.dtype_names) != n:
            raise ValueError(f"dtype_names has {len(self.dtype_names)} entries but names has {n}")
        if len(self.shapes) != n:
            raise ValueError(f"shapes has {len(self.shapes)} entries but names has {n}")
        for i, dtype in enumerate(self.dtype_names):
            if dtype not in DTYPE_SIZES:
                raise ValueError(f"dtype_names[{i}] is {dtype!r}; expected one of {sorted(DTYPE_SIZES)}")
        if len(set(self.names)) != n:
            raise ValueError("names contains a duplicate")
        return self

    @property
    def manifest(self) -> Manifest | None:
        """The manifest this body names, or None when it defers to the trainer's header (for a
        sparse update, each shape is the patch length [nnz], as in the trainer's header)."""
        if not self.names:
            return None
        shapes = self.shapes if self.num_updates_list is None else [[nnz] for nnz in self.num_updates_list]
        return Manifest(
            tensors=tuple(
                TensorSpec(name=n, dtype=d, shape=tuple(s))
                for n, d, s in zip(self.names, self.dtype_names, shapes, strict=True)
            )
        )

    def difference(self, sent: Manifest) -> str | None:
        """Where this body's manifest and `sent` (the trainer's) disagree, naming the first
        parameter that differs; None when they agree. Compared list by list, without building
        this body's `manifest` (100,000 specs cost about half a second to build)."""
        if len(self.names) != len(sent.tensors):
            return f"update_info names {len(self.names)} parameters; the trainer sends {len(sent.tensors)}"
        shapes = self.shapes if self.num_updates_list is None else [[nnz] for nnz in self.num_updates_list]
        for name, dtype, shape, spec in zip(self.names, self.dtype_names, shapes, sent.tensors, strict=True):
            if name != spec.name or dtype != spec.dtype or tuple(shape) != spec.shape:
                return (f"parameter {spec.name!r}: update_info says {name!r} {dtype}{list(shape)}, "
                        f"the trainer sends {spec.dtype}{list(spec.shape)}")
        return None

    @property
    def patched_shapes(self) -> dict[str, tuple[int, ...]]:
        """vLLM's sparse spelling: each patched parameter's own shape, by name (else empty)."""
        if self.num_updates_list is None:
            return {}
        return {name: tuple(shape) for name, shape in zip(self.names, self.shapes, strict=True)}


class RoundHeader(_Strict):
    """What the trainer broadcasts before any payload: the manifest and the packing plan.

    Every receiver validates it against its weight store and the group agrees before a single
    payload byte reaches any weights, so a mismatch changes nothing anywhere.
    """

    round_id: Annotated[str, Field(min_length=1, max_length=64)]
    update_kind: UpdateKind = "dense"
    manifest: Manifest  # for sparse_flat, each shape is the patch length [nnz]
    buffer_size_bytes: BufferSize
    num_buffers: NumBuffers
    alignment: Annotated[int, Field(ge=1, le=4096)]
    verify: bool = True
    # A transport's own header fields live with it, in a subclass (nccl's NcclRoundHeader); each
    # transport decodes headers with its own model, strictly (an unknown field is refused).


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: object, where: str) -> M:
    """Validate `data` as `model`; raise ProtocolError naming the offending field."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        loc = ".".join([where, *(str(p) for p in first["loc"])])
        raise ProtocolError(loc, first["msg"]) from None
