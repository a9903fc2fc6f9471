"""HTTP request and response bodies, shaped as vLLM's weight-transfer HTTP API.

Every field of vLLM's bodies is either honoured with vLLM's meaning or refused by name (422):
none is accepted and then ignored. See weightsync.protocol for the fields inside init_info and
update_info.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

from weightsync.limits import MAX_LABEL_LENGTH, Label
from weightsync.protocol import InitInfo, UpdateInfo, _require_checkpoint_format

# A version label is echoed by /healthz and /weight_info and parsed for the version gauge: short.
MAX_VERSION_LENGTH = MAX_LABEL_LENGTH


class ErrorBody(BaseModel):
    """Every error answer: what went wrong, and the dotted path of the field at fault (if any)."""

    detail: str
    field: str | None = None


class InitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    init_info: InitInfo


class StartRequest(BaseModel):
    """vLLM 0.32 sends is_checkpoint_format here (0.33 sends no body)."""

    model_config = ConfigDict(extra="forbid")
    is_checkpoint_format: Annotated[bool, Strict()] = True

    _checkpoint_format = field_validator("is_checkpoint_format")(lambda value: _require_checkpoint_format(value))


class UpdateRequest(BaseModel):
    """One update batch. A list is indexed by global worker rank (vLLM: dp_rank x workers per
    engine + the worker's rank): this daemon is one worker, its entry is rank_offset - 1 (rank 0
    is the trainer's); a one-entry list is taken as this engine's own."""

    model_config = ConfigDict(extra="forbid")
    update_info: UpdateInfo | list[UpdateInfo] = Field(default_factory=UpdateInfo)


class FinishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight_version: Label | None = Field(
        default=None, description=f"label of the weights now live: 1 to {MAX_VERSION_LENGTH} printable "
                                  "characters; an integer is taken as its decimal label")

    @field_validator("weight_version", mode="before")
    @classmethod
    def _number_as_label(cls, value: object) -> object:
        # The one conversion: a JSON integer becomes its decimal text, then obeys the label's
        # rules (length, printable). The bound is checked first: str() of a huge int is slow.
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 10 ** MAX_VERSION_LENGTH:
                raise ValueError(f"is longer than {MAX_VERSION_LENGTH} characters")
            return str(value)
        return value


class WeightCheckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["checksum", "compare"] = "checksum"
    baseline: dict[str, str] | None = None


class Message(BaseModel):
    message: str


class StartResult(BaseModel):
    message: str
    # Only with `?pause=<mode>` (weightsync's extension): the engine was paused before the start.
    paused: bool | None = None


class UpdateResult(BaseModel):
    message: str
    round_id: str
    bytes: int
    seconds: float
    num_tensors: int
    in_place: bool = False
    checksum: str | None = None
    # ipc/p2p trainers: the handles every receiver's /update_weights needs, and whether the
    # round continues in another batch (the coordinator relays both).
    update_info: dict | None = None
    more: bool = False


class FinishResult(BaseModel):
    message: str
    weight_version: str | None
    # Only with `?resume=true` (weightsync's extension): whether the engine serves again. The
    # round is finished either way; a failed resume says why here.
    resumed: bool | None = None
    resume_error: str | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    role: str
    backend: str
    phase: str
    weight_version: str | None
    paused: bool
    weights_intact: bool
    last_failure: str | None
    num_parameters: int


class PauseStatus(BaseModel):
    status: Literal["paused", "resumed"]


class IsPaused(BaseModel):
    is_paused: bool


class WorldSize(BaseModel):
    world_size: int


class WeightInfo(BaseModel):
    weight_version: str | None


class Checksums(BaseModel):
    """/weight_checker's answer: `checksum` action."""

    checksums: dict[str, str]
    checksum: str
    weight_version: str | None


class Comparison(BaseModel):
    """/weight_checker's answer: `compare` action."""

    matches: bool
    mismatched: list[str]
