"""The operator's cost at fleet size (issue 25 item 3): `operator_overhead.py --targets 2,8,32`
and `--concurrent 10`. Kept apart from operator_overhead.py's single-group run, which it reuses.

Per target count, one WeightSync over that many real daemon processes (gated pods) and a trainer
process; per measured round it takes:
  own part        bump -> Succeeded minus lastSync.totalSeconds: the operator noticing the bump and
                  writing the status, through the API server;
  coordinator CPU the operator's event-loop thread's CPU while Coordinator.sync runs (the operator
                  and the emulated API server share that thread; the API server is idle then);
  control steps   lastSync.totalSeconds - lastSync.seconds (pause+start, finish+resume), beside
                  the slowest single call of each step (every party is called at once, so the two
                  should match: the difference is the coordinator's own wait);
  daemon CPU/call the CPU of each daemon's HTTP thread (its event loop) over the measured rounds
                  divided by the calls it served (from /proc: 10 ms ticks, summed over every daemon
                  and round); the thread is found by serving a burst of /healthz first;
  API requests    what the emulated API server served during the round (status writes, events,
                  patches), by verb and resource.

`--concurrent N` forms N WeightSyncs of `--concurrent-targets` daemons each, times each one's
rounds alone (one after the other), then bumps all of them at once, and prints each one's median
bump -> Succeeded together over alone (the issue's bound: 1.5x). Its API server (the same emulator)
and the operator (`weightsync operator`) run in processes of their own, as in a cluster, so the
operator's CPU it prints (from /proc, every thread) is the operator's alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from helpers.k8s_harness import Cluster, Fleet, cluster, daemon_fleet, operator, operator_process, remote_cluster

NS = "bench"
CONCURRENT_BOUND = 1.5  # issue 25 item 3: each WeightSync within 1.5x of its time alone
HEALTHZ_BURST = 100  # calls that find each daemon's HTTP thread (at 10 ms ticks, ~10 ticks of CPU)
CLOCK_TICK = 0.01  # seconds per /proc tick (USER_HZ is 100 on Linux)


# -- what is measured in this process ---------------------------------------------------------
@contextlib.contextmanager
def measured(owner: type, method: str, clock: Callable[[], float],
             record: Callable[[tuple, float], None]) -> Iterator[None]:
    """Patch the coroutine method `owner.method` (the operator runs in this process) so that each
    call is measured on `clock` and handed to `record(args, elapsed)`; the real one is put back."""
    real = getattr(owner, method)

    async def timed(*args, **kwargs):
        began = clock()
        try:
            return await real(*args, **kwargs)
        finally:
            record(args, clock() - began)

    setattr(owner, method, timed)
    try:
        yield
    finally:
        setattr(owner, method, real)


class PartyCalls:
    """Every call the coordinator makes to a party, timed around the real client method:
    (party, step, seconds), in call order."""

    def __init__(self):
        self.calls: list[tuple[str, str, float]] = []

    def timing(self) -> contextlib.AbstractContextManager:
        from weightsync_operator.client import PartyClient

        return measured(PartyClient, "call", time.perf_counter,
                        lambda args, seconds: self.calls.append((args[0].name, args[1], seconds)))


class SyncCpu:
    """The event-loop thread's CPU seconds while each Coordinator.sync runs, in call order."""

    def __init__(self):
        self.seconds: list[float] = []

    def timing(self) -> contextlib.AbstractContextManager:
        from weightsync_operator.coordinator import Coordinator

        return measured(Coordinator, "sync", time.thread_time, lambda _, seconds: self.seconds.append(seconds))


