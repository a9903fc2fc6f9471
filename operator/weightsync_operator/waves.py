"""A version rolled out a wave at a time: at most a wave of targets is paused at once.

For asynchronous RL, where a few requests may be served by the previous version but serving
capacity must not drop: the first wave gets the version from the trainer (a group of the trainer
and that wave only), each later wave from a peer of an earlier wave that can send (a daemon
seeds it: `catch_up`), else from the trainer again. The trainer stays in its push until the last
wave landed, so its tensors are the version throughout. No Kubernetes in here: the reconciler
says who the targets are and where a peer seeds from.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from weightsync_operator.catchup import catch_up
from weightsync_operator.client import Endpoint, PartyClient, PartyHttp, party_client
from weightsync_operator.coordinator import Coordinator, InitError, SyncResult, SyncSpec

log = logging.getLogger("weightsync.coordinator")

WaveStarted = Callable[[int, int, list[str], str], Awaitable[None]]  # (number, of, targets, source)


@dataclass(frozen=True)
class Fleet:
    """Who takes part: the trainer, the targets in wave order, and where a daemon peer hosts the
    one-off group it seeds a later wave through (its address and rendezvous port)."""

    trainer: Endpoint
    targets: list[Endpoint]
    seeds_from: Callable[[str], tuple[str, int]]
    spec: SyncSpec
    http: PartyHttp
    token: str | None = None


@dataclass
class Rollout:
    """The waves' results, in order, and the one result they add up to."""

    waves: list[SyncResult] = field(default_factory=list)

    def result(self, version: str) -> SyncResult:
        """One SyncResult for the version: ok if every wave was; bytes and seconds summed."""
        first = self.waves[0]
        combined = SyncResult(version=version, ok=all(w.ok for w in self.waves), started_at=first.started_at,
                              finished_at=self.waves[-1].finished_at, checksum=first.checksum)
        for wave in self.waves:
            combined.bytes += wave.bytes
            combined.transfer_seconds += wave.transfer_seconds
            combined.total_seconds += wave.total_seconds
            combined.left_out.update(wave.left_out)
            combined.reason = combined.reason or wave.reason
            known = {p.name for p in combined.parties}
            combined.parties += [p for p in wave.parties if p.name not in known]
        combined.attempts = len(self.waves)
        return combined


def waves_of(targets: Sequence[Endpoint], size: int) -> list[list[Endpoint]]:
    return [list(targets[i:i + size]) for i in range(0, len(targets), size)]


async def roll_out(fleet: Fleet, version: str, size: int, max_failed: int = 0,
                   started: WaveStarted | None = None) -> SyncResult:
    """Send `version` to `fleet.targets`, `size` at a time; stops at the first wave that fails.
    A wave's lost targets (within `max_failed` in all) are left out, as in `Coordinator.sync`."""
    rollout = Rollout()
    waves = waves_of(fleet.targets, size)
    landed: list[PartyClient] = []  # targets of finished waves that hold the version
    for number, wave in enumerate(waves, 1):
        peer = next((p for p in landed if p.can_seed), None)
        source = peer.name if peer is not None else fleet.trainer.name
        if started is not None:
            await started(number, len(waves), [t.name for t in wave], source)
        clients = [party_client(t, fleet.http, fleet.token) for t in wave]
        if peer is None:
            spent = sum(len(w.left_out) for w in rollout.waves)
            result = await _from_trainer(fleet, wave, version, max(0, max_failed - spent))
        else:
            address, port = fleet.seeds_from(peer.name)
            result = await catch_up(peer, clients, version, fleet.spec, address, port)
        rollout.waves.append(result)
        if not result.ok:
            log.warning("version %s: wave %d of %d failed: %s", version, number, len(waves), result.reason)
            break
        landed += [c for c in clients if c.name not in result.left_out]
    return rollout.result(version)


async def _from_trainer(fleet: Fleet, wave: list[Endpoint], version: str, max_failed: int) -> SyncResult:
    """One wave straight from the trainer, on a group of the trainer and this wave."""
    coordinator = Coordinator(fleet.trainer, wave, fleet.spec, fleet.http, fleet.token)
    try:
        await coordinator.init()
    except InitError as error:
        return SyncResult(version=version, ok=False, reason=f"forming the wave's group failed: {error}")
    return await coordinator.sync(version, max_failed=max_failed)
