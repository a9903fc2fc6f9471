"""One WeightSync's reconciliation: compare what is declared (spec, pods) with what was done
(status, the group in memory) and close the gap, one idempotent pass at a time.

A pass (under this WeightSync's lock, so passes never overlap):
  1. validate the spec (invalid: reported, and nothing happens until it changes);
  2. pick the members: exactly one ready trainer pod, at least one ready target pod;
  3. if the members or the group settings changed since the group was formed, or the group is
     broken (a round failed, a party lost its group): leave the old group on every party, bring
     late joiners to the current version from a peer that holds it, and init the new group
     (failure: `kopf.TemporaryError`: kopf runs the loop again after a delay that doubles with
     each failure in a row, up to MAX_BACKOFF);
  4. if `spec.version` is ahead of the last attempted version: run one sync round;
  5. every `recheck_interval`, ask every party's /healthz whether the group still stands.
Each step writes the status (phase, conditions, per-target state) and a Kubernetes Event, and
holds the `weightsync.dev/synced` condition of each target pod that carries that readiness gate
to its state: True only while it serves the current version (Synced), False while it is Joining,
Stale, Failed, restarted, or no longer a member, so that a Service routes only to synced pods.

With `spec.failurePolicy.maxFailed` = k > 0, one lost replica never fails the rest: a group is
formed without targets that do not answer (at most k), and a round that loses at most k targets
goes live on the others (the coordinator forms the group again without them and sends the same
version again while the trainer still waits in its push). The targets left out are Stale (their
readiness gate False) and the Degraded condition names them; once one answers again (its pod
restarted, or the health re-check reaches it) the group is formed again with it and it catches up
from a peer that holds the version, or with the next round.

A round that failed is not retried for the same version: the trainer's tensors move on once its
push returns, so a retry could send a half-updated model under the old label. The next version, or
a re-formed group with a catch-up, is the way forward. A round that was never concluded (the
operator restarted mid-round) is different: status still shows the older version while the
trainer still waits in its push with exactly those tensors, so a new operator runs it again.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

import kopf

from weightsync_operator.catchup import catch_up
from weightsync_operator.client import PartyClient, PartyHttp, party_client
from weightsync_operator.conditions import get_condition, set_condition
from weightsync_operator.coordinator import Coordinator, InitError, SyncResult, SyncSpec, Timeouts
from weightsync_operator.pods import SYNCED_CONDITION, PodRef, matches, select
from weightsync_operator.resource import (
    Phase, Rendezvous, SyncFigures, TargetStatus, WeightSyncSpec, WeightSyncSpecError, WeightSyncStatus,
    parse_spec, parse_status,
)
from weightsync_operator.waves import Fleet, roll_out

log = logging.getLogger("weightsync.operator")

StatusWriter = Callable[[dict], Awaitable[None]]
EventSink = Callable[[str, str, str], None]  # (type Normal|Warning, reason, message)
PodConditionSetter = Callable[[str, dict], Awaitable[None]]  # (pod name, condition)
MAX_BACKOFF = 10.0  # kopf's retry sleeps through changes: a fixed pod waits at most this long
ANNOUNCE_SYNCING_AFTER = 0.25  # seconds into a round before the status says Syncing


class Unchanged(enum.Enum):
    """The type of UNCHANGED: a part of the status a step leaves as it is (None would clear it)."""

    UNCHANGED = "unchanged"


UNCHANGED = Unchanged.UNCHANGED


class Reconciler:
    def __init__(self, namespace: str, name: str, http: PartyHttp, write_status: StatusWriter,
                 emit: EventSink, token: str | None = None, recheck_interval: float = 30.0,
                 set_pod_condition: PodConditionSetter | None = None):
        self.namespace, self.name = namespace, name
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()  # set when something this WeightSync depends on changed
        self.seen_generation: int | None = None  # the spec generation the loop last looked at
        self._http, self._token = http, token
        self._write, self._emit = write_status, emit
        self.recheck_interval = recheck_interval
        # Ours once loaded from the object (`_loaded`): the API's copy lags our writes.
        self.status = WeightSyncStatus()
        self._loaded = False
        self._written: dict | None = None
        self.coordinator: Coordinator | None = None
        self._formed_with: tuple | None = None
        self._broken = False
        self._members: dict[str, PodRef] = {}
        self._versions: dict[str, str | None] = {}  # target → the version its daemon reports
        self._problems: dict[str, tuple[str, str]] = {}  # target → (state, reason) of the last step
        self._left_out: dict[str, str] = {}  # members outside the formed group (failurePolicy), and why
        self._spec_invalid = False
        self._failures = 0  # init failures in a row: the retry's delay grows with them
        self._last_check = 0.0
        self._set_pod_condition = set_pod_condition
        self._gated: set[str] = set()  # target pods that carry the readiness gate
        self._gates: dict[str, bool] = {}  # pod → its synced condition, as last seen or set

    # -- the pass ---------------------------------------------------------------------------
    async def reconcile(self, body: Mapping, pods: Iterable[PodRef]) -> float | None:
        """One pass; returns seconds until the next re-check (None: wait for a change)."""
        async with self.lock:
            generation = (body.get("metadata") or {}).get("generation")
            if not self._loaded:
                self.status, self._loaded = parse_status(body.get("status")), True
            try:
                spec = parse_spec(body.get("spec"))
            except WeightSyncSpecError as error:
                await self._report_invalid(error, generation)
                self._spec_invalid = True
                log.warning("%s/%s: %s; waiting for the spec to change", self.namespace, self.name, error)
                return None  # the spec's next change wakes the loop
            if self._spec_invalid:  # fixed: form the group afresh, which rewrites the whole status
                self._spec_invalid = False
                await self._leave("the spec was fixed")
            pods = list(pods)
            trainers = select(pods, spec.trainer_selector)
            trainer_names = {p.name for p in trainers}
            targets = [p for p in select(pods, spec.target_selector) if p.name not in trainer_names]
            gated = [p for p in pods
                     if p.gated and p.name not in trainer_names and matches(spec.target_selector, p.labels)]
            self._gated = {p.name for p in gated}
            self._gates.update({p.name: bool(p.synced) for p in gated})  # the API's view (None: unset, False)
            if len(trainers) != 1 or not targets:
                await self._wait_for_pods(spec, trainers, targets, generation)
                return None  # pod events wake us
            trainer = trainers[0]
            sync_spec = self._sync_spec(spec, trainer)
            fingerprint = (sync_spec, (spec.strategy.type, spec.strategy.max_unavailable),
                           trainer.identity(spec.daemon_port), tuple(t.identity(spec.daemon_port) for t in targets))
            if self.coordinator is None or self._broken or fingerprint != self._formed_with:
                if not await self._form(spec, sync_spec, trainer, targets, fingerprint, generation):
                    return None  # a change of the spec or the pods wakes the loop
            elif time.monotonic() - self._last_check >= self.recheck_interval:
                await self._check_health(spec, generation)
                if self._broken:
                    return 0.0
            if spec.version > self._attempted():
                await self._sync(spec, generation)
                if self._broken:
                    return 0.0  # re-form right away, ready for the next version
            return self.recheck_interval

    async def teardown(self, reason: str) -> None:
        """Leave the group on every party (the WeightSync is going away); idempotent."""
        async with self.lock:
            await self._leave(reason)

    # -- steps ------------------------------------------------------------------------------
    async def _form(self, spec: WeightSyncSpec, sync_spec: SyncSpec, trainer: PodRef, targets: list[PodRef],
                    fingerprint: tuple, generation: int | None) -> bool:
        """Form the group anew; False: the spec cannot drive these members (reported). An init
        that fails raises kopf.TemporaryError: kopf runs the daemon again after its delay."""
        await self._leave("the group is re-formed")
        self._members = {p.name: p for p in targets}
        self._problems = {}
        self._left_out = await self._unreachable(spec, targets, sync_spec.timeouts.request)
        for name, reason in self._left_out.items():
            self._problems[name] = ("Unreachable", reason)
        members = [t for t in targets if t.name not in self._left_out]
        try:
            coordinator = Coordinator(trainer.endpoint(spec.daemon_port),
                                      [t.endpoint(spec.daemon_port) for t in members], sync_spec, self._http,
                                      self._token)
        except ValueError as error:  # members the spec cannot drive (vLLM targets with pauseMode none)
            message = f"cannot form the group: {error}"
            self._update(spec, generation, phase="Failed", progressing=None, degraded=("InvalidGroup", message),
                         message=message, rendezvous=None)
            await self._flush()
            self._emit("Warning", "InvalidGroup", message)
            log.warning("%s/%s: %s; waiting for the spec or the pods to change", self.namespace, self.name, message)
            return False
        self._update(spec, generation, phase="Initializing", progressing=("Initializing", "forming the group"),
                     message=f"forming the group: trainer {trainer.name} and {len(targets)} target(s)")
        await self._flush()
        # Whatever these parties joined before (an earlier group, an earlier operator) is left
        # first, so that none is still held by a group that no longer exists.
        await asyncio.gather(*(p.close(sync_spec.timeouts.request) for p in coordinator.parties),
                             return_exceptions=True)
        await self._catch_up(spec, sync_spec, coordinator.targets, generation)
        try:
            group = await coordinator.init()
        except InitError as error:
            self._failures += 1
            for failure in error.failures:
                if failure.party in self._members:
                    self._problems[failure.party] = ("Unreachable" if failure.status is None else "Failed",
                                                     failure.reason)
            message = f"init failed: {error}"
            self._update(spec, generation, phase="Failed", progressing=None, degraded=("InitFailed", message),
                         message=message, rendezvous=None)
            await self._flush()
            self._emit("Warning", "InitFailed", message)
            # kopf runs the daemon again after this delay (it grows with the failures in a row).
            raise kopf.TemporaryError(message, delay=min(2.0 ** (self._failures - 1), MAX_BACKOFF)) from None
        self.coordinator, self._formed_with, self._broken = coordinator, fingerprint, False
        self._failures, self._last_check = 0, time.monotonic()
        rendezvous = Rendezvous(trainer_pod=trainer.name, trainer_endpoint=coordinator.trainer.endpoint.url,
                                master_address=group.master_address, master_port=group.master_port,
                                world_size=group.world_size, group_name=group.name, backend=spec.backend)
        message = f"group formed: trainer {trainer.name}, {len(members)} target(s), world size {group.world_size}"
        if self._left_out:
            message += "; left out (failurePolicy): " + ", ".join(self._left_out)
        self._update(spec, generation, phase="Ready", progressing=None, degraded=self._left_out_condition(),
                     message=message, rendezvous=rendezvous)
        await self._flush()
        self._emit("Normal", "GroupFormed", message)
        return True

    async def _catch_up(self, spec: WeightSyncSpec, sync_spec: SyncSpec, targets: list[PartyClient],
                        generation: int | None) -> None:
        """Bring targets that lack the current version up to it from a peer that holds it intact."""
        timeout = sync_spec.timeouts.request
        answers = await asyncio.gather(*(t.health(timeout) for t in targets), return_exceptions=True)
        reachable = []
        for target, answer in zip(targets, answers, strict=True):
            if isinstance(answer, BaseException):
                self._versions[target.name] = None
                continue
            reachable.append(target)
            if answer.weights_intact is not False:  # None: the engine cannot say (vLLM)
                self._versions[target.name] = answer.weight_version
            else:  # a failed round left part of itself in these weights: they hold no version
                self._versions[target.name] = None
                self._problems[target.name] = ("Stale", "its weights hold part of a failed round")
        current = self.status.current_version
        if current is None:
            return
        # Only a daemon can send its weights to peers (vLLM has no such route).
        have = [t for t in reachable if t.can_seed and self._versions.get(t.name) == str(current)]
        stale = [t for t in reachable if self._versions.get(t.name) != str(current)]
        if not stale or not have:
            return  # nothing to do, or nobody to copy from: the trainer's next version reaches all
        source = self._members[have[0].name]
        self._update(spec, generation, progressing=("CatchingUp", f"catching up {len(stale)} target(s)"),
                     message=f"catching up {', '.join(t.name for t in stale)} to version {current} from {source.name}")
        await self._flush()
        result = await catch_up(have[0], stale, str(current), sync_spec, source.address,
                                source.rendezvous_port or spec.rendezvous_port)
        self._record(result)
        figures = _figures(result, current, source.name, [t.name for t in stale])
        self.status = self.status.model_copy(update={"last_catch_up": figures})
        if result.ok:
            self._emit("Normal", "CaughtUp", f"{', '.join(figures.targets or [])} now hold version {current} "
                                             f"(from {source.name}, {result.bytes} bytes in "
                                             f"{result.transfer_seconds:.3f}s)")
        else:
            self._emit("Warning", "CatchUpFailed", f"catching up to version {current} failed: {result.reason}")
            # A joiner may still wait in the failed group's rendezvous: let it give up and leave
            # before the real group forms, or that group would wait for it in vain.
            await asyncio.gather(*(t.close(sync_spec.timeouts.init + timeout) for t in stale),
                                 return_exceptions=True)

    async def _roll_out(self, spec: WeightSyncSpec, generation: int | None, version: str, budget: int) -> SyncResult:
        """The round: every target at once (strategy AllAtOnce), or a wave at a time (Waves),
        the status's Progressing condition saying which wave is under way."""
        coordinator = self._formed
        size = spec.strategy.wave_size(len(coordinator.targets))
        if size >= len(coordinator.targets):
            return await coordinator.sync(version, max_failed=budget)

        def seeds_from(name: str) -> tuple[str, int]:
            pod = self._members[name]
            return pod.address, pod.rendezvous_port or spec.rendezvous_port

        async def started(number: int, of: int, targets: list[str], source: str) -> None:
            text = f"version {version}: wave {number} of {of} ({', '.join(targets)}) from {source}"
            self._update(spec, generation, progressing=("RollingOut", text), message=text)
            await self._flush()

        fleet = Fleet(coordinator.trainer.endpoint, [t.endpoint for t in coordinator.targets], seeds_from,
                      coordinator.spec, self._http, self._token)
        # Each wave forms a group of its own (the whole group is only for health checks and
        # catch-ups from now on); a change of strategy re-forms the whole group (fingerprint).
        return await roll_out(fleet, version, size, budget, started)

    async def _unreachable(self, spec: WeightSyncSpec, targets: list[PodRef], timeout: float) -> dict[str, str]:
        """With a failure budget (failurePolicy.maxFailed): the targets that do not answer their
        health check, if leaving them out keeps the group within the budget and not empty; else
        none (the group is formed with every target, and fails as a whole if one is gone)."""
        budget = spec.failure_policy.max_failed
        if budget == 0:
            return {}
        silent = await self._silent(spec, targets, timeout)
        if len(silent) > budget or len(silent) >= len(targets):
            return {}
        return silent

    async def _silent(self, spec: WeightSyncSpec, pods: list[PodRef], timeout: float) -> dict[str, str]:
        """The pods among `pods` whose party does not answer its health check, and why."""
        clients = [party_client(p.endpoint(spec.daemon_port), self._http, self._token) for p in pods]
        answers = await asyncio.gather(*(c.health(timeout) for c in clients), return_exceptions=True)
        return {p.name: str(a) for p, a in zip(pods, answers, strict=True) if isinstance(a, BaseException)}

    def _left_out_condition(self) -> tuple[str, str] | None:
        """The Degraded condition while members are outside the group (None: every one is in)."""
        if not self._left_out:
            return None
        return ("TargetsLeftOut", "outside the group until they answer again (failurePolicy): "
                + "; ".join(f"{name}: {reason}" for name, reason in self._left_out.items()))

    async def _sync(self, spec: WeightSyncSpec, generation: int | None) -> None:
        version = spec.version
        self._update(spec, generation, phase="Syncing", progressing=("Syncing", f"syncing version {version}"),
                     message=f"syncing version {version}")
        # Announce "Syncing" only if the round lasts: a quick round goes straight to its outcome,
        # and its critical path carries one status write, not two.
        announcing = False

        async def announce() -> None:
            nonlocal announcing
            await asyncio.sleep(ANNOUNCE_SYNCING_AFTER)
            announcing = True
            await self._flush()

        announcement = asyncio.ensure_future(announce())
        budget = max(0, spec.failure_policy.max_failed - len(self._left_out))
        try:
            result = await self._roll_out(spec, generation, str(version), budget)
        finally:
            if not announcing:
                announcement.cancel()
            await asyncio.gather(announcement, return_exceptions=True)
        self._record(result)
        trainer = self._formed.trainer.name
        figures = _figures(result, version, trainer, [t.name for t in self._formed.targets])
        self.status = self.status.model_copy(update={"last_sync": figures})
        for name, reason in result.left_out.items():  # lost mid-round; the rest went on without them
            self._left_out[name] = f"lost in version {version}: {reason}"
            self._problems[name] = ("Stale", f"left out of version {version}: {reason}")
        if result.ok:
            self.status = self.status.model_copy(update={"current_version": version})
            message = (f"version {version} live on {len(self._formed.targets)} target(s): {result.bytes} bytes "
                       f"in {result.transfer_seconds:.3f}s ({figures.gbps:.3f} GB/s)")
            if spec.strategy.type == "Waves":
                message += f", in waves of {spec.strategy.wave_size(len(self._formed.targets))}"
            if result.left_out:
                message += (f"; {', '.join(result.left_out)} lost mid-round and left out "
                            f"(sent {result.attempts} times, {result.total_seconds:.2f}s in all)")
            self._update(spec, generation, phase="Succeeded", progressing=None,
                         degraded=self._left_out_condition(), message=message)
            await self._flush()
            self._emit("Normal", "Synced", message)
            if result.left_out:
                self._emit("Warning", "TargetsLeftOut", message)
        else:
            self._broken = True  # a failed collective can leave the group unusable: re-form it
            message = f"version {version} failed: {result.reason}"
            self._update(spec, generation, phase="Failed", progressing=None, degraded=("SyncFailed", message),
                         message=message)
            await self._flush()
            self._emit("Warning", "SyncFailed", message)

    async def _check_health(self, spec: WeightSyncSpec, generation: int | None) -> None:
        """Level-based: does every party still hold its place in the group?"""
        self._last_check = time.monotonic()
        timeout = self._formed.spec.timeouts.request
        parties = self._formed.parties
        answers = await asyncio.gather(*(p.health(timeout) for p in parties), return_exceptions=True)
        lost = []
        for party, answer in zip(parties, answers, strict=True):
            if isinstance(answer, BaseException):
                lost.append(f"{party.name}: {answer}")
                if party.name in self._members:
                    self._problems[party.name] = ("Unreachable", str(answer))
                continue
            if party.name in self._members:
                known = self._versions.get(party.name)
                self._versions[party.name] = answer.weight_version
                # An engine that cannot say whether it is in the group (vLLM) but serves another
                # version than its last round left it with was restarted (back on its checkpoint,
                # its transfer engine gone): re-form now rather than fail the next round.
                if answer.in_group is None and known is not None and answer.weight_version != known:
                    lost.append(f"{party.name} serves version {answer.weight_version or 'none'}, not {known} "
                                f"(restarted?)")
            if answer.in_group is False:  # None: the engine cannot say; a failed round will
                lost.append(f"{party.name} is {answer.detail}, not ready in the group (restarted?)")
        back = await self._answering_again(spec, timeout)
        if back:
            lost.append(f"{', '.join(back)} answer(s) again: re-forming the group with them")
        if lost:
            self._broken = True
            message = "re-forming the group: " + "; ".join(lost)
            self._update(spec, generation, degraded=("PartyLost", message), message=message)
            self._emit("Warning", "PartyLost", message)
        else:
            self._update(spec, generation)
        await self._flush()

    async def _answering_again(self, spec: WeightSyncSpec, timeout: float) -> list[str]:
        """Members left out of the group that answer their health check again."""
        out = [self._members[name] for name in self._left_out if name in self._members]
        silent = await self._silent(spec, out, timeout)
        return [p.name for p in out if p.name not in silent]

    async def _wait_for_pods(self, spec: WeightSyncSpec, trainers: list[PodRef], targets: list[PodRef],
                             generation: int | None) -> None:
        await self._leave("its members are gone")
        if len(trainers) > 1:
            message = (f"{len(trainers)} ready pods match trainerSelector ({', '.join(p.name for p in trainers)}); "
                       "expected one")
            degraded = ("AmbiguousTrainer", message)
        else:
            missing = [what for what, ok in (("a ready trainer pod", trainers), ("ready target pods", targets))
                       if not ok]
            message, degraded = f"waiting for {' and '.join(missing)}", None
        self._members = {p.name: p for p in targets}
        self._problems = {}
        self._update(spec, generation, phase="Pending", progressing=None, degraded=degraded, message=message,
                     rendezvous=None)
        await self._flush()

    async def _report_invalid(self, error: WeightSyncSpecError, generation: int | None) -> None:
        first_time = get_condition(self.status.conditions, "Degraded") is None or \
            self.status.observed_generation != generation or self.status.phase != "Failed"
        message = str(error)
        conditions = set_condition(self.status.conditions, "Ready", False, "InvalidSpec", message, generation)
        conditions = set_condition(conditions, "Progressing", False, "InvalidSpec", message, generation)
        conditions = set_condition(conditions, "Degraded", True, "InvalidSpec", message, generation)
        self.status = self.status.model_copy(update={"phase": "Failed", "message": message, "conditions": conditions,
                                                     "observed_generation": generation})
        await self._flush()
        if first_time:
            self._emit("Warning", "InvalidSpec", message)

    async def _leave(self, reason: str) -> None:
        """Every party of the formed group leaves it (best effort: some may be gone already)."""
        coordinator, self.coordinator, self._formed_with = self.coordinator, None, None
        if coordinator is None:
            return
        log.info("%s/%s: leaving the group: %s", self.namespace, self.name, reason)
        await asyncio.gather(*(p.close(coordinator.spec.timeouts.request) for p in coordinator.parties),
                             return_exceptions=True)

    # -- status -----------------------------------------------------------------------------
    def _record(self, result: SyncResult) -> None:
        """Per-target outcome of a round: the version each reached, or why it failed."""
        for party in result.parties:
            if party.name not in self._members:
                continue
            if not party.ok:
                self._problems[party.name] = ("Failed", f"{party.step}: {party.reason}")
            elif party.weight_version is not None:
                self._versions[party.name] = party.weight_version
                self._problems.pop(party.name, None)

    def _update(self, spec: WeightSyncSpec, generation: int | None, phase: Phase | None = None,
                progressing: tuple[str, str] | None | Unchanged = UNCHANGED,
                degraded: tuple[str, str] | None | Unchanged = UNCHANGED,
                message: str | None = None, rendezvous: Rendezvous | None | Unchanged = UNCHANGED) -> None:
        """Fold one step's outcome into the status (None clears a condition or the rendezvous;
        UNCHANGED leaves that part as it is)."""
        s = self.status
        phase = phase or s.phase
        targets = self._target_statuses(spec)
        synced = sum(t.state == "Synced" for t in targets)
        formed = self.coordinator is not None or phase in ("Syncing", "Succeeded")
        conditions = s.conditions
        if not isinstance(progressing, Unchanged):
            reason, text = progressing or ("Idle", "nothing to do")
            conditions = set_condition(conditions, "Progressing", progressing is not None, reason, text, generation)
        if not isinstance(degraded, Unchanged):
            reason, text = degraded or ("AsExpected", "the last step succeeded")
            conditions = set_condition(conditions, "Degraded", degraded is not None, reason, text, generation)
        in_sync = formed and bool(targets) and synced == len(targets) and (
            spec.version == 0 or s.current_version == spec.version)
        if in_sync:
            ready = ("Synced", f"all {len(targets)} target(s) hold version {s.current_version}") \
                if s.current_version is not None else ("GroupFormed", "the group is ready for the first version")
        else:
            ready = ({"Pending": "WaitingForPods", "Initializing": "Initializing", "Syncing": "Syncing",
                      "Failed": "Failed"}.get(phase, "OutOfSync"), message or s.message or phase)
        conditions = set_condition(conditions, "Ready", in_sync, ready[0], ready[1], generation)
        update: dict[str, object] = {"phase": phase, "observed_generation": generation, "targets": targets or None,
                  "ready_targets": f"{synced}/{len(targets)}", "conditions": conditions}
        if message is not None:
            update["message"] = message
        if not isinstance(rendezvous, Unchanged):
            update["rendezvous"] = rendezvous
        self.status = s.model_copy(update=update)

    def _target_statuses(self, spec: WeightSyncSpec) -> list[TargetStatus]:
        ranks = self.coordinator.group.ranks if self.coordinator is not None and self.coordinator.group else {}
        current = None if self.status.current_version is None else str(self.status.current_version)
        out = []
        for name, pod in sorted(self._members.items()):
            version = self._versions.get(name)
            if name in self._problems:
                state, reason = self._problems[name]
            elif name not in ranks:
                state, reason = "Joining", None
            elif current is None or version == current:
                state, reason = "Synced", None
            else:
                state, reason = "Stale", f"holds {version or 'no version'}, not {current}"
            out.append(TargetStatus(pod=name, rank=ranks.get(name), endpoint=pod.endpoint(spec.daemon_port).url,
                                    state=state, version=version, reason=reason))
        return out

    async def _flush(self) -> None:
        """Write the status if it changed since the last write, then the target pods' gates."""
        status = self.status.to_k8s()
        if status != self._written:
            await self._write(status)
            self._written = status
        await self._hold_gates()

    async def _hold_gates(self) -> None:
        """Set each gated target pod's `weightsync.dev/synced` to its state (True: Synced) where
        it differs from what the pod says; a pod that left the selection goes False."""
        if self._set_pod_condition is None:
            return
        states = {t.pod: t for t in self.status.targets or []}
        current = self.status.current_version
        changes: dict[str, tuple[bool, str, str]] = {}
        for name in self._gated | self._gates.keys():
            target = states.get(name) if name in self._gated else None
            if target is None:
                want = (False, "NotInGroup", "not a member of the group")
            elif target.state == "Synced" or (target.state == "Joining" and current is not None
                                              and target.version == str(current)):
                # A member still on the current version keeps serving while the group re-forms
                # around another pod: the fleet does not go unready because one pod restarted.
                want = (True, "Synced", f"serves version {target.version or 'of the group'}")
            else:
                want = (False, target.state, target.reason or target.state)
            if self._gates.get(name, False) != want[0]:
                changes[name] = want
        if not changes:
            return
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        answers = await asyncio.gather(*(self._set_pod_condition(name, {
            "type": SYNCED_CONDITION, "status": "True" if value else "False", "reason": reason,
            "message": message[:256], "lastTransitionTime": now})
            for name, (value, reason, message) in changes.items()),
            return_exceptions=True)
        for name, answer in zip(changes, answers, strict=True):
            if not isinstance(answer, BaseException):
                self._gates[name] = changes[name][0]
            elif getattr(answer, "status", None) == 404:  # the pod is gone: nothing to hold
                self._gates.pop(name, None)
            else:
                log.warning("%s/%s: could not set %s on pod %s: %s", self.namespace, self.name,
                            SYNCED_CONDITION, name, answer)
        for name in self._gates.keys() - self._gated:  # left the selection and now False: forget
            if not self._gates[name]:
                del self._gates[name]

    # -- helpers ------------------------------------------------------------------------------
    @property
    def _formed(self) -> Coordinator:
        """The formed group's coordinator: the steps that use it run only once `_form` made it."""
        if self.coordinator is None:
            raise RuntimeError(f"{self.namespace}/{self.name}: no group is formed")
        return self.coordinator

    def _attempted(self) -> int:
        s = self.status
        return max(s.last_sync.version if s.last_sync else 0, s.current_version or 0)

    def _sync_spec(self, spec: WeightSyncSpec, trainer: PodRef) -> SyncSpec:
        t = spec.timeouts
        return SyncSpec(
            backend=spec.backend, master_address=trainer.address,
            master_port=trainer.rendezvous_port or spec.rendezvous_port,
            packed_buffer_size_bytes=spec.packed_buffer_size_bytes, packed_num_buffers=spec.packed_num_buffers,
            pause_mode=None if spec.pause_mode == "none" else spec.pause_mode,
            group_name=f"{self.namespace}.{self.name}"[:96],
            transfer_timeout=t.transfer_seconds, verify=spec.verify, atomic=spec.atomic,
            timeouts=Timeouts(request=t.request_seconds, init=t.init_seconds, start=t.start_seconds,
                              update=t.update_seconds, finish=t.finish_seconds))


def _figures(result: SyncResult, version: int, source: str, targets: list[str]) -> SyncFigures:
    return SyncFigures(version=version, outcome="Succeeded" if result.ok else "Failed", bytes=result.bytes,
                       seconds=round(result.transfer_seconds, 6), total_seconds=round(result.total_seconds, 6),
                       gbps=round(result.gbps, 6), started=result.started_at or None,
                       finished=result.finished_at or None, reason=result.reason, checksum=result.checksum,
                       source=source, targets=targets)