class Timeline:
    """When each WeightSync's version was bumped and when it succeeded, from one watch of the
    namespace over the API's HTTP (the same watch delay is in both stamps)."""

    def __init__(self):
        self.bump: dict[tuple[str, int], float] = {}
        self.done: dict[tuple[str, int], tuple[float, dict]] = {}

    async def follow(self, session: aiohttp.ClientSession, path: str) -> None:
        async with session.get(path, params={"watch": "true"}, timeout=None) as response:
            async for line in response.content:
                now = time.perf_counter()
                if line.strip():
                    self._see(json.loads(line)["object"], now)

    def _see(self, obj: dict, now: float) -> None:
        name = obj["metadata"]["name"]
        self.bump.setdefault((name, obj.get("spec", {}).get("version", 0)), now)
        last = (obj.get("status") or {}).get("lastSync") or {}
        if last.get("outcome") == "Succeeded":
            self.done.setdefault((name, last["version"]), (now, last))

    async def wait_done(self, keys: list[tuple[str, int]], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while any(k not in self.done for k in keys):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Succeeded status seen for {[k for k in keys if k not in self.done]}")
            await asyncio.sleep(0.005)

    def seconds(self, name: str, version: int) -> float:
        """bump -> Succeeded of one round."""
        return self.done[(name, version)][0] - self.bump[(name, version)]


# -- the daemons' CPU, from /proc -------------------------------------------------------------
def thread_ticks(pid: int) -> dict[int, int]:
    """CPU clock ticks (user + system) of each thread of a process."""
    ticks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            ticks[int(task.name)] = int(fields[11]) + int(fields[12])
    return ticks


async def http_thread(session: aiohttp.ClientSession, url: str, pid: int) -> int:
    """The daemon thread that serves HTTP: the one whose CPU a burst of /healthz calls moves most."""
    before = thread_ticks(pid)
    for _ in range(HEALTHZ_BURST):
        async with session.get(url + "/healthz") as response:
            await response.read()
    after = thread_ticks(pid)
    return max(after, key=lambda tid: after[tid] - before.get(tid, 0))


@dataclass
class DaemonCpu:
    """The daemons' HTTP threads (found once) and their ticks at the start of a measurement."""

    threads: dict[int, int]  # pid -> tid
    start: dict[int, int] = field(default_factory=dict)
    process_start: dict[int, int] = field(default_factory=dict)

    @classmethod
    async def find(cls, fleet: Fleet) -> "DaemonCpu":
        async with aiohttp.ClientSession() as session:
            tids = await asyncio.gather(*(http_thread(session, d.url, d.process.pid) for d in fleet.daemons))
        return cls({d.process.pid: tid for d, tid in zip(fleet.daemons, tids, strict=True)})

    def mark(self) -> None:
        self.start = {pid: thread_ticks(pid).get(tid, 0) for pid, tid in self.threads.items()}
        self.process_start = {pid: sum(thread_ticks(pid).values()) for pid in self.threads}

    def seconds(self) -> tuple[float, float]:
        """(HTTP threads' CPU, whole processes' CPU) since `mark`, summed over the daemons."""
        http = sum(thread_ticks(pid).get(tid, 0) - self.start[pid] for pid, tid in self.threads.items())
        whole = sum(sum(thread_ticks(pid).values()) - self.process_start[pid] for pid in self.threads)
        return http * CLOCK_TICK, whole * CLOCK_TICK


# -- one target count -------------------------------------------------------------------------
@dataclass
class FleetRow:
    targets: int
    e2e: list[float] = field(default_factory=list)
    data_plane: list[float] = field(default_factory=list)
    own: list[float] = field(default_factory=list)
    control: list[float] = field(default_factory=list)
    slowest: list[float] = field(default_factory=list)
    coordinator_cpu: list[float] = field(default_factory=list)
    requests: list[collections.Counter] = field(default_factory=list)
    daemon_cpu_per_call: float = 0.0
    daemon_cpu_per_round: float = 0.0


def writes(requests: collections.Counter) -> collections.Counter:
    """The requests that change something: status writes, events, patches."""
    return collections.Counter({k: n for k, n in requests.items() if k[0] in ("POST", "PATCH", "PUT", "DELETE")})


async def measured_round(c: Cluster, fleet: Fleet, timeline: Timeline, calls: PartyCalls, cpu: SyncCpu,
                         version: int, row: FleetRow | None) -> None:
    """One push of `version`, recorded into `row` (None: a warm-up round)."""
    requests, called, synced = collections.Counter(c.emulator.requests), len(calls.calls), len(cpu.seconds)
    answer = await fleet.trainer.push(version)
    if not answer["ok"]:
        raise RuntimeError(f"{fleet.name} version {version} failed: {answer}")
    await timeline.wait_done([(fleet.name, version)])
    await c.wait_for_event(fleet.namespace, fleet.name, "Synced", f"version {version} live", timeout=30)
    if row is None:
        return
    last = timeline.done[(fleet.name, version)][1]
    round_calls = calls.calls[called:]
    row.e2e.append(timeline.seconds(fleet.name, version))
    row.data_plane.append(last["seconds"])
    row.own.append(row.e2e[-1] - last["totalSeconds"])
    row.control.append(last["totalSeconds"] - last["seconds"])
    row.slowest.append(sum(max((s for _, step, s in round_calls if step == wanted), default=0.0)
                           for wanted in ("start", "finish")))  # a daemon's pause rides on its start
    row.coordinator_cpu.append(sum(cpu.seconds[synced:]))
    row.requests.append(writes(collections.Counter(c.emulator.requests) - requests))


async def measure_targets(workdir: Path, targets: int, rounds: int, warmup: int, mbytes: float) -> FleetRow:
    """A fresh cluster and operator with one WeightSync of `targets` daemons; `rounds` measured."""
    row, calls, cpu = FleetRow(targets), PartyCalls(), SyncCpu()
    async with cluster(workdir) as c, operator(c.url, recheck_interval=3600), \
            daemon_fleet(c, NS, f"fleet-{targets}", targets, mbytes) as fleet:
        timeline = Timeline()
        follower = asyncio.create_task(
            timeline.follow(c.session, f"/apis/weightsync.dev/v1alpha1/namespaces/{NS}/weightsyncs"))
        daemons = await DaemonCpu.find(fleet)
        names = {d.name for d in fleet.daemons}
        try:
            with calls.timing(), cpu.timing():
                for version in range(1, warmup + 1):
                    await measured_round(c, fleet, timeline, calls, cpu, version, None)
                daemons.mark()
                first_call = len(calls.calls)
                for version in range(warmup + 1, warmup + rounds + 1):
                    await measured_round(c, fleet, timeline, calls, cpu, version, row)
                http_seconds, whole = daemons.seconds()
                served = sum(1 for party, _, _ in calls.calls[first_call:] if party in names)
        finally:
            follower.cancel()
    row.daemon_cpu_per_call = http_seconds / max(served, 1)
    row.daemon_cpu_per_round = whole / rounds / targets
    return row


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:8.1f}"


