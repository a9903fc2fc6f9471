"""Drives the four-phase protocol across a trainer and its target daemons. No Kubernetes here:
the kopf operator and the local demo both run this same coordinator.

A sync round: pause targets → start everyone → update (the trainer sends while every target
receives) → finish with the version → resume. Each party moves at its own pace from its pause
to its start and from its finish to its resume (a daemon takes each pair in one call: fewer
requests, and no round trip between a finish and its resume); the only barriers are where the
protocol needs one: the update is sent once every party started (a collective needs every
member, and no target may receive while it serves), and finishing waits for every update to
have landed. Every step has its own timeout; a failed round is aborted on every party, targets
are resumed, and the result says which party failed and why.

A round may tolerate lost targets (`sync(version, max_failed=k)`): when it fails and at most k
targets no longer answer (dead, or hung), the group is formed again without them and the same
version sent again at once, while the trainer still serves its tensors; the result names the
targets left out (`SyncResult.left_out`). A collective aborts for every member when one dies, so
the survivors' round has to be sent again on a group of their own. With k = 0 (strict) a round
fails as a whole, as before.

Targets are weightsync daemons or vLLM servers (`Endpoint.kind`); each is driven through its
kind's client (`client.py`), which also says how what vLLM lacks (abort, seed, a group phase in
its health) degrades. A vLLM server with tensor parallelism takes one rank per worker: its
`/get_world_size` decides how many ranks its offset reserves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

import aiohttp

from weightsync.protocol import InitInfo, PauseMode
from weightsync_operator.backends import relays_update_info
from weightsync_operator.client import (Endpoint, PartyClient, PartyError, PartyHttp, Progress, party_client,
                                        party_session)

log = logging.getLogger("weightsync.coordinator")


@dataclass(frozen=True)
class Timeouts:
    """Seconds each step may take before the round is declared failed."""

    request: float = 10.0  # small calls: world size, health, pause, resume, abort
    init: float = 120.0
    start: float = 30.0
    update: float = 600.0
    finish: float = 30.0


@dataclass(frozen=True)
class SyncSpec:
    backend: str = "cpu"
    master_address: str = "127.0.0.1"  # where the trainer hosts the rendezvous
    master_port: int = 29500
    packed_buffer_size_bytes: int = 1 << 30
    packed_num_buffers: int = 2
    pause_mode: PauseMode | None = "keep"  # None: the targets are not paused (daemons only)
    group_name: str = "weightsync"
    # How long a collective may wait for a peer; below the update timeout so that parties report
    # their own failure before the coordinator gives up on them.
    transfer_timeout: float = 60.0
    verify: bool = True  # checksum every round's stream, verified by every target
    atomic: bool = False  # targets switch weights only after the whole round verified
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass
class PartyOutcome:
    name: str
    role: Literal["trainer", "target"]
    rank: int
    ok: bool = True
    step: str | None = None  # the step that failed
    reason: str | None = None
    weight_version: str | None = None


@dataclass
class GroupInfo:
    world_size: int
    ranks: dict[str, int]  # each party's first rank (its rank offset)
    master_address: str
    master_port: int
    name: str


@dataclass
class SyncResult:
    version: str
    ok: bool
    bytes: int = 0
    transfer_seconds: float = 0.0  # the update step: data in flight
    total_seconds: float = 0.0  # pause to resume
    started_at: str = ""
    finished_at: str = ""
    reason: str | None = None
    checksum: str | None = None  # the round's stream checksum, verified by every target
    parties: list[PartyOutcome] = field(default_factory=list)
    # Targets lost during the round (max_failed > 0) and why; the round was sent again without
    # them, and `ok` says whether that round went live on the others.
    left_out: dict[str, str] = field(default_factory=dict)
    attempts: int = 1

    @property
    def gbps(self) -> float:
        return self.bytes / self.transfer_seconds / 1e9 if self.transfer_seconds > 0 else 0.0

    @property
    def targets(self) -> list[PartyOutcome]:
        return [p for p in self.parties if p.role == "target"]


class InitError(Exception):
    def __init__(self, failures: list[PartyError]):
        super().__init__("; ".join(str(f) for f in failures))
        self.failures = failures


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def group_init_info(spec: SyncSpec, master_address: str, master_port: int, world_size: int, group_name: str,
                    atomic: bool) -> InitInfo:
    """The init body every party of a group gets, its rank offset aside (`at_offset`). Built from
    the wire's own model, so that a spec no party would accept fails here, once, naming the field."""
    return InitInfo(
        backend=spec.backend, master_address=master_address, master_port=master_port, world_size=world_size,
        group_name=group_name, packed=True, packed_buffer_size_bytes=spec.packed_buffer_size_bytes,
        packed_num_buffers=spec.packed_num_buffers, timeout_seconds=spec.transfer_timeout,
        init_timeout_seconds=spec.timeouts.init, verify=spec.verify, atomic=atomic,
    )


