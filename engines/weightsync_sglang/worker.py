"""The worker side: each SGLang tensor-parallel worker a receiver of a weightsync group.

SGLang's scheduler (one process per tensor-parallel rank) calls its model runner's
`WeightUpdater` for the distributed-update routes; the around-hooks here (registered by
`weightsync_sglang.register`) take the calls that name weightsync and pass any other to SGLang:

    init_weights_update_group (backend "weightsync")  → join the group over a weightsync transport
    receive_weights_from_distributed (its group name) → one weightsync round, loaded as it arrives
    destroy_weights_update_group (its group name)     → leave the group

A round: every receiver checks the trainer's manifest against the served checkpoint's safetensors
headers (`weightsync.checkpoint`) before any byte moves; the stream checksum is verified; each
tensor goes, under its Hugging Face name, through the model's own `load_weights` (SGLang fuses
q/k/v and gate/up and shards for tensor parallelism, in place). With `atomic` in the init info
nothing loads before the whole round verified. Every wait is bounded by the group's
`timeout_seconds`. The hook then returns no tensors, so SGLang's own load step has nothing left
to do, and SGLang records the version and flushes its cache as after any distributed update.

A failed round raises: SGLang answers the route with success false and this message, which says
whether the served weights are intact (nothing of the round loaded) or not (part of it loaded:
send a full update). With several workers the outcomes are first shared over SGLang's own CPU
group, so every worker fails the round with every reason (SGLang answers from its first rank).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from weightsync.checkpoint import CheckpointManifest, model_directory
from weightsync.metrics import serve_worker
from weightsync.errors import ManifestMismatch, TransferError
from weightsync.landing import LoaderSink
from weightsync.protocol import InitInfo, Manifest, UpdateInfo, parse
from weightsync.transports import RoundStats, Transport, get_transport

from weightsync_sglang.wire import BACKEND_NAME, init_info_of
from weightsync_sglang.metrics import SGLangWorkerMetrics, server_url

logger = logging.getLogger(__name__)

_REASON_BYTES = 4096


@dataclass
class Receiver:
    """One worker's membership in a weightsync group: its transport, the served checkpoint the
    manifests are checked against, and whether the served weights are still whole."""

    transport: Transport
    rank: int
    model: Any  # SGLang's model class (its load_weights is SGLang's, untyped here)
    checkpoint: CheckpointManifest
    engine_refusal: Callable[[], str | None]
    weights_intact: bool = True
    loaded_this_round: int = 0
    sink: LoaderSink = field(init=False)

    def __post_init__(self) -> None:
        self.sink = LoaderSink(self._load, self._mismatch)

    def _mismatch(self, manifest: Manifest) -> str | None:
        """Why this round cannot land here: SGLang's own refusal of online updates (checked by
        SGLang only after a receive, when a weightsync round has already loaded), or a tensor
        the served checkpoint does not have in that shape and dtype."""
        return self.engine_refusal() or self.checkpoint.mismatch(manifest)

    def _load(self, batch: list[tuple[str, torch.Tensor]]) -> None:
        """Hand a batch to SGLang's loader, which copies into its (fused, sharded) parameters in
        place: the views it gets point into staging that later chunks reuse."""
        self.loaded_this_round += len(batch)
        self.model.load_weights(batch)

    def round(self, update_info: UpdateInfo) -> RoundStats:
        """One weightsync round into the served model; on failure the error says the state."""
        self.loaded_this_round = 0
        self.transport.begin_round()
        try:
            stats = self.transport.receive(self.sink, update_info)
        except BaseException as error:
            if self.loaded_this_round > 0 or getattr(error, "weights_touched", False):
                self.weights_intact = False
            raise RuntimeError(self.failure_message(error)) from error
        finally:
            self.transport.end_round()
        self.weights_intact = True
        return stats

    def failure_message(self, error: BaseException) -> str:
        kind = "refused" if isinstance(error, ManifestMismatch) else "failed"
        if self.weights_intact:
            state = "SGLang keeps serving the previous weights, intact (nothing of this round was loaded)"
        else:
            state = ("SGLang keeps serving, but its weights are NOT intact: part of a failed round was loaded; "
                     "send a full update")
        known = isinstance(error, TransferError | ManifestMismatch)
        reason = str(error) if known else f"{type(error).__name__}: {error}"
        return f"weightsync update {kind}: {reason}; {state}"

    def close(self) -> None:
        self.transport.close()


_METRICS: list[SGLangWorkerMetrics] = []  # this worker's, created and served at its first init


def worker_metrics(updater: Any) -> SGLangWorkerMetrics:
    """This worker's metrics (weightsync_sglang.metrics), served on its port from the first init."""
    if not _METRICS:
        url, api_key = server_url()
        metrics = SGLangWorkerMetrics(url, api_key)
        metrics.weights_bytes.set(sum(p.numel() * p.element_size() for p in updater.get_model().parameters()))
        serve_worker(metrics, int(updater.tp_rank))
        _METRICS.append(metrics)
    return _METRICS[0]