def requests_text(requests: list[collections.Counter]) -> str:
    """Median count per kind of write, e.g. `status 1, events 1, bump 1, pods 0`."""
    kinds = {"status": ("PATCH", "weightsyncs/status"), "events": ("POST", "events"),
             "bump": ("PATCH", "weightsyncs"), "pods": ("PATCH", "pods/status")}
    parts = [f"{label} {statistics.median(r.get(key, 0) for r in requests):g}" for label, key in kinds.items()]
    other = statistics.median(sum(n for k, n in r.items() if k not in kinds.values()) for r in requests)
    return ", ".join(parts + ([f"other {other:g}"] if other else []))


def print_rows(rows: list[FleetRow], rounds: int, warmup: int, mbytes: float) -> None:
    print(f"operator cost at fleet size: {rounds} rounds per target count (after {warmup} warm-up), "
          f"{mbytes:g} MB per round, cpu transport, gated daemon pods, emulated API server; medians, ms")
    print(f"{'targets':>7} {'e2e':>8} {'data':>8} {'own':>8} {'coordCPU':>8} {'control':>8} {'slowest':>8} "
          f"{'dCPU/call':>9} {'dCPU/rnd':>8}  API writes per round")
    for r in rows:
        print(f"{r.targets:>7} {ms(r.e2e)} {ms(r.data_plane)} {ms(r.own)} {ms(r.coordinator_cpu)} {ms(r.control)} "
              f"{ms(r.slowest)} {r.daemon_cpu_per_call * 1e3:9.2f} {r.daemon_cpu_per_round * 1e3:8.1f}  "
              f"{requests_text(r.requests)}")
    base = rows[0]
    if len(rows) > 1:
        print(f"\nratios against {base.targets} targets (same run):")
    for r in rows[1:]:
        print(f"  {r.targets} targets: own part x{statistics.median(r.own) / statistics.median(base.own):.2f}, "
              f"coordinator CPU x{statistics.median(r.coordinator_cpu) / statistics.median(base.coordinator_cpu):.2f}, "
              f"control steps x{statistics.median(r.control) / statistics.median(base.control):.2f}, "
              f"daemon CPU per call x{r.daemon_cpu_per_call / base.daemon_cpu_per_call:.2f}, "
              f"API writes per round {statistics.median(sum(q.values()) for q in r.requests):g} "
              f"(was {statistics.median(sum(q.values()) for q in base.requests):g})")


