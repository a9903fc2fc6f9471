"""The WeightSync custom resource as typed models: the single source of the CRD's schema.

`crds/weightsync.dev_weightsyncs.yaml` is generated from these models (`python -m
weightsync_operator.crd`), and a test checks that the committed file still matches, so the code
and the cluster's view of the resource cannot drift apart. Field names are Kubernetes-style
camelCase on the wire and snake_case in Python.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from weightsync.limits import MAX_BUFFER_SIZE_BYTES, MAX_NUM_BUFFERS, MIN_BUFFER_SIZE_BYTES
from weightsync.protocol import PauseMode

GROUP = "weightsync.dev"
VERSION = "v1alpha1"
KIND = "WeightSync"
PLURAL = "weightsyncs"
SINGULAR = "weightsync"
SHORT_NAMES = ("wsync",)
API_VERSION = f"{GROUP}/{VERSION}"

Backend = Literal["nccl", "p2p", "ipc", "cpu"]
# The wire's pause modes, or `none`: the targets keep serving through a round (daemons only).
PauseSetting = Literal[PauseMode, "none"]
Phase = Literal["Pending", "Initializing", "Ready", "Syncing", "Succeeded", "Failed"]
TargetState = Literal["Joining", "Synced", "Stale", "Failed", "Unreachable"]
Outcome = Literal["Succeeded", "Failed"]
ConditionType = Literal["Ready", "Progressing", "Degraded"]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=86400)]


class _Model(BaseModel):
    # Strict, as the API server's schema is: "3" is not an integer, 1 is not a boolean.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True)

    def to_k8s(self) -> dict:
        """The JSON shape the API server stores: camelCase keys, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# -- spec ------------------------------------------------------------------------------------
class LabelSelectorRequirement(_Model):
    key: Annotated[str, Field(min_length=1, max_length=317)]
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[Annotated[str, Field(max_length=63)]] = []

    @model_validator(mode="after")
    def _values_fit_operator(self) -> "LabelSelectorRequirement":
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class LabelSelector(_Model):
    """A metav1.LabelSelector; it must say something, so it never selects every pod."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] | None = None
    match_expressions: list[LabelSelectorRequirement] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> "LabelSelector":
        if not self.match_labels and not self.match_expressions:
            raise ValueError("a selector needs matchLabels or matchExpressions")
        return self


class StepTimeouts(_Model):
    """Seconds each step of the protocol may take before the round is declared failed."""

    request_seconds: Seconds = Field(10.0, description="Small calls: world size, health, pause, resume, abort.")
    init_seconds: Seconds = Field(120.0, description="Joining the transfer group.")
    start_seconds: Seconds = Field(30.0, description="Starting a round.")
    update_seconds: Seconds = Field(600.0, description="Moving the weights (the data plane).")
    finish_seconds: Seconds = Field(30.0, description="Making the new version live.")
    transfer_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        60.0, description="How long a collective waits for a peer; keep it below updateSeconds so "
                          "parties report their own failure first.")


class FailurePolicy(_Model):
    """How many targets may fail a round without failing it for the others."""

    max_failed: Annotated[int, Field(ge=0, le=4096)] = Field(
        0, description="Targets that may be lost (dead or hung) in a round while the round still goes live on the "
                       "others: the group is formed again without them and the version sent again, within the "
                       "round's deadlines; they are marked Stale (a readiness gate keeps them out of their "
                       "Service) and catch up once back. 0 (strict): a round fails for every target as soon as one "
                       "fails.")


class RolloutStrategy(_Model):
    """How a new version reaches the targets: all at once, or a wave at a time."""

    type: Literal["AllAtOnce", "Waves"] = Field(
        "AllAtOnce", description="AllAtOnce: every target is paused and updated in one round (on-policy RL: "
                                 "no request is served by an old version once the push returns). Waves: at "
                                 "most maxUnavailable targets are paused and updated at a time, later waves "
                                 "catching up from already updated peers where one can send (a daemon), so "
                                 "serving capacity never drops below the rest (asynchronous RL, which "
                                 "tolerates a few requests on the previous version).")
    max_unavailable: Annotated[int, Field(ge=1, le=4096)] | Annotated[
        str, Field(pattern=r"^([1-9][0-9]?|100)%$")] = Field(
        1, description="Waves: targets paused at once, a count or a percentage of the targets (rounded down, at "
                       "least one).")

    def wave_size(self, targets: int) -> int:
        """Targets per wave among `targets` (AllAtOnce: all of them)."""
        if self.type == "AllAtOnce":
            return targets
        if isinstance(self.max_unavailable, str):
            return max(1, targets * int(self.max_unavailable[:-1]) // 100)
        return min(targets, self.max_unavailable)


class WeightSyncSpec(_Model):
    """What the user declares: who sends, who receives, how, and which version should be live."""

    backend: Backend = Field("nccl", description="Transport: nccl, p2p or ipc on GPUs, cpu (gloo) anywhere.")
    trainer_selector: LabelSelector = Field(
        description="Selects the one trainer pod (it runs weightsync_operator.trainer_client.connect and hosts the "
                    "rendezvous).")
    target_selector: LabelSelector = Field(
        description="Selects the inference pods that receive every version: weightsync daemons, or vLLM "
                    "servers with the weightsync backend where the pod carries the annotation "
                    "weightsync.dev/engine: vllm (driven through vLLM's own routes, one rank per vLLM "
                    "worker; pauseMode none is refused for them). Both kinds may be selected together.")
    daemon_port: Port = Field(
        8200, description="Port of each pod's weightsync HTTP API, unless the pod's "
                          "weightsync.dev/daemon-port annotation or a container port named "
                          "'weightsync' says otherwise.")
    rendezvous_port: Port = Field(
        29500, description="Port of the transfer group's rendezvous on the trainer pod (and on a "
                           "peer that seeds a late joiner), unless the pod's "
                           "weightsync.dev/rendezvous-port annotation says otherwise.")
    packed_buffer_size_bytes: Annotated[int, Field(ge=MIN_BUFFER_SIZE_BYTES, le=MAX_BUFFER_SIZE_BYTES)] = Field(
        1 << 30, description="Bytes per packed transfer buffer.")
    packed_num_buffers: Annotated[int, Field(ge=1, le=MAX_NUM_BUFFERS)] = Field(
        2, description="Packed buffers in flight at once.")
    version: Annotated[int, Field(ge=0)] = Field(
        0, description="The weight version that should be live on every target; the trainer bumps "
                       "it to publish (0: nothing published yet).")
    pause_mode: PauseSetting = Field(
        "keep", description="How targets pause generation during a sync: abort, wait, keep (hold "
                            "requests) or none (no pause; not for vLLM targets).")
    timeouts: StepTimeouts = Field(default_factory=StepTimeouts, json_schema_extra={"default": {}})
    verify: bool = Field(
        True, description="Checksum every round's byte stream; each target verifies it before the new "
                          "version goes live, and the round fails on any difference.")
    atomic: bool = Field(
        False, description="Targets receive into a second copy of their weights and switch to it only "
                           "once the round verified, so a failed round leaves them untouched (and able to "
                           "seed late joiners); costs one more copy of the weights per target.")
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, json_schema_extra={"default": {}})
    strategy: RolloutStrategy = Field(default_factory=RolloutStrategy, json_schema_extra={"default": {}})

    @model_validator(mode="after")
    def _transfer_below_update(self) -> "WeightSyncSpec":
        if self.timeouts.transfer_seconds >= self.timeouts.update_seconds:
            raise ValueError("timeouts.transferSeconds must be below timeouts.updateSeconds")
        return self


# -- status ----------------------------------------------------------------------------------
class _StatusModel(_Model):
    # The operator writes the status; reading it back tolerates fields a newer operator added.
    model_config = ConfigDict(extra="ignore", strict=False)


class Condition(_StatusModel):
    """A metav1.Condition."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    last_transition_time: Annotated[str, Field(json_schema_extra={"format": "date-time"})]
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")]
    message: Annotated[str, Field(max_length=32768)] = ""