# This process's weightsync groups, by InitInfo.group_name (a scheduler process serves one
# tensor-parallel rank; SGLang's WeightUpdater is a frozen dataclass, so the state lives here).
RECEIVERS: dict[str, Receiver] = {}


def join(updater: Any, info: InitInfo) -> Receiver:
    """Join the group as receiver `rank_offset + tp rank`, replacing an earlier group of that
    name (a trainer that restarted joins again)."""
    rank = info.rank_offset + int(updater.tp_rank)
    if info.rank_offset < 1:
        raise ValueError("init_info.rank_offset: rank 0 is the trainer's; SGLang's workers start at 1")
    if rank >= info.world_size:
        raise ValueError(f"init_info.world_size: {info.world_size} leaves no rank for tensor-parallel worker "
                         f"{updater.tp_rank} at rank_offset {info.rank_offset}")
    backend = info.backend or "cpu"
    transport_cls = get_transport(backend)  # ValueError naming the available ones
    config = updater.model_config
    checkpoint = CheckpointManifest.from_dir(model_directory(config.model_path, getattr(config, "revision", None)),
                                             getattr(config, "dtype", None))
    leave(info.group_name)
    device = torch.device("cpu") if backend == "cpu" else torch.device(updater.device, updater.gpu_id)
    receiver = Receiver(transport_cls.connect(info, rank, device), rank, updater.get_model(), checkpoint,
                        lambda: sglang_refusal(updater))
    RECEIVERS[info.group_name] = receiver
    logger.info("weightsync: joined the %s group %r as rank %d of %d", backend, info.group_name, rank, info.world_size)
    return receiver


def sglang_refusal(updater: Any) -> str | None:
    """What SGLang says against any online update of this model (a CUDA-IPC weight cache shared
    with other engines, derived weight caches a load would leave stale), or None. SGLang checks
    it in its load step, after the receive: for a weightsync round that is too late (the
    tensors landed as they arrived), so it is part of the manifest check, before any byte moves."""
    from sglang.srt.model_executor.model_runner_components import weight_updater

    try:
        updater._assert_weight_cache_inactive("update_weights_from_distributed")
    except RuntimeError as error:
        return str(error)
    refusal: str | None = weight_updater._unsupported_derived_weight_cache_error(updater.get_model())
    return refusal


def leave(group_name: str) -> bool:
    receiver = RECEIVERS.pop(group_name, None)
    if receiver is not None:
        receiver.close()
    return receiver is not None


