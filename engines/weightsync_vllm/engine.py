"""The worker side: a vLLM `WeightTransferEngine` whose wire is a weightsync transport.

vLLM creates one engine per worker process (one per tensor-parallel rank) with the worker's
model. `init_info` is weightsync's `InitInfo` (its `backend` picks the transport: cpu, nccl,
ipc, p2p); each worker joins the group as receiver rank `rank_offset + its rank` (its rank
counted across data-parallel replicas, as vLLM's own engines do). A round is vLLM's:

    start_weight_update   → vLLM's layerwise reload begins (the model's layers wait for weights)
    update_weights (×n)   → one weightsync round each: the trainer's manifest is checked against
                            the served checkpoint on every receiver before any byte moves, the
                            stream checksum is verified, then the tensors go, under their Hugging
                            Face names, through `model.load_weights` (vLLM fuses q/k/v and
                            gate/up, shards for TP, repacks for CPU)
    finish_weight_update  → vLLM finalizes the reload; a tied lm_head on CPU is repacked

A failed update (refused manifest, checksum mismatch, trainer gone: every wait is bounded by
the group's `timeout_seconds`) ends the reload at once, so the layers nothing was loaded into
get their previous weights back and vLLM keeps serving. The error says whether the served
weights are intact; `weights_intact` keeps the answer.

Serving must be paused during a round (vLLM's `/pause`, which also clears the prefix cache,
then `/resume`): between start and finish the model's layers are being reloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from weightsync.errors import ManifestMismatch, TransferError
from weightsync.landing import LoaderSink
from weightsync.protocol import InitInfo, Manifest, UpdateInfo, parse
from weightsync.transports import Transport, get_transport

from weightsync_vllm.checkpoint import CheckpointManifest, fused_group_key, model_directory
from weightsync_vllm.layers import LoadTargets, learn_load_targets, repack_experts
from weightsync_vllm.metrics import WorkerMetrics, serve

logger = logging.getLogger(__name__)


# vLLM's classes are Any where mypy runs (vLLM lives in its own venv), hence the ignores on the
# subclassing below. The init info stays the body's dict through vLLM's parse step (see
# parse_init_info); init_transfer_engine validates it as weightsync's InitInfo.
class WeightsyncWorkerEngine(WeightTransferEngine[dict[str, Any], UpdateInfo]):  # type: ignore[misc]
    init_info_cls = dict
    update_info_cls = UpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.transport: Transport | None = None
        self.checkpoint: CheckpointManifest | None = None
        self.targets: LoadTargets | None = None  # the served layers each checkpoint tensor loads into
        self._loaded_names: set[str] = set()  # checkpoint tensors loaded in this reload
        self.weights_intact = True  # False while the model holds part of a failed round
        self._reloading = False
        self._loaded_this_round = 0
        self._failed_round = False
        self._loader: LoaderSink | None = None
        # The daemon's metric families, served on this worker's own port (weightsync_vllm.metrics).
        self.metrics = WorkerMetrics()
        self.metrics.weights_bytes.set(sum(p.numel() * p.element_size() for p in model.parameters()))
        serve(self.metrics, _local_rank(self.parallel_config.rank))

    # -- parsing: weightsync's pydantic models, errors naming the field ---------------------
    def parse_init_info(self, init_dict: dict[str, Any]) -> dict[str, Any]:
        # vLLM's worker parses before it calls the engine, on every worker: an error here would
        # be raised by all of them (see `_outcome`), so the body is validated in the engine.
        return init_dict

    def parse_update_info(self, update_dict: dict[str, Any]) -> UpdateInfo:
        return parse(UpdateInfo, update_dict, "update_info")

    @property
    def worker_rank(self) -> int:
        """This worker's rank among all of the server's workers (across data-parallel replicas)."""
        pc = self.parallel_config
        return int(pc.data_parallel_index * pc.world_size + pc.rank)

    # -- the four phases ---------------------------------------------------------------------
    def init_transfer_engine(self, init_info: dict[str, Any]) -> None:
        with self.metrics.phase("init"):
            self._outcome(lambda: self._init(parse(InitInfo, init_info, "init_info")))

    def _init(self, init_info: InitInfo) -> None:
        backend = init_info.backend or "cpu"
        transport_cls = get_transport(backend)  # ValueError naming the available ones
        rank = init_info.rank_offset + self.worker_rank
        if init_info.rank_offset < 1:
            raise ValueError("init_info.rank_offset: rank 0 is the trainer's; vLLM's workers start at 1")
        if rank >= init_info.world_size:
            raise ValueError(f"init_info.world_size: {init_info.world_size} leaves no rank for worker "
                             f"{self.worker_rank} at rank_offset {init_info.rank_offset}")
        if self.checkpoint is None:
            directory = model_directory(self.model_config.model, self.model_config.revision)
            self.checkpoint = CheckpointManifest.from_dir(directory, self.model_config.dtype)
        if self.targets is None:
            self.targets = learn_load_targets(self.model, self.checkpoint, self._load_all)
        self.shutdown()  # a re-init (e.g. after the trainer restarted) replaces the old group
        device = torch.device("cpu") if backend == "cpu" else self.device
        self.transport = transport_cls.connect(init_info, rank, device)
        logger.info("weightsync: joined the %s group as rank %d of %d", backend, rank, init_info.world_size)
        self.metrics.joined(backend)

    def start_weight_update(self) -> None:
        with self.metrics.phase("start"):
            self._outcome(self._start)

    def _start(self) -> None:
        transport = self._transport()
        self._failed_round = False
        initialize_layerwise_reload(self.model)
        self._reloading = True
        self._loaded_this_round = 0
        self._loaded_names = set()
        self.metrics.round_started()
        transport.begin_round()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # Parsed inside the round: vLLM ends its update session on any error, so a bad body
        # must end the reload too (the model's layers are waiting for weights).
        with self.metrics.phase("update"):
            self._outcome(lambda: self._round(lambda: self.parse_update_info(update_info)))
        if self.device.type != "cpu":  # vLLM's default synchronizes; a CPU server has nothing to
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: UpdateInfo) -> None:
        self._outcome(lambda: self._round(lambda: update_info))

    def _round(self, info_of: Callable[[], UpdateInfo]) -> None:
        transport = self._transport()
        if not self._reloading:
            raise RuntimeError("weightsync: update_weights before start_weight_update")
        try:
            self._receive_and_load(transport, info_of())
        except BaseException as error:
            self._abandon_round(error)
            raise RuntimeError(self._failure_message(error)) from error

    def finish_weight_update(self) -> None:
        if self._failed_round:
            # Only reached on the workers that did not report a failed start or update (see
            # `_outcome`): vLLM still counts their session open, and this call closes it. The
            # worker that reported it never gets here (vLLM refuses the finish first), so there
            # is nobody to agree with.
            self._failed_round = False
            return
        with self.metrics.phase("finish"):
            self._outcome(self._finish)

    def _finish(self) -> None:
        self._end_reload()
        self._transport().end_round()
        self.weights_intact = True
        self.metrics.round_finished()

    def shutdown(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # -- internals ---------------------------------------------------------------------------
    def _outcome(self, step: Callable[[], None]) -> None:
        """Run one step on this worker; if it failed on any of the server's workers, fail the
        call from the last worker only.

        vLLM 0.32's multiprocess executor reads the workers' replies in rank order and raises at
        the first failed one, leaving the later replies unread, to be taken as the answers to
        the next call: after an error raised by every tensor-parallel worker, each later call
        gets the previous call's answer. So the workers first share their outcomes (an
        all-gather over vLLM's own CPU group; fixed-size UTF-8, no pickle), and only the last
        one raises, with every distinct reason. The others return; where that leaves vLLM's
        update session open on them, the next `/finish_weight_update` closes it.
        """
        error: BaseException | None = None
        try:
            step()
        except BaseException as caught:  # reported below, once, by the last worker
            error = caught
            self.metrics.call_failed(caught)
        group = _server_group()
        if group is None:
            if error is not None:
                raise error
            return
        cpu_group, rank, size = group
        mine = _encode(str(error) if error is not None else "")
        gathered = [torch.empty_like(mine) for _ in range(size)]
        torch.distributed.all_gather(gathered, mine, group=cpu_group)
        reasons = list(dict.fromkeys(r for r in (_decode(t) for t in gathered) if r))
        if not reasons:
            return
        if error is None and self._reloading:  # failed on another worker: end the reload here too
            self._abandon_round(RuntimeError("; ".join(reasons)))
        self._failed_round = True
        if rank == size - 1:
            raise RuntimeError("; ".join(reasons)) from error

    def _transport(self) -> Transport:
        if self.transport is None:
            raise RuntimeError("weightsync: call /init_weight_transfer_engine first")
        return self.transport

    def _receive_and_load(self, transport: Transport, update_info: UpdateInfo) -> None:
        """One weightsync round into the model's loader (`weightsync.landing.LoaderSink`): every
        receiver checks the trainer's manifest against the served checkpoint before any byte
        moves; each tensor goes to `model.load_weights` once its bytes are in, fused groups
        (q/k/v, gate/up) whole; with `atomic` in init_info, only once the whole round verified."""
        sink = self._sink()
        try:
            self.metrics.received(transport.receive(sink, update_info).payload_bytes)
        finally:
            self._loaded_this_round += sink.loaded_tensors

    def _sink(self) -> LoaderSink:
        if self._loader is None:
            mapping = getattr(self.model, "packed_modules_mapping", None) or {}
            group_of = self._learned()[1].group_key(fused_group_key(mapping))
            self._loader = LoaderSink(self._load, self._mismatch, group_of=group_of)
        return self._loader

    def _learned(self) -> tuple[CheckpointManifest, LoadTargets]:
        """The served checkpoint and the layers its tensors load into (learned at the first init)."""
        if self.checkpoint is None or self.targets is None:
            raise RuntimeError("weightsync: call /init_weight_transfer_engine first")
        return self.checkpoint, self.targets

    def _mismatch(self, manifest: Manifest) -> str | None:
        """Why the served model cannot load this update: a tensor its checkpoint does not have
        (or not in that shape or dtype), or a layer the update would leave half loaded."""
        checkpoint, targets = self._learned()
        return checkpoint.mismatch(manifest) or targets.split(manifest)

    def _load(self, batch: list[tuple[str, torch.Tensor]]) -> None:
        """Hand one batch to vLLM. vLLM keeps the tensors of a layer until all of them arrived
        and rebuilds it then; the views handed here point into staging that later chunks
        reuse, so a tensor whose layer is not complete after this batch goes as a copy."""
        self._loaded_names.update(name for name, _ in batch)
        self._load_all(self._learned()[1].outliving(batch, self._loaded_names))

    def _load_all(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        with disable_mtp_completeness_check():  # as vLLM's own engines: a partial set per call
            self.model.load_weights(weights=weights)

    def _end_reload(self) -> None:
        """Finalize vLLM's layerwise reload: layers that got weights are processed, the others
        get their previous tensors back. Then what vLLM leaves undone on an update: reloaded
        mixture-of-experts layers are repacked (`weightsync_vllm.layers.repack_experts`), and a
        tied lm_head on CPU, which keeps a packed copy of the embedding, is rebuilt from the
        (shared, now updated) weight."""
        if not self._reloading:
            return
        self._reloading = False
        finalize_layerwise_reload(self.model, self.model_config)
        repacked = repack_experts(self.model, self._learned()[1].touched(self._loaded_names))
        if repacked:
            logger.info("weightsync: repacked the experts of %d reloaded layer(s), e.g. %s", len(repacked), repacked[0])
        lm_head = getattr(self.model, "lm_head", None)
        tied = getattr(getattr(self.model, "config", None), "tie_word_embeddings", False)
        method = getattr(lm_head, "quant_method", None)
        if tied and method is not None and self.device.type == "cpu":
            method.process_weights_after_loading(lm_head)

    def _abandon_round(self, error: BaseException) -> None:
        touched = self._loaded_this_round > 0 or getattr(error, "weights_touched", False)
        try:
            self._end_reload()
        finally:
            if touched:
                self.weights_intact = False
            self.metrics.round_failed(self.weights_intact)
            if self.transport is not None:
                self.transport.end_round()

    def _failure_message(self, error: BaseException) -> str:
        kind = "refused" if isinstance(error, ManifestMismatch) else "failed"
        if self.weights_intact:
            state = "vLLM keeps serving the previous weights, intact (nothing of this round was loaded)"
        else:
            state = ("vLLM keeps serving, but its weights are NOT intact: part of a failed round was "
                     "loaded; send a full update")
        reason = f"{type(error).__name__}: {error}" if not isinstance(error, TransferError | ManifestMismatch) \
            else str(error)
        return f"weightsync update {kind}: {reason}; {state}"


_REASON_BYTES = 4096


def _local_rank(fallback: int) -> int:
    """This worker's rank among the workers of its node (its pod): its metrics port's offset."""
    from vllm.distributed.parallel_state import get_world_group

    try:
        return int(get_world_group().local_rank)
    except AssertionError:  # no world group yet: a single worker
        return fallback


def _server_group() -> tuple[torch.distributed.ProcessGroup, int, int] | None:
    """(vLLM's CPU group over this server's workers, this worker's rank, their number), or None
    with a single worker."""
    from vllm.distributed.parallel_state import get_world_group

    world = get_world_group()
    if world.world_size == 1:
        return None
    return world.cpu_group, world.rank_in_group, world.world_size


def _encode(reason: str) -> torch.Tensor:
    data = reason.encode()[:_REASON_BYTES]
    out = torch.zeros(_REASON_BYTES, dtype=torch.uint8)
    out[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return out


def _decode(tensor: torch.Tensor) -> str:
    return bytes(tensor.numpy()).rstrip(b"\0").decode(errors="replace")
