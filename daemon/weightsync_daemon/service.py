"""The protocol's state machine for one party, with no HTTP in it.

Phases: uninitialized → (init) → ready → (start) → updating → (update …) → (finish) → ready.
Calls out of order raise PhaseError (HTTP 409). Blocking transport work runs on one dedicated
thread, never on the event loop, and is bounded by the group's timeout.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from weightsync.errors import IntegrityError, ManifestMismatch, PhaseError, ProtocolError, TransferError
from weightsync.protocol import InitInfo, UpdateInfo
from weightsync.store import WeightStore, tensor_digest
from weightsync.transports import RoundStats, Transport, default_device, get_transport
from weightsync_daemon.metrics import DaemonMetrics, numeric_version

log = logging.getLogger("weightsync.daemon")

PauseHook = Callable[[str], None]
ResumeHook = Callable[[], None]


class Phase(enum.StrEnum):
    UNINITIALIZED = "uninitialized"
    READY = "ready"
    UPDATING = "updating"


def failure_reason(error: BaseException) -> str:
    """The bounded metric label for an error."""
    match error:
        case IntegrityError():
            return "integrity"
        case ManifestMismatch():
            return "manifest_mismatch"
        case TransferError():
            return "transfer_error"
        case ProtocolError():
            return "bad_request"
        case PhaseError():
            return "conflict"
    return "internal"


@dataclass
class RoundState:
    started_at: float
    last_activity: float
    stats: list[RoundStats]


class EngineService:
    """What the trainer's agent and a receiver daemon share: phases, init, pause, metrics."""

    role = ""

    def __init__(self, backend: str = "cpu", device: torch.device | str | None = None,
                 on_pause: PauseHook | None = None, on_resume: ResumeHook | None = None):
        self.backend = backend
        self.device = torch.device(device) if device is not None else default_device(backend)
        self.metrics = DaemonMetrics(self.role, backend)
        self.phase = Phase.UNINITIALIZED
        self.transport: Transport | None = None
        self.init_info: InitInfo | None = None
        self.round: RoundState | None = None
        self.last_failure: str | None = None
        self.paused = False
        self.weights_intact = True  # False while the weights hold part of a failed round
        self._on_pause, self._on_resume = on_pause, on_resume
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"weightsync-{self.role}")
        self._phase_lock = asyncio.Lock()

    # -- helpers --------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Workers this party contributes to the group (one GPU per daemon)."""
        return 1

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _timed(self, phase: str):
        return self.metrics.phase_seconds.labels(phase=phase).time()

    def _fail(self, error: BaseException) -> None:
        self.metrics.failures.labels(reason=failure_reason(error)).inc()

    def _require(self, *allowed: Phase) -> None:
        if self.phase not in allowed:
            raise PhaseError(
                f"not allowed in phase {self.phase.value}; needs {' or '.join(p.value for p in allowed)}"
                + (f" (last failure: {self.last_failure})" if self.last_failure else ""))

    def _round_is_stale(self) -> bool:
        if self.round is None or self.init_info is None:
            return False
        return time.monotonic() - self.round.last_activity > self.init_info.timeout_seconds

    # -- phases ---------------------------------------------------------------------------
    async def init(self, info: InitInfo) -> str:
        async with self._phase_lock:
            try:
                self._require(Phase.UNINITIALIZED, Phase.READY)
                if info == self.init_info:
                    raise PhaseError("already initialized with this init_info; re-initialize with another "
                                     "group_name or rendezvous")
                backend = info.backend or self.backend
                if backend != self.backend:
                    raise ProtocolError("init_info.backend",
                                        f"this daemon runs the {self.backend} backend, not {backend}")
                self._check_rank(info)
                with self._timed("init"):
                    # Join the new group before leaving the old one: the trainer's rendezvous
                    # server on the same port then carries straight over to the new group.
                    cls = get_transport(backend)
                    joined = await self._in_worker(cls.connect, info, self._own_rank(info), self.device)
                    await self._in_worker(self._close_transport)
                    self.transport = joined
                self.init_info = info
                self.phase = Phase.READY
                self.last_failure = None
                return f"joined group {info.group_name} as rank {self._own_rank(info)} of {info.world_size}"
            except Exception as error:
                self._fail(error)
                raise

    def _own_rank(self, info: InitInfo) -> int:
        return info.rank_offset

    def _check_rank(self, info: InitInfo) -> None:
        if info.rank_offset == 0:
            raise ProtocolError("init_info.rank_offset", "rank 0 is the trainer's; receivers start at 1")

    async def start(self) -> str:
        async with self._phase_lock:
            try:
                if self.phase == Phase.UPDATING and self._round_is_stale():
                    log.warning("abandoning a round with no activity for %ss", self.init_info.timeout_seconds)
                    self._end_round(f"abandoned: no activity for {self.init_info.timeout_seconds}s")
                self._require(Phase.READY)
                with self._timed("start"):
                    now = time.monotonic()
                    self.round = RoundState(now, now, [])
                    self.phase = Phase.UPDATING
                    if self.transport is not None:
                        self.transport.begin_round()  # e.g. ipc: a fresh round, not a continued one
                return "weight update started"
            except Exception as error:
                self._fail(error)
                raise

    async def update(self, info: UpdateInfo) -> RoundStats:
        async with self._phase_lock:
            try:
                self._require(Phase.UPDATING)
                with self._timed("update"):
                    stats = await self._in_worker(self._transfer, info)
                self.round.stats.append(stats)
                self.round.last_activity = time.monotonic()
                self._count_bytes(stats)
                return stats
            except Exception as error:
                self._fail(error)
                if self.phase == Phase.UPDATING and isinstance(error, (ManifestMismatch, TransferError)):
                    # The round is over. The weights keep the last finished version, unless part
                    # of this round already landed in them: then say so until a round succeeds.
                    if getattr(error, "weights_touched", False):
                        self._set_intact(False)
                    self._end_round(f"{failure_reason(error)}: {error}")
                raise

    async def finish(self, weight_version: str | None) -> str | None:
        async with self._phase_lock:
            try:
                self._require(Phase.UPDATING)
                with self._timed("finish"):
                    version = self._apply_version(weight_version)
                self.round = None
                if self.transport is not None:
                    self.transport.end_round()  # e.g. ipc: memory lent to receivers may go now
                self.phase = Phase.READY
                self.last_failure = None
                self._set_intact(True)
                self.metrics.updates.labels(outcome="success").inc()
                self.metrics.last_success.set_to_current_time()
                return version
            except Exception as error:
                self._fail(error)
                raise

    async def abort(self, reason: str) -> str:
        """End an unfinished round (the coordinator gave up on it); weights keep their version."""
        async with self._phase_lock:
            if self.phase != Phase.UPDATING:
                return "no round in progress"
            self._end_round(f"aborted: {reason}")
            return "round aborted"

    def _set_intact(self, intact: bool) -> None:
        self.weights_intact = intact
        self.metrics.weights_intact.set(1 if intact else 0)

    def _end_round(self, failure: str) -> None:
        self.round = None
        if self.transport is not None:
            self.transport.end_round()
        self.phase = Phase.READY
        self.last_failure = failure
        self.metrics.updates.labels(outcome="failure").inc()

    async def pause(self, mode: str) -> None:
        if self._on_pause is not None:
            await asyncio.to_thread(self._on_pause, mode)
        self.paused = True
        self.metrics.paused.set(1)

    async def resume(self) -> None:
        if self._on_resume is not None:
            await asyncio.to_thread(self._on_resume)
        self.paused = False
        self.metrics.paused.set(0)

    async def shutdown(self) -> None:
        await self._in_worker(self._close_transport)
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    async def close(self) -> str:
        """Leave the transfer group (the operator tears it down); the weights stay as they are."""
        async with self._phase_lock:
            if self.phase == Phase.UPDATING:
                self._end_round("aborted: the group was closed")
            await self._in_worker(self._close_transport)
            self.init_info = None
            self.phase = Phase.UNINITIALIZED
            return "left the transfer group"

    # -- role-specific --------------------------------------------------------------------
    def _transfer(self, info: UpdateInfo) -> RoundStats:
        raise NotImplementedError

    def _count_bytes(self, stats: RoundStats) -> None:
        raise NotImplementedError

    def _apply_version(self, weight_version: str | None) -> str | None:
        raise NotImplementedError

    @property
    def weight_version(self) -> str | None:
        raise NotImplementedError

    def checksums(self) -> dict[str, str]:
        """SHA-256 of every parameter this party holds (or would send)."""
        raise NotImplementedError


