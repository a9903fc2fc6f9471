"""Operator overhead per sync: from the version bump to status Succeeded, minus the data plane.

    python benchmarks/operator_overhead.py              # 20 measured rounds after 3 warm-up rounds
    python benchmarks/operator_overhead.py --rounds 50 --mbytes 16 --daemons 4
    WEIGHTSYNC_VLLM_PYTHON=.venv-vllm/bin/python python benchmarks/operator_overhead.py --engine vllm
    python benchmarks/operator_overhead.py --targets 2,8,32      # the cost at fleet size (operator_fleet.py)
    python benchmarks/operator_overhead.py --concurrent 10       # ten WeightSyncs of 4 targets bumped at once

Everything is real except the API server: kmock's emulator (tests/helpers/k8s_emulator.py) serving the
Kubernetes HTTP API with watch streams, kopf's runtime over the operator's handlers, daemon
processes, and a trainer process that pushes each version with `weightsync_operator.trainer_client.connect(...).push`.
With `--engine vllm` the target is one real vLLM CPU server (weightsync backend, TP 1, the tiny
float32 Qwen2) in a pod annotated `weightsync.dev/engine: vllm`, and the trainer is
tests/helpers/k8s_vllm_trainer.py holding the HF model (tests/helpers/k8s_harness.VllmTrainer), both run with the
vLLM venv's Python ($WEIGHTSYNC_VLLM_PYTHON).

A watch on the WeightSync (over HTTP, like any client) timestamps, per version v:
  bump      the first state with spec.version == v (the trainer's patch),
  done      the first status with lastSync.version == v and outcome Succeeded.
overhead = (done - bump) - lastSync.seconds, where lastSync.seconds is the data plane (the
update step: the weights in flight) as the coordinator measured it. The same watch delay is in
both timestamps, so it cancels out. The overhead splits into the protocol's control steps
(lastSync.totalSeconds - lastSync.seconds: pause, start, finish, resume over HTTP) and the rest
(the operator noticing the bump and writing the status, through the API server). With vLLM, the
operator's /pause calls are timed too (around its client's real call, in this process): vLLM's
own pause handler sleeps 20 ms before it answers, a floor no operator can remove. The 10 ms
target is for daemon targets; for vLLM the figure is printed without a verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO / "tests", REPO, REPO / "daemon", REPO / "operator"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from helpers.k8s_harness import Cluster, Trainer, VllmTrainer, cluster, free_port, operator, start_daemons  # noqa: E402

NS, NAME = "bench", "policy-sync"
TARGET_MS = 10.0  # issue 16 item 6: the median, on a 2-core CPU machine, for daemon targets
# The WeightSync of both modes (each adds a free rendezvous port and its buffer size).
SPEC = {"backend": "cpu", "pauseMode": "keep", "timeouts": {"transferSeconds": 30, "updateSeconds": 60},
        "trainerSelector": {"matchLabels": {"weightsync.dev/role": "trainer"}},
        "targetSelector": {"matchLabels": {"weightsync.dev/role": "inference"}}}


class Timeline:
    """Arrival times of the WeightSync's states, from a watch over the API's HTTP."""

    def __init__(self):
        self.bump: dict[int, float] = {}
        self.done: dict[int, tuple[float, dict]] = {}

    async def follow(self, session, path: str) -> None:
        async with session.get(path, params={"watch": "true"}, timeout=None) as response:
            async for line in response.content:
                now = time.perf_counter()
                if not line.strip():
                    continue
                obj = json.loads(line)["object"]
                version = obj.get("spec", {}).get("version", 0)
                status = obj.get("status") or {}
                last = status.get("lastSync") or {}
                self.bump.setdefault(version, now)
                if last.get("outcome") == "Succeeded" and last.get("version") not in self.done:
                    self.done[last["version"]] = (now, last)


@dataclass
class Group:
    """A formed group, ready for pushes: its WeightSync, its targets in words, the trainer's push."""

    namespace: str
    name: str
    targets: str
    push: Callable[[int], Awaitable[dict]]


class PauseCalls:
    """The operator's /pause calls to vLLM targets, timed around the real client method (the
    operator runs in this process): seconds per call, in call order."""

    def __init__(self):
        self.seconds: list[float] = []

    def timing(self) -> contextlib.AbstractContextManager:
        from operator_fleet import measured
        from weightsync_operator.client import VllmClient

        return measured(VllmClient, "pause", time.perf_counter, lambda _, seconds: self.seconds.append(seconds))