# -- the hooks (HookType.AROUND: the original method first) -----------------------------------
def around_init_weights_update_group(original: Callable[..., tuple[bool, str]], updater: Any,
                                     master_address: str, master_port: int, rank_offset: int, world_size: int,
                                     group_name: str, backend: str = "nccl") -> tuple[bool, str]:
    """SGLang's init for another backend; weightsync's for ours, answered as SGLang answers
    (success, message), the message naming the field or the reason."""
    if backend != BACKEND_NAME:
        return original(updater, master_address, master_port, rank_offset, world_size, group_name, backend)
    metrics = worker_metrics(updater)
    try:
        with metrics.phase("init"):
            info = init_info_of(master_address, master_port, rank_offset, world_size, group_name)
            receiver = join(updater, info)
    except Exception as error:  # noqa: BLE001 - answered to the caller
        metrics.call_failed(error)
        logger.error("weightsync: init failed: %s", error)
        return False, f"weightsync init failed: {error}"
    metrics.joined(info.backend or "cpu")
    return True, f"weightsync: joined as rank {receiver.rank}"


def around_receive_weights_from_distributed(original: Callable[..., Any], updater: Any, *, names: list[str],
                                            dtypes: list[str], shapes: list[list[int]], group_name: str,
                                            load_format: str | None = None) -> Any:
    """A round of a weightsync group, loaded as it arrives (returns no tensors: nothing is left
    for SGLang's load step); any other group's receive is SGLang's."""
    receiver = RECEIVERS.get(group_name)
    if receiver is None:
        return original(updater, names=names, dtypes=dtypes, shapes=shapes, group_name=group_name,
                        load_format=load_format)
    error = _round(receiver, worker_metrics(updater), names, dtypes, shapes)
    reasons = _shared_reasons(str(error) if error is not None else "")
    if reasons:
        raise RuntimeError(" | ".join(reasons)) from error
    return []


def _round(receiver: Receiver, metrics: SGLangWorkerMetrics, names: list[str], dtypes: list[str],
           shapes: list[list[int]]) -> BaseException | None:
    """One round on this worker, counted in its metrics; its error (None: it landed)."""
    metrics.round_started()
    try:
        with metrics.phase("update"):
            info = parse(UpdateInfo, {"names": names, "dtype_names": dtypes, "shapes": shapes}, "update_info")
            stats = receiver.round(info)
    except BaseException as error:  # shared with the other workers by the caller, then raised
        metrics.call_failed(error)
        metrics.round_failed(receiver.weights_intact)
        return error
    metrics.received(stats.payload_bytes)
    metrics.round_finished()
    logger.info("weightsync: round of %d tensors, %d bytes landed", stats.num_tensors, stats.payload_bytes)
    return None


def around_destroy_weights_update_group(original: Callable[..., tuple[bool, str]], updater: Any,
                                        group_name: str) -> tuple[bool, str]:
    if leave(group_name):
        return True, "weightsync: left the group"
    return original(updater, group_name)


# -- the workers' outcomes, shared (fixed-size UTF-8 over SGLang's CPU group: no pickle) -----
def _shared_reasons(mine: str) -> list[str]:
    """Every distinct failure reason among this server's tensor-parallel workers ([] when all
    succeeded): SGLang answers a route from its first rank only, so a worker that failed alone
    must fail them all."""
    group = _tp_group()
    if group is None:
        return [mine] if mine else []
    cpu_group, size = group
    gathered = [torch.empty(_REASON_BYTES, dtype=torch.uint8) for _ in range(size)]
    torch.distributed.all_gather(gathered, _encode(mine), group=cpu_group)
    return list(dict.fromkeys(reason for reason in map(_decode, gathered) if reason))


def _tp_group() -> tuple[torch.distributed.ProcessGroup, int] | None:
    from sglang.srt.distributed.parallel_state import get_tp_group

    tp = get_tp_group()
    if tp.world_size == 1:
        return None
    return tp.cpu_group, int(tp.world_size)


def _encode(reason: str) -> torch.Tensor:
    data = reason.encode()[:_REASON_BYTES]
    out = torch.zeros(_REASON_BYTES, dtype=torch.uint8)
    out[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else out[:0]
    return out


def _decode(tensor: torch.Tensor) -> str:
    return bytes(tensor.numpy()).rstrip(b"\0").decode(errors="replace")