class TargetStatus(_StatusModel):
    pod: str
    rank: Annotated[int, Field(ge=1)] | None = None
    endpoint: str | None = None
    state: TargetState
    version: str | None = Field(None, description="The weight version the target's daemon reports.")
    reason: str | None = None


class SyncFigures(_StatusModel):
    """What one round (a trainer sync, or a late joiner's catch-up) moved, and how it ended."""

    version: Annotated[int, Field(ge=0)]
    outcome: Outcome
    bytes: Annotated[int, Field(ge=0)] = 0
    seconds: Annotated[float, Field(ge=0)] = Field(0.0, description="Data-plane time (the update step).")
    total_seconds: Annotated[float, Field(ge=0)] = Field(0.0, description="From pause to resume.")
    gbps: Annotated[float, Field(ge=0)] = Field(0.0, description="Gigabytes per second of the data plane.")
    started: str | None = None
    finished: str | None = None
    reason: str | None = None
    checksum: str | None = Field(None, description="The round's stream checksum: computed by the sender, "
                                                   "verified by every receiver before it committed the round.")
    source: str | None = Field(None, description="The pod that sent (a trainer or a peer).")
    targets: list[str] | None = Field(None, description="The pods that received.")


class Rendezvous(_StatusModel):
    """Where the transfer group meets: what the trainer's agent was told at init."""

    trainer_pod: str
    trainer_endpoint: str
    master_address: str
    master_port: Port
    world_size: Annotated[int, Field(ge=2)]
    group_name: str
    backend: Backend


class WeightSyncStatus(_StatusModel):
    phase: Phase = "Pending"
    message: str | None = None
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    current_version: Annotated[int, Field(ge=0)] | None = Field(
        None, description="The version every target holds (unset until the first sync).")
    ready_targets: str | None = Field(None, description="Targets holding the desired version / all targets.")
    targets: list[TargetStatus] | None = None
    last_sync: SyncFigures | None = None
    last_catch_up: SyncFigures | None = None
    rendezvous: Rendezvous | None = None
    conditions: list[Condition] | None = Field(
        None, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})


class WeightSyncSpecError(ValueError):
    """The spec is invalid; `field` is the camelCase path of the first problem."""

    def __init__(self, field: str, message: str):
        super().__init__(f"spec.{field}: {message}" if field else f"spec: {message}")
        self.field, self.message = field, message


def parse_spec(data: object) -> WeightSyncSpec:
    """Validate a resource's spec, raising WeightSyncSpecError that names the field."""
    try:
        return WeightSyncSpec.model_validate(data or {})
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise WeightSyncSpecError(field, first["msg"].removeprefix("Value error, ")) from None


def parse_status(data: object) -> WeightSyncStatus:
    """The stored status, or an empty one if it is absent or unreadable (e.g. an older schema)."""
    try:
        return WeightSyncStatus.model_validate(data or {})
    except ValidationError:
        return WeightSyncStatus()
