"""vLLM's trainer-side API over weightsync: trainer code written for vLLM switches by its init info.

vLLM 0.32 has a trainer-side registry, `WeightTransferTrainerFactory`, next to the worker
one; `register()` (this package's `vllm.general_plugins` entry point, also run when this module
is imported) names `WeightsyncTrainerEngine` there under "weightsync". vLLM's factory picks the
engine from the init info's class-level `backend`, so the switch from vLLM's NCCL backend is the
init info class (same fields, plus weightsync's own):

    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from weightsync_vllm.trainer_engine import WeightsyncTrainerInitInfo   # was NCCLTrainerInitInfo

    engine = WeightTransferTrainerFactory.trainer_init(
        WeightsyncTrainerInitInfo(master_address=..., master_port=..., world_size=1 + workers, rank=rank),
        client=HTTPVLLMWeightSyncClient(url), source=ModuleSource(model))
    engine.send_weights()   # every step, on every trainer rank

The server runs the worker engine of this package (`--weight-transfer-config '{"backend":
"weightsync"}'`). The control plane is vLLM's client or any object with its four methods
(`init_weight_transfer_engine`, `start_weight_update`, `update_weights`, `finish_weight_update`);
like vLLM's own trainer engines, this one does not pause or resume serving: the caller does,
around `send_weights`.

Every trainer rank calls `trainer_init` and `send_weights`. Rank 0 (`init_info.rank`) joins the
transfer group and drives the client; with more than one trainer rank (torch.distributed
initialized, or `process_group` given), the others materialize the source with it and return
or raise the round's outcome (`weightsync.sharded`). The source is vLLM's `WeightSource`, used
by weightsync as it is: 0.32's (`metadata()` + iteration) and 0.33's (`metadata` property +
`iter_full()`, read through `weightsync.source.adapt`); it streams (cpu, nccl transports), one
tensor materialized at a time. A 0.33 source may declare owners per parameter: every trainer rank
materializes every parameter with the others here, so each must be owned by every trainer rank
(refused at init otherwise, naming the parameter). The same module serves vLLM 0.32 and 0.33:
what differs is chosen by what the installed vLLM offers (`_BASE_TAKES_RANK`), never by its
version string.

This module imports vLLM; `weightsync` (the core) never does.
"""

from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine

from weightsync.errors import WeightSyncError
from weightsync.limits import DEFAULT_BUFFER_SIZE_BYTES, DEFAULT_NUM_BUFFERS
from weightsync.protocol import DEFAULT_TIMEOUT_SECONDS, InitInfo
from weightsync.source import adapt, manifest_of
from weightsync.trainer import WeightSender
from weightsync.transports import RoundStats
from weightsync_vllm import ENGINE_NAME, register
from weightsync_vllm.trainer import round_failure, vllm_reason

if TYPE_CHECKING:
    from weightsync.sharded import TrainerGroup


# vLLM 0.33's TrainerWeightTransferEngine.__init__ takes the trainer rank; 0.32's does not.
_BASE_TAKES_RANK = "rank" in inspect.signature(TrainerWeightTransferEngine.__init__).parameters


class VLLMRoundError(WeightSyncError):
    """A round failed; the message carries the trainer's reason and vLLM's answer."""