class ReceiverService(EngineService):
    """A receiver daemon: holds the live weights and one receive engine."""

    role = "receiver"

    def __init__(self, store: WeightStore | None = None, **kwargs):
        super().__init__(**kwargs)
        self.store = store if store is not None else WeightStore.empty()
        self._applied = 0
        self.metrics.weights_bytes.set(self.store.nbytes)

    def _transfer(self, info: UpdateInfo) -> RoundStats:
        return self.transport.receive(self.store, info)

    def _end_round(self, failure: str) -> None:
        # An unfinished round whose update already landed (aborted after it, or left when a
        # restarted operator closes the group) put its bytes in the weights under the old label.
        if self.round is not None and self.round.stats:
            self._set_intact(False)
        super()._end_round(failure)

    def checksums(self) -> dict[str, str]:
        return self.store.checksums()

    def _count_bytes(self, stats: RoundStats) -> None:
        self.metrics.received_bytes.inc(stats.payload_bytes)
        self.metrics.weights_bytes.set(self.store.nbytes)

    def _apply_version(self, weight_version: str | None) -> str | None:
        self._applied += 1
        label = str(weight_version) if weight_version is not None else str(self._applied)
        with self.store.lock:
            self.store.version = label
        self.metrics.weight_version.set(numeric_version(label, self._applied))
        return label

    @property
    def weight_version(self) -> str | None:
        return self.store.version

    async def seed(self, info: InitInfo) -> RoundStats:
        """Send this daemon's weights to late joiners: host a one-off group as its rank 0, send
        once, leave it. Its own group is left alone; refused (409) during a round here."""
        async with self._phase_lock:
            try:
                if self.phase == Phase.UPDATING:
                    raise PhaseError("a round is in progress here")
                if self.store.version is None or not len(self.store) or not self.weights_intact:
                    raise PhaseError("no finished, intact version here to seed from")
                if (info.backend or self.backend) != self.backend:
                    raise ProtocolError("init_info.backend", f"this daemon runs the {self.backend} backend")
                if info.rank_offset != 0:
                    raise ProtocolError("init_info.rank_offset", "the seeding daemon is rank 0")
                stats = await self._in_worker(self._seed, info)
                self.metrics.sent_bytes.inc(stats.payload_bytes)
                return stats
            except Exception as error:
                self._fail(error)
                raise

    def _seed(self, info: InitInfo) -> RoundStats:
        transport = get_transport(self.backend).connect(info, 0, self.device)
        try:
            with self.store.lock:
                return transport.send(list(self.store.items()))
        finally:
            transport.close()


class SenderService(EngineService):
    """The trainer's agent: rank 0 of the group; `update` sends what `source()` yields."""

    role = "trainer"

    def __init__(self, source: Callable[[], Iterable[tuple[str, torch.Tensor]]], **kwargs):
        super().__init__(**kwargs)
        self.source = source
        self.version: str | None = None

    def _own_rank(self, info: InitInfo) -> int:
        return 0

    def _check_rank(self, info: InitInfo) -> None:
        if info.rank_offset != 0:
            raise ProtocolError("init_info.rank_offset", "the trainer is rank 0")

    def _transfer(self, info: UpdateInfo) -> RoundStats:
        return self.transport.send(self.source())

    def checksums(self) -> dict[str, str]:
        return {name: tensor_digest(tensor) for name, tensor in self.source()}

    def _count_bytes(self, stats: RoundStats) -> None:
        self.metrics.sent_bytes.inc(stats.payload_bytes)

    def _apply_version(self, weight_version: str | None) -> str | None:
        self.version = str(weight_version) if weight_version is not None else self.version
        self.metrics.weight_version.set(numeric_version(self.version, 0))
        return self.version

    @property
    def weight_version(self) -> str | None:
        return self.version