@contextlib.asynccontextmanager
async def daemon_group(c: Cluster, mbytes: float, daemons: int) -> AsyncIterator[Group]:
    await c.create_weightsync(NS, NAME, {**SPEC, "rendezvousPort": free_port(), "packedBufferSizeBytes": 1 << 22})
    processes, trainer = await asyncio.gather(start_daemons(daemons),
                                              Trainer.start(c, NS, NAME, "trainer-0", mbytes=mbytes))
    try:
        await c.create_pod(NS, "trainer-0", "trainer", NAME, trainer.url)
        for d in processes:
            await c.create_pod(NS, d.name, "inference", NAME, d.url)
        await c.wait_for(NS, NAME, lambda o: o.get("status", {}).get("readyTargets") == f"{daemons}/{daemons}"
                         and o["status"]["phase"] == "Ready", 120, "the group")
        assert (await trainer.wait_ready())["ok"]
        yield Group(NS, NAME, f"{daemons} daemons", trainer.push)
    finally:
        await trainer.stop()
        await asyncio.gather(*(d.stop() for d in processes))


@contextlib.asynccontextmanager
async def vllm_group(c: Cluster, work: Path, python: str) -> AsyncIterator[Group]:
    """The trainer (it builds the checkpoint) and one vLLM server on it, in a pod marked as vLLM's."""
    from weightsync_operator.demo.vllm_server import VllmServer
    from weightsync_operator.pods import ENGINE_ANNOTATION

    await c.create_weightsync(NS, NAME, {**SPEC, "rendezvousPort": free_port(), "packedBufferSizeBytes": 1 << 20})
    trainer = await VllmTrainer.start(python, c.kubeconfig, work / "model", "trainer-0", NS, NAME)
    server = None
    try:
        server = await VllmServer.start(work / "model", free_port(), work / "vllm-0", python=python)
        await c.create_pod(NS, "vllm-0", "inference", NAME, server.url, annotations={ENGINE_ANNOTATION: "vllm"})
        await c.create_pod(NS, "trainer-0", "trainer", NAME, trainer.url)
        await c.wait_for(NS, NAME, lambda o: o.get("status", {}).get("readyTargets") == "1/1"
                         and o["status"]["phase"] == "Ready", 180, "the group")
        assert (await trainer.wait_ready())["ok"]
        yield Group(NS, NAME, "1 vLLM CPU server (TP 1, tiny Qwen2)", trainer.push)
    finally:
        await trainer.stop()
        if server is not None:
            await server.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(engine: str, rounds: int, warmup: int, mbytes: float, daemons: int, python: str | None) -> int:
    pauses = PauseCalls()
    with tempfile.TemporaryDirectory() as workdir, pauses.timing():
        async with cluster(Path(workdir)) as c, operator(c.url, recheck_interval=3600):
            formed = (daemon_group(c, mbytes, daemons) if engine == "daemon"
                      else vllm_group(c, Path(workdir), python))
            async with formed as group:
                measured = await _measure(c, group, pauses, rounds, warmup)
    if measured is None:
        return 1
    return _report(engine, group, measured, rounds, warmup)


@dataclass(frozen=True)
class _Measured:
    """What the rounds left: the WeightSync's states as the operator wrote them, the trainer's
    push() wall times (measured rounds), and per measured round the /pause calls of its push."""

    timeline: Timeline
    push_walls: list[float]
    pause_ms: list[float]


async def _measure(c: Cluster, group: Group, pauses: PauseCalls, rounds: int, warmup: int) -> _Measured | None:
    """Push `warmup` then `rounds` versions, following the WeightSync's states meanwhile (and
    up to 10 s more, for the last Succeeded); None once a push failed (printed)."""
    timeline = Timeline()
    follower = asyncio.create_task(timeline.follow(
        c.session, f"/apis/weightsync.dev/v1alpha1/namespaces/{group.namespace}/weightsyncs"))
    push_walls: list[float] = []
    pause_ms: list[float] = []  # per measured round: the /pause calls made during its push
    try:
        for version in range(1, warmup + rounds + 1):
            began, paused_before = time.perf_counter(), len(pauses.seconds)
            answer = await group.push(version)
            if not answer["ok"]:
                print(f"version {version} failed: {answer}", file=sys.stderr)
                return None
            if version > warmup:
                push_walls.append(time.perf_counter() - began)
                pause_ms.append(sum(pauses.seconds[paused_before:]) * 1e3)
        deadline = time.monotonic() + 10
        while len(timeline.done) < warmup + rounds and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        follower.cancel()
    return _Measured(timeline, push_walls, pause_ms)