async def run_targets(workdir: Path, counts: list[int], rounds: int, warmup: int, mbytes: float) -> int:
    rows = [await measure_targets(workdir, n, rounds, warmup, mbytes) for n in counts]
    print_rows(rows, rounds, warmup, mbytes)
    return 0


# -- many WeightSyncs at once -----------------------------------------------------------------
async def run_concurrent(workdir: Path, count: int, targets: int, rounds: int, warmup: int, mbytes: float) -> int:
    """`count` WeightSyncs of `targets` daemons: each one's rounds alone, then all bumped at once."""
    names = [f"job-{i}" for i in range(count)]
    # The API server and the operator (`weightsync operator`, on uvloop) run in processes of their
    # own, as in a cluster: what the operator's process spends is the operator's alone, and this
    # process (following the states, driving the trainers) adds to neither.
    async with remote_cluster(workdir) as c, \
            operator_process(c.kubeconfig, workdir / "operator.log", recheck_interval=3600) as process, \
            contextlib.AsyncExitStack() as stack:
        fleets = []
        for name in names:  # one at a time: each fleet's processes start before the next one's
            fleets.append(await stack.enter_async_context(daemon_fleet(c, NS, name, targets, mbytes)))
        timeline = Timeline()
        follower = asyncio.create_task(
            timeline.follow(c.session, f"/apis/weightsync.dev/v1alpha1/namespaces/{NS}/weightsyncs"))
        try:
            phases, loop = await measure_phases(timeline, fleets, rounds, warmup, process.pid)
        finally:
            follower.cancel()
    return print_concurrent(timeline, names, phases, loop, targets, rounds, mbytes)


async def measure_phases(timeline: Timeline, fleets: list[Fleet], rounds: int, warmup: int,
                         operator_pid: int) -> tuple[dict[str, list[int]], dict[str, "PhaseCpu"]]:
    """`warmup` then `rounds` versions pushed to each fleet alone (one after the other), then as
    many to all at once: the measured versions of each phase, and where each phase's CPU went
    (the operator's process, every thread, and the machine)."""
    phases: dict[str, list[int]] = {"alone": [], "at once": []}
    loop: dict[str, PhaseCpu] = {}
    version = 0
    for phase, versions in phases.items():
        for i in range(warmup + rounds):
            if i == warmup:
                began = process_cpu(operator_pid), time.perf_counter(), machine_jiffies()
            version += 1
            for batch in ([[f] for f in fleets] if phase == "alone" else [fleets]):
                await push_all(timeline, batch, version)
            if i >= warmup:
                versions.append(version)
        loop[phase] = PhaseCpu(process_cpu(operator_pid) - began[0], time.perf_counter() - began[1],
                               machine_busy(began[2], machine_jiffies()))
    return phases, loop