# vLLM's classes are Any where mypy runs (vLLM lives in its own venv): hence the ignores on
# subclassing them below.
@dataclass
class WeightsyncTrainerInitInfo(TrainerInitInfo):  # type: ignore[misc]
    """vLLM's `NCCLTrainerInitInfo` fields, plus weightsync's.

    `transport`: weightsync's transport (cpu, nccl, ipc, p2p; default nccl where CUDA is, else
    cpu). `atomic`: the workers load a round only once all of it arrived and verified, so a round
    that fails mid-stream (a source contradicting its metadata, a trainer rank lost) leaves vLLM's
    weights intact; without it they load each tensor as it arrives and such a round leaves them
    partly updated (vLLM's answer says so). `process_group`: the trainer ranks' group for a
    sharded trainer (default: torch's default group when it has more than one rank).
    `world_size`: 1 + every inference worker.
    `options`: the transport's options (weightsync's `init_info.options`), which the workers must
    be given alike: a difference fails the init on every party naming the option."""

    backend: ClassVar[str] = ENGINE_NAME

    master_address: str
    master_port: int
    world_size: int
    packed: bool = True
    packed_buffer_size_bytes: int = DEFAULT_BUFFER_SIZE_BYTES
    packed_num_buffers: int = DEFAULT_NUM_BUFFERS
    transport: str | None = None
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    init_timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    verify: bool = True
    atomic: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    process_group: Any = None

    def weightsync_init(self) -> InitInfo:
        """The transfer group's init info as the workers get it (rank offset 1, after the sender)."""
        transport = self.transport or ("nccl" if torch.cuda.is_available() else "cpu")
        return InitInfo(backend=transport, master_address=self.master_address, master_port=self.master_port,
                        world_size=self.world_size, rank_offset=1, packed=self.packed,
                        packed_buffer_size_bytes=self.packed_buffer_size_bytes,
                        packed_num_buffers=self.packed_num_buffers, timeout_seconds=self.timeout_seconds,
                        init_timeout_seconds=self.init_timeout_seconds, verify=self.verify,
                        atomic=self.atomic, options=self.options)


def _trainer_group(init_info: WeightsyncTrainerInitInfo) -> TrainerGroup | None:
    """The trainer ranks' group when there is more than one rank, else None."""
    group = init_info.process_group
    if group is None and not (dist.is_initialized() and dist.get_world_size() > 1):
        if init_info.rank != 0:
            raise ValueError(f"trainer rank {init_info.rank}: ranks other than 0 need torch.distributed "
                             "initialized (or init_info.process_group) to learn each round's outcome")
        return None
    from weightsync.sharded import TrainerGroup

    trainer = TrainerGroup(group)
    if trainer.rank != init_info.rank:
        raise ValueError(f"init_info.rank is {init_info.rank} but this process is rank {trainer.rank} "
                         "of the trainer's process group")
    return trainer


