"""Catch-up: late joiners get the current version from a peer daemon that already holds it.

A target that joins after the last sync should not wait for the trainer's next step, and the
trainer cannot resend the last version: its live tensors have moved on since. So a peer that
holds the version hosts a one-off transfer group as its rank 0 (`POST /seed_weights`) and sends
its weights once; the joiners receive them through their usual protocol (init → start → update
→ finish with the peer's version). The peer's own group is untouched. No Kubernetes in here.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable
from datetime import datetime, timezone
from typing import TypeVar

from weightsync_operator.client import PartyClient, PartyError, Progress
from weightsync_operator.coordinator import PartyOutcome, SyncResult, SyncSpec, at_offset, group_init_info


T = TypeVar("T")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class _Failed(Exception):
    def __init__(self, error: PartyError):
        super().__init__(str(error))
        self.error = error


async def catch_up(source: PartyClient, joiners: list[PartyClient], version: str, spec: SyncSpec,
                   master_address: str, master_port: int) -> SyncResult:
    """Send `source`'s weights (labelled `version`) to every joiner; never raises for a party's
    failure: the result says who failed at which step. The source is rank 0 of the result and
    must be able to seed (a daemon); joiners may be of any kind (a vLLM server takes its
    world size in ranks)."""
    if not joiners:
        raise ValueError("catch_up needs at least one joiner")
    if not source.can_seed:
        raise ValueError(f"{source.name}: a {source.kind} target cannot be the source of a catch-up")
    t = spec.timeouts
    result = SyncResult(version=version, ok=False, started_at=_now())
    result.parties = [PartyOutcome(source.name, "trainer", 0)]
    began = time.perf_counter()
    paused: list[PartyClient] = []
    progress = {p.name: Progress.NOT_STARTED for p in joiners}  # what a failure must undo on each
    try:
        sizes = await asyncio.gather(*(_step(result, p, "get_world_size", p.world_size(t.request)) for p in joiners))
        ranks, offset = {}, 1
        for party, size in zip(joiners, sizes, strict=True):
            ranks[party.name], offset = offset, offset + size
            result.parties.append(PartyOutcome(party.name, "target", ranks[party.name]))
        # A joiner is paused and out of service until its catch-up lands: nothing to keep atomic.
        info = group_init_info(spec, master_address, master_port, offset,
                               f"{spec.group_name}-catchup-{secrets.token_hex(4)}", atomic=False)

        async def receive(party: PartyClient) -> dict:
            if spec.pause_mode is not None:
                await _step(result, party, "pause", party.pause(spec.pause_mode, t.request))
                paused.append(party)
            await _step(result, party, "init", party.init(at_offset(info, ranks[party.name]), t.init))
            progress[party.name] = Progress.STARTED
            await _step(result, party, "start", party.start(t.start))
            answer = await _step(result, party, "update", party.update({}, t.update))
            progress[party.name] = Progress.LANDED
            finished = await _step(result, party, "finish", party.finish(version, t.finish))
            progress[party.name] = Progress.FINISHED
            _outcome(result, party.name).weight_version = finished.get("weight_version")
            return answer

        sent = time.perf_counter()
        seed = _step(result, source, "seed", source.seed(at_offset(info, 0), t.init + t.update))
        answers = await _all_or_nothing([seed, *(receive(p) for p in joiners)], grace=t.request)
        result.transfer_seconds = time.perf_counter() - sent
        result.bytes = int(answers[0]["bytes"])
        result.ok = True
    except _Failed as failed:
        result.reason = str(failed.error)
        await asyncio.gather(*(p.abort(result.reason, t.request, progress[p.name], version) for p in joiners),
                             return_exceptions=True)
    finally:
        if paused:
            await asyncio.gather(*(p.resume(t.request) for p in paused), return_exceptions=True)
    result.total_seconds = time.perf_counter() - began
    result.finished_at = _now()
    return result


def _outcome(result: SyncResult, name: str) -> PartyOutcome:
    return next(p for p in result.parties if p.name == name)


async def _step(result: SyncResult, party: PartyClient, step: str, call: Awaitable[T]) -> T:
    try:
        return await call
    except PartyError as error:
        outcome = next((p for p in result.parties if p.name == party.name), None)
        if outcome is not None and outcome.ok:
            outcome.ok, outcome.step, outcome.reason = False, step, error.reason
        raise _Failed(error) from None


async def _all_or_nothing(calls: list[Awaitable], grace: float) -> list:
    """Run every call at once; once one fails, give the others `grace` seconds (a collective
    cannot finish without the party that failed), then cancel them and raise the first failure."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    failed = [t for t in done if t.exception() is not None]
    if failed:
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise failed[0].exception() or RuntimeError("a catch-up call failed")
    return [t.result() for t in tasks]