def at_offset(info: InitInfo, rank_offset: int) -> InitInfo:
    """One party's init body: the group's, with the party's first rank."""
    return info.model_copy(update={"rank_offset": rank_offset})


class Coordinator:
    def __init__(self, trainer: Endpoint, targets: list[Endpoint], spec: SyncSpec,
                 http: PartyHttp | None = None, token: str | None = None):
        if not targets:
            raise ValueError("a group needs at least one target")
        if trainer.kind != "daemon":
            raise ValueError(f"{trainer.name}: the trainer is a weightsync agent, not a {trainer.kind} server")
        unpausable = [t.name for t in targets if t.kind == "vllm"]
        if spec.pause_mode is None and unpausable:
            raise ValueError(f"pause_mode none cannot drive vLLM targets ({', '.join(unpausable)}): vLLM's "
                             f"layerwise reload empties the layers it loads, so it must not serve during an update")
        self.spec = spec
        self._own_http = http is None
        self._http = http or party_session()
        self.trainer = party_client(trainer, self._http, token)
        self.targets = [party_client(t, self._http, token) for t in targets]
        self.group: GroupInfo | None = None
        self.needs_init = False

    async def close(self) -> None:
        if self._own_http and isinstance(self._http, aiohttp.ClientSession):  # party_session()'s
            await self._http.close()

    async def __aenter__(self) -> "Coordinator":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def parties(self) -> list[PartyClient]:
        return [self.trainer, *self.targets]

    # -- init -------------------------------------------------------------------------------
    async def init(self) -> GroupInfo:
        """Ask each target its world size, assign rank offsets, and init every party at once."""
        t = self.spec.timeouts
        sizes = await self._all(lambda p: p.world_size(t.request), self.targets)
        failures = [s for s in sizes if isinstance(s, PartyError)]
        if failures:
            raise InitError(failures)
        ranks, offset = {self.trainer.name: 0}, 1
        for party, size in zip(self.targets, sizes, strict=True):
            ranks[party.name] = offset
            offset += size
        # A fresh name per init: parties tell a new group from a repeated init, and keys of an
        # earlier group in the rendezvous store can never be mistaken for this one's.
        name = f"{self.spec.group_name}-{secrets.token_hex(4)}"
        group = GroupInfo(offset, ranks, self.spec.master_address, self.spec.master_port, name)
        base = group_init_info(self.spec, group.master_address, group.master_port, group.world_size, name,
                               atomic=self.spec.atomic)
        # Once one party has refused, the others would only wait out their rendezvous: give up soon.
        results = await self._all(lambda p: p.init(at_offset(base, ranks[p.name]), t.init), self.parties,
                                  grace=t.request)
        failures = [r for r in results if isinstance(r, PartyError)]
        if failures:
            raise InitError(failures)
        self.group = group
        self.needs_init = False
        # A round interrupted before its resume (the coordinator restarted, say) may have left
        # targets paused: a fresh group starts with every target serving again.
        if self.spec.pause_mode is not None:
            await self._all(lambda p: p.resume(t.request), self.targets)
        return group

    # -- one round ----------------------------------------------------------------------------
    async def sync(self, version: str | int, max_failed: int = 0) -> SyncResult:
        """One round of `version` on every target. With `max_failed` > 0 a failed round whose
        lost targets (`lost_targets`) number at most `max_failed` goes again without them, on a
        group formed afresh, until it lands on the rest or the budget is spent."""
        began = time.perf_counter()
        result = await self._sync_once(version)
        left_out: dict[str, str] = {}
        while not result.ok and max_failed > len(left_out):
            lost = await self.lost_targets(result)
            if not lost or len(left_out) + len(lost) > max_failed or len(lost) >= len(self.targets):
                break
            left_out.update(lost)
            log.warning("version %s: leaving out %s and sending it again", version, ", ".join(lost))
            self.targets = [t for t in self.targets if t.name not in lost]
            try:
                await self.init()
            except InitError as error:
                result.reason = f"{result.reason}; re-forming the group without {', '.join(lost)} failed: {error}"
                break
            retry = await self._sync_once(version)
            retry.parties += [p for p in result.parties if p.name in left_out and p.name not in
                              {q.name for q in retry.parties}]
            retry.attempts = result.attempts + 1
            retry.started_at = result.started_at
            result = retry
        result.left_out = left_out
        result.total_seconds = time.perf_counter() - began
        return result

    async def lost_targets(self, result: SyncResult) -> dict[str, str]:
        """Targets of a failed round that no longer answer their health check (dead or hung),
        with their own failure; the trainer is never among them (a round without it is none)."""
        timeout = self.spec.timeouts.request
        answers = await self._all(lambda p: p.health(timeout), self.targets)
        reasons = {o.name: f"{o.step}: {o.reason}" for o in result.parties if not o.ok}
        return {party.name: reasons.get(party.name) or str(answer)
                for party, answer in zip(self.targets, answers, strict=True) if isinstance(answer, PartyError)}

    async def _sync_once(self, version: str | int) -> SyncResult:
        if self.group is None:
            raise RuntimeError("init() the group before syncing")
        version = str(version)
        if self.needs_init:  # the last round broke the data plane: rendezvous afresh first
            try:
                await self.init()
            except InitError as error:
                return SyncResult(version=version, ok=False, started_at=_now(), finished_at=_now(),
                                  reason=f"re-initialising the group failed: {error}")
        t = self.spec.timeouts
        result = SyncResult(version=version, ok=False, started_at=_now())
        result.parties = [PartyOutcome(p.name, "trainer" if p is self.trainer else "target",
                                       self.group.ranks[p.name]) for p in self.parties]
        outcome = {o.name: o for o in result.parties}
        progress = {p.name: Progress.NOT_STARTED for p in self.parties}  # what a failure must undo
        began = time.perf_counter()
        pausing = self.spec.pause_mode is not None
        resumed: set[str] = set()  # targets already resumed by their own finish → resume pipeline
        try:
            # Each party goes from its pause straight to its start; the update waits for all of
            # them (a collective needs every member, and no target may receive while serving).
            await self._pipeline(outcome, self.parties, lambda p, at: self._prepare(p, at, progress))
            sent = time.perf_counter()
            answers = await self._update(outcome, progress)
            result.transfer_seconds = time.perf_counter() - sent
            result.bytes = int(answers[0]["bytes"])
            result.checksum = answers[0].get("checksum") or answers[-1].get("checksum")
            # Each party goes from its finish straight to its resume: a target that finished
            # serves the new version whatever the others do (a failed round never undoes it).
            finished = await self._pipeline(
                outcome, self.parties,
                lambda p, at: self._finish_and_resume(p, at, version, progress, pausing, outcome, resumed))
            for party, answer in zip(self.parties, finished, strict=True):
                outcome[party.name].weight_version = answer.get("weight_version")
            result.ok = True
        except _RoundFailed as failed:
            result.reason = failed.reason
            # Once payload may have moved, a collective may be half-done on some party: the group
            # cannot be trusted for another round, so the next sync re-initialises it.
            self.needs_init = failed.step in ("update", "finish")
            reason = failed.reason
            aborted = await self._all(lambda p: p.abort(reason, t.request, progress[p.name], version),
                                      self.parties)
            for party, answer in zip(self.parties, aborted, strict=True):
                # A vLLM target says what its weights are once its session is closed.
                if isinstance(answer, dict) and "weight_version" in answer:
                    outcome[party.name].weight_version = answer["weight_version"]
        finally:
            # Every target not resumed yet, also those whose pause failed half-way: resume is idempotent.
            pending = [p for p in self.targets if p.name not in resumed]
            if pausing and pending:
                await self._step(outcome, "resume", pending, lambda p: p.resume(t.request), strict=False)
        result.total_seconds = time.perf_counter() - began
        result.finished_at = _now()
        return result

    async def _prepare(self, party: PartyClient, at: dict[str, str], progress: dict[str, Progress]) -> dict:
        """One party's way into the round: its pause (targets), then its start. A daemon takes
        both in one call (its start needs only its group phase, not the pause); vLLM gets one
        call at a time (see client.py). Either way the update is sent only once every party is
        through."""
        t, mode = self.spec.timeouts, self.spec.pause_mode
        if mode is None or party is self.trainer:
            at[party.name], progress[party.name] = "start", Progress.STARTED
            return await party.start(t.start)
        at[party.name] = "pause"
        if party.combines_steps:
            progress[party.name] = Progress.STARTED
            try:
                answer = await party.start(max(t.start, t.request), pause=mode)
            except PartyError as error:
                at[party.name] = error.step  # its pause, unless the party said its start failed
                raise
            if answer.get("paused") is not True:  # it did not know the parameter: pause it now
                await party.pause(mode, t.request)
            return answer
        await party.pause(mode, t.request)
        at[party.name], progress[party.name] = "start", Progress.STARTED
        return await party.start(t.start)

    async def _finish_and_resume(self, party: PartyClient, at: dict[str, str], version: str,
                                 progress: dict[str, Progress], pausing: bool,
                                 outcome: dict[str, PartyOutcome], resumed: set[str]) -> dict:
        """One party's way out of the round: its finish, then (a paused target) its resume, in
        one call where the party takes both at once (a daemon). A failed resume does not fail
        the round (the weights are live); it is recorded."""
        t = self.spec.timeouts
        at[party.name] = "finish"
        resuming = pausing and party is not self.trainer
        if resuming and party.combines_steps:
            answer = await party.finish(version, max(t.finish, t.request), resume=True)
        else:
            answer = await party.finish(version, t.finish)
        progress[party.name] = Progress.FINISHED
        if resuming:
            if answer.get("resumed") is False:
                self._record(outcome, "resume", [PartyError(party.name, "resume",
                                                            str(answer.get("resume_error") or "failed"))])
            elif answer.get("resumed") is not True:  # separately (vLLM; a daemon without the parameter)
                try:
                    await party.resume(t.request)
                except PartyError as error:
                    self._record(outcome, "resume", [error])
            resumed.add(party.name)  # not when given up on mid-resume: the round's end resumes it
        return answer

    async def _pipeline(self, outcome: dict[str, PartyOutcome], parties: list[PartyClient],
                        chain: Callable[[PartyClient, dict[str, str]], Awaitable[dict]]) -> list[dict]:
        """Run each party's chain of steps concurrently, every party at its own pace; any failure
        ends the round once the others had their grace (a collective needs every member). `chain`
        notes in its second argument the step each party is in, which names a failure."""
        at: dict[str, str] = {}
        answers = await self._all(lambda p: chain(p, at), parties, grace=self.spec.timeouts.request)
        failed = [a for a in answers if isinstance(a, PartyError)]
        for error in failed:
            self._record(outcome, at.get(error.party, "call"), [error])
        if failed:
            step = next(at.get(e.party, "call") for e in failed)
            raise _RoundFailed(step, "; ".join(str(e) for e in failed))
        return answers

    @staticmethod
    def _record(outcome: dict[str, PartyOutcome], step: str, failed: list[PartyError]) -> None:
        for error in failed:
            party = outcome[error.party]
            if party.ok:  # keep the first failure of each party
                party.ok, party.step, party.reason = False, step, error.reason

    async def _update(self, outcome: dict[str, PartyOutcome], progress: dict[str, Progress]) -> list[dict]:
        """The update step. Collective transports (cpu, nccl): every party at once, the trainer
        sends while the targets receive. ipc/p2p: the targets read the trainer's memory, so the
        trainer answers first with the handles (`update_info`), which every target then gets;
        repeated while the trainer says `more` (bounded staging). Answers: trainer's, then targets'.
        A party whose (last) batch succeeded is marked LANDED in `progress`, also when the round fails."""
        timeout = self.spec.timeouts.update
        if not relays_update_info(self.spec.backend):  # torch-free: the coordinator never loads a transport
            return await self._step(outcome, "update", self.parties, lambda p: p.update({}, timeout),
                                    progress=progress, reached=Progress.LANDED)
        moved = 0
        while True:
            (sent,) = await self._step(outcome, "update", [self.trainer], lambda p: p.update({}, timeout))
            info = sent.get("update_info")
            if not isinstance(info, dict):
                raise _RoundFailed("update", f"{self.trainer.name}: its answer carries no update_info to relay")
            last = not sent.get("more")
            received = await self._step(outcome, "update", self.targets,
                                        functools.partial(PartyClient.update, update_info=info, timeout=timeout),
                                        progress=progress if last else None, reached=Progress.LANDED)
            moved += int(sent.get("bytes", 0))
            if last:
                return [{**sent, "bytes": moved}, *received]

    async def _step(self, outcome: dict[str, PartyOutcome], step: str, parties: list[PartyClient],
                    call: Callable[[PartyClient], Awaitable[dict]], strict: bool = True,
                    progress: dict[str, Progress] | None = None, reached: Progress | None = None) -> list[dict]:
        """Run one step on every party concurrently; on any failure mark the failed parties and
        (when strict) end the round, since a collective needs every member. With `progress`,
        each party whose call succeeded has `reached` that point."""
        answers = await self._all(call, parties, grace=self.spec.timeouts.request if strict else None)
        if progress is not None and reached is not None:
            progress.update({p.name: reached for p, a in zip(parties, answers, strict=True)
                             if not isinstance(a, PartyError)})
        failed = [a for a in answers if isinstance(a, PartyError)]
        self._record(outcome, step, failed)
        if failed and strict:
            raise _RoundFailed(step, "; ".join(str(e) for e in failed))
        return answers

    @staticmethod
    async def _all(call: Callable[[PartyClient], Awaitable], parties: list[PartyClient],
                   grace: float | None = None) -> list:
        """Call every party at once; failures come back as PartyError values, not raised.

        With `grace`, once one party has failed the others get `grace` more seconds, then are
        given up on: a collective cannot succeed without the party that failed.
        """
        async def one(party: PartyClient):
            try:
                return await call(party)
            except PartyError as error:
                return error

        tasks = [asyncio.ensure_future(one(p)) for p in parties]
        if grace is None:
            return list(await asyncio.gather(*tasks))
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(isinstance(t.result(), PartyError) for t in done):
                if pending:
                    await asyncio.wait(pending, timeout=grace)
                break
        answers = []
        for party, task in zip(parties, tasks, strict=True):
            if task.done():
                answers.append(task.result())
            else:
                task.cancel()
                answers.append(PartyError(party.name, "call", "given up: another party already failed"))
        return answers


class _RoundFailed(Exception):
    def __init__(self, step: str, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason
