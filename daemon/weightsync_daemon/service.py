"""The protocol's state machine for one party, with no HTTP in it.

Phases: uninitialized → (init) → ready → (start) → updating → (update …) → (finish) → ready.
Calls out of order raise PhaseError (HTTP 409). Blocking transport work runs on one dedicated
thread, never on the event loop, and is bounded by the group's timeout.

One call at a time (`_Gate`): a call that arrives while another is being served is refused at
once (`Busy`, HTTP 409, naming the call in progress) instead of queueing behind it, so a client's
retry of /update_weights can never disturb, or outlive, the round in flight. Only init and close
may wait for the call in progress to end, one waiter at a time and for a bounded time; abort never
waits: it cancels a pending init at once, and ends a round whose update is in flight as soon as
that update returns.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from weightsync.errors import ManifestMismatch, PhaseError, ProtocolError, TransferError
from weightsync.metrics import failure_reason, numeric_version
from weightsync.protocol import InitInfo, UpdateInfo
from weightsync.rendezvous import JoinCancelled, cancellable
from weightsync.source import WeightSource, adapt, is_source
from weightsync.store import WeightStore, tensor_digest
from weightsync.transports import RoundStats, Transport, default_device, get_transport
from weightsync_daemon.metrics import DaemonMetrics

log = logging.getLogger("weightsync.daemon")

PauseHook = Callable[[str], None]
ResumeHook = Callable[[], None]


class Phase(enum.StrEnum):
    UNINITIALIZED = "uninitialized"
    READY = "ready"
    UPDATING = "updating"



@dataclass
class RoundState:
    started_at: float
    last_activity: float
    stats: list[RoundStats]
    number: int = 0  # this party's count of rounds started, to name the round in a 409


class Busy(PhaseError):
    """Another call is being served: refused at once (HTTP 409), never queued behind it."""


class ClientGone(PhaseError):
    """The caller disconnected before its call could act: the call does nothing."""


async def _first(*events: asyncio.Event | None) -> None:
    """Wait until any of `events` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events if e is not None]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