@dataclass
class PhaseCpu:
    """Where a phase's CPU went: the operator's process, and the machine as a whole (every party
    shares it here; on a cluster each WeightSync's trainer and targets have their own)."""

    loop_seconds: float  # the operator's process, all its threads
    wall_seconds: float
    machine_busy: float  # the fraction of all the machine's cores that were busy


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * CLOCK_TICK


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all the machine's cores, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


def machine_busy(began: tuple[int, int], ended: tuple[int, int]) -> float:
    return (ended[0] - began[0]) / max(1, ended[1] - began[1])


async def push_all(timeline: Timeline, fleets: list[Fleet], version: int) -> None:
    """Push `version` on every fleet at once; all must succeed."""
    answers = await asyncio.gather(*(f.trainer.push(version) for f in fleets))
    failed = [(f.name, a) for f, a in zip(fleets, answers, strict=True) if not a["ok"]]
    if failed:
        raise RuntimeError(f"version {version} failed: {failed}")
    await timeline.wait_done([(f.name, version) for f in fleets])


def split(timeline: Timeline, names: list[str], versions: list[int]) -> dict[str, list[float]]:
    """Every measured round of these versions: end to end, data plane, control steps, own part."""
    out: dict[str, list[float]] = {"e2e": [], "data": [], "control": [], "own": []}
    for name in names:
        for v in versions:
            last, e2e = timeline.done[(name, v)][1], timeline.seconds(name, v)
            out["e2e"].append(e2e)
            out["data"].append(last["seconds"])
            out["control"].append(last["totalSeconds"] - last["seconds"])
            out["own"].append(e2e - last["totalSeconds"])
    return out


def print_concurrent(timeline: Timeline, names: list[str], phases: dict[str, list[int]],
                     loop: dict[str, PhaseCpu], targets: int, rounds: int, mbytes: float) -> int:
    alone, together = phases["alone"], phases["at once"]
    print(f"\n{len(names)} WeightSyncs of {targets} daemon targets each, {mbytes:g} MB per round, {rounds} rounds "
          f"alone (one WeightSync at a time) then {rounds} with all bumped at once; bump -> Succeeded, median ms")
    print(f"{'WeightSync':<10} {'alone':>8} {'at once':>8} {'ratio':>6}")
    ratios = []
    for name in names:
        a, t = (statistics.median(timeline.seconds(name, v) for v in vs) for vs in (alone, together))
        ratios.append(t / a)
        print(f"{name:<10} {a * 1e3:8.1f} {t * 1e3:8.1f} {t / a:6.2f}")
    print(f"{'all, ms':<10} {'e2e':>8} {'data':>8} {'control':>8} {'own':>8}   "
          "the operator's process (`weightsync operator`; the API server in another)")
    for phase, versions in phases.items():
        parts = split(timeline, names, versions)
        cpu = loop[phase]
        print(f"{phase:<10} " + " ".join(ms(parts[k]) for k in ("e2e", "data", "control", "own"))
              + f"   {cpu.loop_seconds / rounds * 1e3:.1f} ms CPU per round of all {len(names)}, "
              f"{cpu.loop_seconds / cpu.wall_seconds:.0%} of a core; the machine's {os.cpu_count()} cores "
              f"{cpu.machine_busy:.0%} busy")
    serial = sum(statistics.median(timeline.seconds(n, v) for v in alone) for n in names)
    spans = [max(timeline.done[(n, v)][0] for n in names) - min(timeline.bump[(n, v)] for n in names)
             for v in together]
    print(f"bumped at once, the last of the {len(names)} succeeds {statistics.median(spans) * 1e3:.1f} ms after the "
          f"first bump (median); one after the other they take {serial * 1e3:.1f} ms")
    worst = max(ratios)
    verdict = "within" if worst <= CONCURRENT_BOUND else "OUTSIDE"
    print(f"all {len(names) * rounds * 2} measured rounds succeeded; worst ratio {worst:.2f}: {verdict} the "
          f"{CONCURRENT_BOUND:g}x bound")
    return 0 if worst <= CONCURRENT_BOUND else 1
