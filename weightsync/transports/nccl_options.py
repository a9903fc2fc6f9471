"""The nccl transport's options (init_info.options), in a module of their own: the group, the
data paths and the transport read them, and none of those may import the transport (see the
layers contract in pyproject.toml)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from weightsync.transports.collective import CollectiveOptions
from weightsync.transports.options import env_default, flag


class NcclOptions(CollectiveOptions):
    """The nccl transport's init_info.options; every party must join with the same values."""

    # Chunk sizes ramp up and down, so the GPU pipeline fills and drains in small steps.
    ramp: bool = True
    # Always pack: never broadcast tensors from where they live (a direct round; contiguous
    # tensors on the trainer's GPU are sent that way unless this is set). Default:
    # $WEIGHTSYNC_NCCL_PACKED, else false.
    packed: bool = Field(default_factory=env_default("WEIGHTSYNC_NCCL_PACKED", flag, False))
    # Move the first chunk while the group agrees on the header, into the receivers' scratch
    # memory (placed once agreed, dropped if refused), so the agreement's host round trips
    # overlap the transfer. Default: $WEIGHTSYNC_NCCL_LEAD, else true.
    lead: bool = Field(default_factory=env_default("WEIGHTSYNC_NCCL_LEAD", flag, True))
    # Where the control steps (header, agreements) travel: "store", the rendezvous TCPStore, host
    # to host (a fraction of a collective's launch and completion round trip); or "communicator",
    # as collectives (for comparison; a group formed from nccl_unique_id_b64 has no store and
    # always uses the communicator). Default: $WEIGHTSYNC_CONTROL (store, or nccl meaning
    # communicator), else store.
    control: Literal["store", "communicator"] = Field(
        default_factory=env_default("WEIGHTSYNC_CONTROL", lambda raw: _control(raw), "store"))
    # GPU programs that pack (trainer) or checksum/unpack (receiver) a chunk at once; None: one
    # program per block. Fewer than the chunk's blocks leave memory bandwidth to the broadcast
    # running beside them: on 2 x H200 a 15 GB round took 44.6 ms with 64 programs against
    # 45.7-49 ms with one program per block (and 47.9 ms with 128).
    pack_programs: Annotated[int, Field(ge=1, le=65536)] | None = 64
    # GPU programs of the trainer's checksum of a direct round, which runs beside the whole
    # transfer: this few read the set in well under the transfer's time and leave the memory
    # bandwidth to the broadcasts.
    source_sum_programs: Annotated[int, Field(ge=1, le=65536)] = 32
    # (diagnosis) A blocking NCCL communicator instead of a non-blocking one.
    blocking: bool = False


def _control(raw: str) -> Literal["store", "communicator"]:
    """$WEIGHTSYNC_CONTROL's spellings: store, communicator, or nccl (the communicator)."""
    value = {"nccl": "communicator"}.get(raw.strip().lower(), raw.strip().lower())
    if value == "store":
        return "store"
    if value == "communicator":
        return "communicator"
    raise ValueError("expected store, communicator or nccl")
