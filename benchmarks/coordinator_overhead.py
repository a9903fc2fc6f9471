"""The coordinator's control steps per round (pause, start, finish, resume over HTTP: a round's
total time minus its update step), against weightsync daemons or a real vLLM server.

    python benchmarks/coordinator_overhead.py                       # 2 daemons, 30 rounds per client
    python benchmarks/coordinator_overhead.py --engine vllm          # 1 vLLM CPU server (TP 1)
    WEIGHTSYNC_VLLM_PYTHON=.venv-vllm/bin/python python benchmarks/coordinator_overhead.py --engine vllm

No Kubernetes (benchmarks/operator_overhead.py measures the operator around it): one
coordinator drives a trainer and its targets, all real processes on the cpu transport. Rounds
alternate between the two connection pools a Coordinator accepts, in the same run: an httpx
client (the baseline, what the operator used before) and aiohttp's (`party_session`, what it
uses now); the ratio is the claim, the absolute figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "daemon", REPO / "operator"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import httpx  # noqa: E402

from weightsync_operator.client import Endpoint, party_session  # noqa: E402
from weightsync_operator.coordinator import Coordinator, SyncSpec, Timeouts  # noqa: E402
from weightsync_operator.local import LocalProcess, free_port, stop_all  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def start(engine: str, daemons: int, work: Path):
    """(trainer, target endpoints, everything to stop afterwards)."""
    if engine == "daemon":
        trainer, *targets = await asyncio.gather(
            LocalProcess.start("trainer", "weightsync_operator.demo.worker", ["--role", "trainer",
                                                                                "--exit-on-stdin-eof"]),
            *(LocalProcess.start(f"daemon-{i}", "weightsync_daemon",
                                 ["--port", "0", "--backend", "cpu", "--exit-on-stdin-eof"]) for i in range(daemons)))
        return trainer, [t.endpoint for t in targets], [trainer, *targets]
    from weightsync_operator.demo.vllm_run import start_parties

    python = os.environ.get("WEIGHTSYNC_VLLM_PYTHON")
    if not python:
        raise SystemExit("--engine vllm needs WEIGHTSYNC_VLLM_PYTHON: the Python of a venv with vLLM's CPU build")
    _, trainer, server = await start_parties(work, python)
    return trainer, [Endpoint("vllm", server.url, kind="vllm")], [trainer, server]


async def run(engine: str, rounds: int, warmup: int, daemons: int) -> int:
    with tempfile.TemporaryDirectory(prefix="weightsync-coordinator-bench-") as work:
        trainer, targets, processes = await start(engine, daemons, Path(work))
        try:
            spec = SyncSpec(master_port=free_port(), packed_buffer_size_bytes=1 << 22, pause_mode="keep",
                            timeouts=Timeouts(request=10, init=120, start=30, update=120, finish=60))
            async with httpx.AsyncClient() as baseline, party_session() as pool:
                clients = {"httpx (baseline)": baseline, "aiohttp (party_session)": pool}
                coordinators = {name: Coordinator(trainer.endpoint, targets, spec, http)
                                for name, http in clients.items()}
                await coordinators["aiohttp (party_session)"].init()  # one group; either pool drives it
                for c in coordinators.values():
                    c.group = coordinators["aiohttp (party_session)"].group
                control: dict[str, list[float]] = {name: [] for name in clients}
                version = 0
                for i in range(warmup + rounds):
                    for name, coordinator in coordinators.items():
                        version += 1
                        result = await coordinator.sync(version)
                        if not result.ok:
                            print(f"version {version} failed: {result.reason}", file=sys.stderr)
                            return 1
                        if i >= warmup:
                            control[name].append((result.total_seconds - result.transfer_seconds) * 1e3)
        finally:
            await stop_all(processes)

    what = f"{len(targets)} daemon(s)" if engine == "daemon" else "1 vLLM CPU server (TP 1)"
    print(f"coordinator control steps per round (total - update step): {rounds} rounds per pool "
          f"(after {warmup} warm-up), trainer + {what}, cpu transport")
    print(f"{'ms':<28} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
    for name, values in control.items():
        print(f"{name:<28} {statistics.median(values):8.1f} {percentile(values, 0.9):8.1f} "
              f"{min(values):8.1f} {max(values):8.1f}")
    base, new = (statistics.median(v) for v in control.values())
    print(f"\naiohttp's pool takes {new / base:.2f}x the baseline's control-step time (median)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["daemon", "vllm"], default="daemon")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--daemons", type=int, default=2)
    args = parser.parse_args()
    return asyncio.run(run(args.engine, args.rounds, args.warmup, args.daemons))


if __name__ == "__main__":
    sys.exit(main())