def _row(name: str, values: list[float]) -> str:
    return (f"{name:<38} {statistics.median(values):8.1f} {percentile(values, 0.9):8.1f} "
            f"{min(values):8.1f} {max(values):8.1f}")


def _report(engine: str, group: Group, measured: _Measured, rounds: int, warmup: int) -> int:
    """Print where the measured rounds' time went, and the verdict on the target (daemon targets
    only): 0 when it is met."""
    timeline = measured.timeline
    overhead, control, operator_api, data_plane, total = [], [], [], [], []
    for v in range(warmup + 1, warmup + rounds + 1):
        done_at, last = timeline.done[v]
        overhead.append((done_at - timeline.bump[v] - last["seconds"]) * 1e3)
        control.append((last["totalSeconds"] - last["seconds"]) * 1e3)
        operator_api.append((done_at - timeline.bump[v] - last["totalSeconds"]) * 1e3)
        data_plane.append(last["seconds"] * 1e3)
        total.append((done_at - timeline.bump[v]) * 1e3)
    payload = timeline.done[warmup + 1][1]["bytes"]
    print(f"operator overhead per sync: {rounds} rounds (after {warmup} warm-up), {group.targets}, "
          f"{payload / 1e6:.1f} MB per round, cpu transport, emulated API server")
    print(f"{'ms':<38} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
    print(_row("bump -> Succeeded (end to end)", total))
    print(_row("  data plane (update step)", data_plane))
    print(_row("overhead = end to end - data plane", overhead))
    print(_row("  protocol control steps over HTTP", control))
    if engine == "vllm":
        print(_row("    of which vLLM's /pause call", measured.pause_ms))
    print(_row("  operator + API server (the rest)", operator_api))
    print(_row("trainer push() wall time", [w * 1e3 for w in measured.push_walls]))
    median = statistics.median(overhead)
    if engine == "vllm":
        print(f"\nmedian operator overhead {median:.1f} ms with a vLLM target, of which its /pause call "
              f"{statistics.median(measured.pause_ms):.1f} ms (vLLM sleeps 20 ms in it before answering); "
              f"the {TARGET_MS:g} ms target is for daemon targets: no verdict")
        return 0
    verdict = "meets" if median <= TARGET_MS else "MISSES"
    print(f"\nmedian operator overhead {median:.1f} ms: {verdict} the {TARGET_MS:g} ms target")
    return 0 if median <= TARGET_MS else 1


def target_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of target counts, e.g. 2,8,32")
    return counts


async def fleet(args: argparse.Namespace) -> int:
    """The fleet-size runs (issue 25 item 3): by target count, then many WeightSyncs at once."""
    import operator_fleet

    code = 0
    with tempfile.TemporaryDirectory() as workdir:
        if args.targets:
            code |= await operator_fleet.run_targets(Path(workdir), args.targets, args.rounds, args.warmup,
                                                     args.mbytes)
        if args.concurrent:
            code |= await operator_fleet.run_concurrent(Path(workdir), args.concurrent, args.concurrent_targets,
                                                        args.rounds, args.warmup, args.mbytes)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["daemon", "vllm"], default="daemon")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mbytes", type=float, default=4.0, help="model size per round (MB; daemon engine)")
    parser.add_argument("--daemons", type=int, default=2, help="daemon engine only")
    parser.add_argument("--targets", type=target_counts, default=None, metavar="N,N,...",
                        help="the cost at fleet size: one run per count of daemon targets (operator_fleet.py)")
    parser.add_argument("--concurrent", type=int, default=0, metavar="N",
                        help="N WeightSyncs bumped at once, each against its time alone (operator_fleet.py)")
    parser.add_argument("--concurrent-targets", type=int, default=4, help="daemon targets per WeightSync")
    args = parser.parse_args()
    if args.targets or args.concurrent:
        from weightsync_operator.operator_cli import event_loop

        with event_loop() as loop:  # the operator's own loop (uvloop where installed), as it runs in a pod
            return loop.run_until_complete(fleet(args)) if loop is not None else asyncio.run(fleet(args))
    python = None
    if args.engine == "vllm":
        python = os.environ.get("WEIGHTSYNC_VLLM_PYTHON")
        if not python:
            parser.error("--engine vllm needs WEIGHTSYNC_VLLM_PYTHON: the Python of a venv with vLLM's CPU build "
                         "(e.g. .venv-vllm/bin/python)")
    return asyncio.run(run(args.engine, args.rounds, args.warmup, args.mbytes, args.daemons, python))


if __name__ == "__main__":
    sys.exit(main())