class WeightsyncTrainerEngine(TrainerWeightTransferEngine[WeightsyncTrainerInitInfo]):  # type: ignore[misc]
    """The trainer's side of a weightsync group whose receivers are vLLM's workers."""

    init_info_cls = WeightsyncTrainerInitInfo

    # `client`: vLLM's weight-sync client; `source`: a vLLM WeightSource (0.32's or 0.33's shape).
    def __init__(self, *, client: Any, source: Any, is_sender: bool, sender: WeightSender, init: InitInfo,
                 rank: int = 0) -> None:
        if _BASE_TAKES_RANK:
            super().__init__(client=client, source=source, is_sender=is_sender, rank=rank)
        else:
            super().__init__(client=client, source=source, is_sender=is_sender)
            self.rank = rank
        self.sender = sender
        self.init = init
        self.last: RoundStats | None = None

    @classmethod
    def trainer_init(cls, init_info: WeightsyncTrainerInitInfo, *, client: Any, source: Any = None
                     ) -> WeightsyncTrainerEngine:
        if source is None:
            raise ValueError("the weightsync trainer engine sends full updates: it needs a WeightSource")
        init = init_info.weightsync_init()
        trainer = _trainer_group(init_info)
        _check_owners(source, trainer.size if trainer else 1)
        if not init_info.is_sender:
            return cls(client=client, source=source, is_sender=False, init=init,
                       sender=WeightSender(None, trainer), rank=init_info.rank)
        # The workers wait inside init_weight_transfer_engine for the group to form: call it
        # while this process hosts the rendezvous, and surface its answer either way.
        with ThreadPoolExecutor(max_workers=1) as pool:
            answer = pool.submit(client.init_weight_transfer_engine, init.model_dump(exclude_none=True))
            try:
                sender = WeightSender.init(init, process_group=trainer.group if trainer else None)
            except BaseException as error:
                raise VLLMRoundError(f"joining vLLM's workers failed: {error}; vLLM: "
                                     f"{_answer(answer, init.init_timeout_seconds)}") from error
            answer.result(timeout=init.init_timeout_seconds + 30)
        return cls(client=client, source=source, is_sender=True, sender=sender, init=init, rank=init_info.rank)

    def send_weights(self, weight_version: str | None = None) -> None:
        """One round on every trainer rank: on rank 0 `start_weight_update`, `update_weights`
        (while the trainer streams the source), `finish_weight_update` (with `weight_version`)."""
        if not self.is_sender:
            self.last = self.sender.send_weights(self.source)
            return
        manifest = manifest_of(adapt(self.source))
        update_info = {"names": manifest.names, "dtype_names": [t.dtype for t in manifest.tensors],
                       "shapes": [list(t.shape) for t in manifest.tensors]}
        try:
            self.client.start_weight_update()
        except BaseException as error:
            self._abandon(error)
            raise
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            answer = pool.submit(self.client.update_weights, update_info)
            try:
                self.last = self.sender.send_weights(self.source)
            except BaseException as error:
                reply = _answer(answer, self.init.timeout_seconds)
                self._close_failed_session(answer)
                message = round_failure(error, [reply])  # the reason once, where vLLM's answer says it
                if isinstance(error, WeightSyncError):  # the same kind (ManifestMismatch, SourceMismatch...)
                    raise type(error)(message) from error
                raise VLLMRoundError(message) from error
            problem = _answer(answer, self.init.timeout_seconds)
            if problem:
                self._close_failed_session(answer)
                raise VLLMRoundError(f"the round was sent but vLLM failed it: {problem}")
        finally:
            pool.shutdown(wait=False)  # an answer that never came must not hold the caller
        self.client.finish_weight_update(weight_version)

    def _close_failed_session(self, answer: Future[Any]) -> None:
        """After a failed update, one finish (it answers an error): with tensor parallelism vLLM
        0.32 reports the failure from one worker only, and the finish closes the others' update
        session (see docs/vllm.md). Not while the update call is still out."""
        if not answer.done():
            return
        try:
            self.client.finish_weight_update()
        except Exception:  # noqa: BLE001 - expected: vLLM already ended the failed update
            pass

    def _abandon(self, error: BaseException) -> None:
        if self.sender.trainer_group is not None:
            from weightsync.sharded import abandon

            abandon(self.sender.trainer_group, error)

    def shutdown(self) -> None:
        self.sender.close()


def _check_owners(source: object, trainer_ranks: int) -> None:
    """Refuse a vLLM 0.33 source with a parameter some trainer rank does not own: weightsync's
    trainer ranks materialize every parameter together (rank 0 sends it), so a rank that skips
    one would take the next parameter's collective for it. Identical metadata on every rank, so
    every rank refuses alike, before anything joins."""
    metadata = getattr(source, "metadata", None)
    if metadata is None or callable(metadata):  # vLLM 0.32's or weightsync's shape: no owners
        return
    for meta in metadata:
        owners = getattr(meta, "owners", None)
        if owners is not None and set(range(trainer_ranks)) - set(owners):
            raise ValueError(f"source metadata: parameter {meta.name!r} is owned by trainer ranks "
                             f"{list(owners)}; weightsync's trainer engine needs every parameter owned "
                             f"by all {trainer_ranks} trainer rank(s) (rank 0 sends each one whole)")


def _answer(future: Future[Any], timeout: float) -> str:
    """vLLM's answer to a call: '' when it succeeded, else its error (waiting at most `timeout` + 30 s)."""
    try:
        future.result(timeout=timeout + 30)
        return ""
    except FutureTimeout:
        return f"no answer within {timeout + 30:g}s"
    except Exception as error:  # noqa: BLE001 - HTTP errors carry vLLM's message
        body = getattr(getattr(error, "response", None), "text", "")
        return f"{type(error).__name__}: {error}: {vllm_reason(body)}" if body else f"{type(error).__name__}: {error}"


register()  # importing the init info class is enough for vLLM's trainer factory to find the engine
