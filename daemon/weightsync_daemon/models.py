"""HTTP request and response bodies, shaped as vLLM's weight-transfer HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from weightsync.protocol import InitInfo, UpdateInfo


class InitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    init_info: InitInfo


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    is_checkpoint_format: bool = True


class UpdateRequest(BaseModel):
    """One update batch; a list is indexed by the engine's worker rank (one worker here)."""

    model_config = ConfigDict(extra="forbid")
    update_info: UpdateInfo | list[UpdateInfo] = Field(default_factory=UpdateInfo)


class FinishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight_version: str | int | None = Field(default=None, description="label of the weights now live")


class WeightCheckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["checksum", "compare"] = "checksum"
    baseline: dict[str, str] | None = None


class Message(BaseModel):
    message: str


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