class _Gate:
    """Admits one protocol call at a time; see the module docstring."""

    def __init__(self) -> None:
        self.holder: str | None = None
        self.waiter: str | None = None
        self._since = 0.0
        self._released = asyncio.Event()

    def describe(self) -> str:
        return f"{self.holder} is in progress ({time.monotonic() - self._since:.1f}s so far)"

    @asynccontextmanager
    async def hold(self, what: str, wait: float = 0.0, gone: asyncio.Event | None = None) -> AsyncIterator[None]:
        """Serve `what`; if a call is in progress, refuse at once, or wait up to `wait` seconds
        when allowed and nobody else waits. `gone` set (the caller's client left): give up."""
        if gone is not None and gone.is_set():
            raise ClientGone(f"the client left before {what} could run; it did nothing")
        if self.holder is not None:
            if wait <= 0 or self.waiter is not None:
                queued = f"; {self.waiter} waits for it" if self.waiter else ""
                raise Busy(f"busy: {self.describe()}{queued}; {what} was refused, retry once it ends")
            self.waiter = what
            try:
                async with asyncio.timeout(wait):
                    while self.holder is not None:
                        if gone is not None and gone.is_set():
                            raise ClientGone(f"the client left while {what} waited; it did nothing")
                        self._released.clear()
                        await _first(self._released, gone)
            except TimeoutError:
                raise Busy(f"busy: {self.describe()}; {what} waited {wait:g}s for it to end") from None
            finally:
                self.waiter = None
        self.holder, self._since = what, time.monotonic()
        try:
            yield
        finally:
            self.holder = None
            self._released.set()


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
        self._gate = _Gate()
        self._join_cancel: threading.Event | None = None  # set: the pending init gives up
        self._join_cancel_reason = ""
        self._joining = "init"  # the call whose join `_join_cancel` cancels (init or seed)
        self._abort_requested: str | None = None  # an abort that came while an update was in flight
        self._rounds = 0

    # -- helpers --------------------------------------------------------------------------
    @property
    def call_in_progress(self) -> bool:
        """Whether a protocol call (e.g. an update moving bytes) is being served right now."""
        return self._gate.holder is not None

    def describe_call(self) -> str:
        """The call in progress and for how long, for a 409 that names it."""
        return self._gate.describe()

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

    def _in_round(self) -> RoundState:
        """The round in progress (phase updating)."""
        if self.round is None:
            raise PhaseError("no round in progress: call /start_weight_update first")
        return self.round

    def _joined(self) -> Transport:
        """This party's transport (once initialized)."""
        if self.transport is None:
            raise PhaseError("not initialized: call /init_weight_transfer_engine first")
        return self.transport

    def _round_is_stale(self) -> bool:
        if self.round is None or self.init_info is None:
            return False
        return time.monotonic() - self.round.last_activity > self.init_info.timeout_seconds

    # -- phases ---------------------------------------------------------------------------
    async def init(self, info: InitInfo, gone: asyncio.Event | None = None) -> str:
        """Join the group `info` names. Bounded by its init_timeout_seconds (waiting for a call in
        progress, resolving, connecting and joining together); abort, close, or `gone` (its
        client left) cancel it."""
        began = time.monotonic()
        try:
            async with self._gate.hold(f"init of group {info.group_name}", info.init_timeout_seconds, gone):
                self._require(Phase.UNINITIALIZED, Phase.READY)
                if info == self.init_info:
                    raise PhaseError("already initialized with this init_info; re-initialize with another "
                                     "group_name or rendezvous")
                backend = info.backend or self.backend
                if backend != self.backend:
                    raise ProtocolError("init_info.backend",
                                        f"this daemon runs the {self.backend} backend, not {backend}")
                self._check_rank(info)
                self._check_rendezvous(info, backend)
                left = info.init_timeout_seconds - (time.monotonic() - began)
                if left <= 0:
                    raise TransferError(f"init_timeout_seconds ({info.init_timeout_seconds:g}s) passed "
                                        "waiting for the call in progress to end")
                if left < info.init_timeout_seconds:  # the join gets what is left of the budget
                    info_for_join = info.model_copy(update={"init_timeout_seconds": left})
                else:
                    info_for_join = info
                with self._timed("init"):
                    # Join the new group before leaving the old one: the trainer's rendezvous
                    # server on the same port then carries straight over to the new group.
                    joined = await self._join(get_transport(backend), info_for_join, gone)
                    await self._in_worker(self._close_transport)
                    self.transport = joined
                self.init_info = info
                self.phase = Phase.READY
                self.last_failure = None
                return f"joined group {info.group_name} as rank {self._own_rank(info)} of {info.world_size}"
        except Exception as error:
            self._fail(error)
            raise

    async def _join(self, cls: type[Transport], info: InitInfo, gone: asyncio.Event | None,
                    rank: int | None = None, what: str = "init") -> Transport:
        """`cls.connect` on the worker thread as `rank` (this party's own by default), cancellable:
        `_cancel_join` (abort, close), `gone` or a cancelled caller make the join give up within a
        poll interval. `what` names the call that joins (init, seed) in the 409 that says so."""
        cancel = self._join_cancel = threading.Event()
        self._join_cancel_reason = ""
        self._joining = what
        rank = self._own_rank(info) if rank is None else rank

        def connect() -> Transport:
            with cancellable(cancel):
                return cls.connect(info, rank, self.device)

        future = asyncio.get_running_loop().run_in_executor(self._worker, connect)
        try:
            if gone is not None:
                watch = asyncio.ensure_future(gone.wait())
                try:
                    waiting: set[asyncio.Future[Any]] = {future, watch}
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    watch.cancel()
                if not future.done():
                    self._cancel_join("its client disconnected")
            return await asyncio.shield(future)
        except JoinCancelled:
            raise PhaseError(f"{what} of group {info.group_name} was cancelled: {self._join_cancel_reason}") from None
        except asyncio.CancelledError:
            cancel.set()  # the caller gave up: a group joined after all is left again
            future.add_done_callback(self._leave_late_join)
            raise
        finally:
            self._join_cancel = None

    def _leave_late_join(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._worker.submit(future.result().close)

    def _cancel_join(self, reason: str) -> bool:
        """Make a pending init or seed give up (it answers 409 naming `reason`); whether one was pending."""
        if self._join_cancel is None or self._join_cancel.is_set():
            return False
        self._join_cancel_reason = reason
        self._join_cancel.set()
        return True

    def _own_rank(self, info: InitInfo) -> int:
        return info.rank_offset

    @staticmethod
    def _check_rendezvous(info: InitInfo, backend: str) -> None:
        """A caller's error found before joining (422), not 503 seconds later: the rendezvous
        must be one the backend joins by."""
        if info.nccl_unique_id_b64 is not None and not get_transport(backend).joins_by_unique_id:
            raise ProtocolError("init_info.nccl_unique_id_b64",
                                f"the {backend} backend joins over master_address/master_port; an NCCL "
                                "unique id is only for the nccl backend")

    def _check_rank(self, info: InitInfo) -> None:
        if info.trainer_ranks is None:
            if info.rank_offset == 0:
                raise ProtocolError("init_info.rank_offset", "rank 0 is the trainer's; receivers start at 1")
            return
        # A planned group (weightsync.planned_api): the trainer's ranks first, every one a sender.
        if info.rank_offset < info.trainer_ranks:
            raise ProtocolError("init_info.rank_offset", f"ranks 0..{info.trainer_ranks - 1} are the trainer's "
                                                         f"(init_info.trainer_ranks); receivers start at "
                                                         f"{info.trainer_ranks}")
        if self.backend != "cpu":
            raise ProtocolError("init_info.trainer_ranks", f"a planned round runs over the cpu backend only; "
                                                           f"this daemon runs {self.backend}")

    async def start(self) -> str:
        try:
            async with self._gate.hold("start_weight_update"):
                if self.phase == Phase.UPDATING and self._round_is_stale() and self.init_info is not None:
                    log.warning("abandoning a round with no activity for %ss", self.init_info.timeout_seconds)
                    self._end_round(f"abandoned: no activity for {self.init_info.timeout_seconds}s")
                self._require(Phase.READY)
                with self._timed("start"):
                    now = time.monotonic()
                    self._rounds += 1
                    self.round = RoundState(now, now, [], self._rounds)
                    self._abort_requested = None
                    self.phase = Phase.UPDATING
                    if self.transport is not None:
                        self.transport.begin_round()  # e.g. ipc: a fresh round, not a continued one
                return "weight update started"
        except Exception as error:
            self._fail(error)
            raise

    def own_update_info(self, infos: list[UpdateInfo]) -> UpdateInfo:
        """This worker's entry of an update_info list indexed by global worker rank (vLLM:
        dp_rank x workers per engine + rank; one worker per daemon, whose global worker rank is
        rank_offset - 1 since the trainer holds rank 0, or rank_offset - trainer_ranks in a planned
        group, whose trainer holds ranks 0..trainer_ranks-1). A one-entry list is this engine's own."""
        if len(infos) == 1:
            return infos[0]
        if not infos:
            raise ProtocolError("update_info", "an empty list names no worker's update")
        if self.init_info is None:
            raise PhaseError(f"update_info is a list of {len(infos)}, indexed by worker rank, and this "
                             "daemon has no rank until init")
        index = self._worker_index(self.init_info)
        if index >= len(infos):
            raise ProtocolError("update_info", f"has {len(infos)} entries, but this worker's is entry {index} "
                                               f"(rank_offset {self.init_info.rank_offset} - "
                                               f"{self.init_info.trainer_ranks or 1})")
        return infos[index]

    def _worker_index(self, info: InitInfo) -> int:
        return info.rank_offset - (info.trainer_ranks or 1)

    def _check_body(self, info: UpdateInfo) -> None:
        """What the party can check of an update body before taking part in the round."""

    async def update(self, info: UpdateInfo) -> RoundStats:
        number = self.round.number if self.round is not None else self._rounds
        try:
            async with self._gate.hold(f"an update of round {number}"):
                self._require(Phase.UPDATING)
                try:
                    self._check_body(info)
                except ProtocolError as refusal:
                    await self._refuse_in_round(refusal)
                try:
                    with self._timed("update"):
                        stats = await self._in_worker(self._transfer, info)
                    self._in_round().stats.append(stats)
                    self._in_round().last_activity = time.monotonic()
                    self._count_bytes(stats)
                except (ManifestMismatch, TransferError) as error:
                    # The round is over. The weights keep the last finished version, unless part
                    # of this round already landed in them: then say so until a round succeeds.
                    if self.phase == Phase.UPDATING:
                        if getattr(error, "weights_touched", False):
                            self._set_intact(False)
                        self._end_round(f"{failure_reason(error)}: {error}")
                    raise
                finally:
                    self._end_if_aborted()
                return stats
        except Exception as error:
            self._fail(error)
            raise

    async def refuse(self, refusal: ProtocolError) -> NoReturn:
        """An /update_weights whose body this party refused (422, naming the field): during a
        round, the refusal is this party's verdict on it. It takes the round's place in the
        transfer only to object (`Transport.refuse_round`), so the trainer and every other party
        fail the round at once naming the field, instead of waiting `timeout_seconds` for a party
        that never comes, and the group runs the next round without a re-init. Outside a round,
        or while another call is served (that call is this party's part in the round), it is a
        plain 422. Raises `refusal` either way."""
        number = self.round.number if self.round is not None else self._rounds
        try:
            async with self._gate.hold(f"a refused update of round {number}"):
                if self.phase == Phase.UPDATING:
                    await self._refuse_in_round(refusal)
        except Busy:
            pass
        except ProtocolError as raised:
            if raised is not refusal:
                raise
        self._fail(refusal)
        raise refusal

    async def _refuse_in_round(self, refusal: ProtocolError) -> NoReturn:
        """With the gate held, in a round: object in the transfer (bounded by the group's
        timeout), end the round here (nothing landed: the weights are as they were), raise."""
        if self.transport is not None:
            try:
                await self._in_worker(self.transport.refuse_round, f"update_weights refused: {refusal}")
            except ManifestMismatch:
                pass  # the expected end: every party saw the objection
            except TransferError as error:  # the group failed meanwhile (e.g. no trainer came)
                log.warning("a refused update could not reach the round's other parties: %s", error)
        self._end_round(f"refused: {refusal}")
        raise refusal

    def _end_if_aborted(self) -> None:
        """An abort arrived while the update ran: the round ends now that the update returned."""
        reason, self._abort_requested = self._abort_requested, None
        if reason is not None and self.phase == Phase.UPDATING:
            self._end_round(f"aborted: {reason}")
            raise PhaseError(f"the round was aborted while this update ran ({reason}); "
                             f"weights_intact is {str(self.weights_intact).lower()}")

    async def finish(self, weight_version: str | None) -> str | None:
        try:
            async with self._gate.hold("finish_weight_update"):
                self._require(Phase.UPDATING)
                if not self._in_round().stats:
                    raise PhaseError("no update landed in this round: finishing it would relabel unchanged "
                                     "weights; send an update, or abort the round")
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
        """End an unfinished round (the coordinator gave up on it); weights keep their version.

        Never waits: a pending init is cancelled, and a round whose update is in flight ends as
        soon as that update returns (bounded by the group's timeout)."""
        if self._cancel_join(f"aborted: {reason}"):
            return f"pending {self._joining} cancelled"
        if self.phase != Phase.UPDATING:
            return "no round in progress"
        if self._gate.holder is not None:
            self._abort_requested = reason
            return f"round aborting: it ends when the call in flight returns ({self._gate.describe()})"
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
        log.warning("round failed: %s", failure)  # /healthz shows it only to callers with the token
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
        self._cancel_join("the daemon is shutting down")
        await self._in_worker(self._close_transport)
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def _hold_wait(self) -> float:
        """How long close may wait for the call in progress: one collective timeout, plus slack."""
        return (self.init_info.timeout_seconds if self.init_info is not None else 30.0) + 5.0

    async def close(self, gone: asyncio.Event | None = None) -> str:
        """Leave the transfer group (the operator tears it down); the weights stay as they are.

        A pending init is cancelled; a call in flight (an update) is waited for, bounded, unless
        `gone` says the caller left meanwhile: then nothing happens."""
        if gone is not None and gone.is_set():
            raise ClientGone("the client left before close_weight_transfer_engine could run; it did nothing")
        self._cancel_join("the group was closed")
        async with self._gate.hold("close_weight_transfer_engine", self._hold_wait(), gone):
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
        return self._joined().receive(self.store, info)

    def _check_rank(self, info: InitInfo) -> None:
        super()._check_rank(info)
        if info.trainer_ranks is not None and not len(self.store):
            raise ProtocolError("init_info.trainer_ranks", "a receiver of a planned round states its needs from "
                                                           "its weights: shape them up front (--manifest)")

    def _check_body(self, info: UpdateInfo) -> None:
        # vLLM's sparse spelling names each patched parameter's shape: it must be the one held here.
        for name, shape in info.patched_shapes.items():
            if name not in self.store:
                raise ProtocolError("update_info.names", f"{name!r} is not a parameter held here")
            if tuple(self.store[name].shape) != shape:
                raise ProtocolError("update_info.shapes", f"{name!r} is {list(self.store[name].shape)} here, "
                                                          f"not {list(shape)}")

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

    async def seed(self, info: InitInfo, gone: asyncio.Event | None = None) -> RoundStats:
        """Send this daemon's weights to late joiners: host a one-off group as its rank 0, send
        once, leave it. Its own group is left alone; refused (409) during a round here. While it
        waits for the joiners (up to init_timeout_seconds), abort, close and `gone` (its client
        left) cancel it, as they cancel a pending init."""
        async with self._gate.hold("seed_weights", gone=gone):
            try:
                if self.phase == Phase.UPDATING:
                    raise PhaseError("a round is in progress here")
                if self.store.version is None or not len(self.store) or not self.weights_intact:
                    raise PhaseError("no finished, intact version here to seed from")
                if (info.backend or self.backend) != self.backend:
                    raise ProtocolError("init_info.backend", f"this daemon runs the {self.backend} backend")
                if info.rank_offset != 0:
                    raise ProtocolError("init_info.rank_offset", "the seeding daemon is rank 0")
                self._check_rendezvous(info, self.backend)
                transport = await self._join(get_transport(self.backend), info, gone, rank=0, what="seed")
                stats = await self._in_worker(self._seed, transport)
                self.metrics.sent_bytes.inc(stats.payload_bytes)
                return stats
            except Exception as error:
                self._fail(error)
                raise

    def _seed(self, transport: Transport) -> RoundStats:
        try:
            with self.store.lock:
                return transport.send(list(self.store.items()))
        finally:
            transport.close()


class SenderService(EngineService):
    """The trainer's agent: rank 0 of the group; `update` sends what `source()` yields."""

    role = "trainer"

    def __init__(self, source: Callable[[], WeightSource | Iterable[tuple[str, torch.Tensor]]], **kwargs):
        super().__init__(**kwargs)
        self.source = source
        self.version: str | None = None

    def _own_rank(self, info: InitInfo) -> int:
        return 0

    def _worker_index(self, info: InitInfo) -> int:
        raise ProtocolError("update_info", "the trainer is no inference worker: send it one update_info, not a list")

    def _check_rank(self, info: InitInfo) -> None:
        if info.rank_offset != 0:
            raise ProtocolError("init_info.rank_offset", "the trainer is rank 0")
        if info.trainer_ranks is not None:
            raise ProtocolError("init_info.trainer_ranks", "the trainer's agent sends alone, as rank 0; a planned "
                                                           "round's trainer ranks send with "
                                                           "WeightSender.init(init_info, sharded=True)")

    def _transfer(self, info: UpdateInfo) -> RoundStats:
        weights = adapt(self.source())  # a vLLM 0.33 WeightSource reads as a weightsync source
        if is_source(weights):  # metadata + iteration: streamed, one tensor materialized at a time
            return self._joined().send_source(weights)
        return self._joined().send(weights)

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

