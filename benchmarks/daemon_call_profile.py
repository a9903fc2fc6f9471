"""Where a daemon's CPU per control call goes: one daemon under yappi (benchmarks/profiled_daemon.py)
and a trainer agent, driven by the coordinator (no Kubernetes) through `--rounds` rounds of a tiny
model (the demo worker's), so that the control calls, not the payload, dominate.

    pip install yappi                                          # not a dependency of weightsync
    python benchmarks/daemon_call_profile.py --rounds 300      # prints the top functions, self and total

yappi's own cost inflates every figure (several times over); the ranking is what it is for. The
unprofiled CPU per call is `operator_overhead.py --targets`'s daemon CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "daemon", REPO / "operator", REPO / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from weightsync_operator.coordinator import Coordinator, SyncSpec, Timeouts  # noqa: E402
from weightsync_operator.local import LocalProcess, free_port, stop_all  # noqa: E402


async def run(rounds: int) -> int:
    with tempfile.TemporaryDirectory(prefix="weightsync-profile-") as work:
        out = Path(work) / "profile.txt"
        env = {"WEIGHTSYNC_PROFILE_OUT": str(out),
               "PYTHONPATH": str(REPO / "benchmarks")}
        trainer, daemon = await asyncio.gather(
            LocalProcess.start("trainer", "weightsync_operator.demo.worker", ["--role", "trainer",
                                                                                "--exit-on-stdin-eof"]),
            LocalProcess.start("daemon", "profiled_daemon", ["--port", "0", "--backend", "cpu",
                                                             "--exit-on-stdin-eof"], timeout=120, env=env))
        try:
            spec = SyncSpec(master_port=free_port(), packed_buffer_size_bytes=1 << 22, pause_mode="keep",
                            timeouts=Timeouts(request=10, init=120, start=30, update=120, finish=60))
            async with Coordinator(trainer.endpoint, [daemon.endpoint], spec) as coordinator:
                await coordinator.init()
                for version in range(1, rounds + 1):
                    result = await coordinator.sync(version)
                    if not result.ok:
                        print(f"version {version} failed: {result.reason}", file=sys.stderr)
                        return 1
        finally:
            await stop_all([trainer, daemon])
        print(f"{rounds} rounds: {3 * rounds} control and update calls on the daemon (yappi, CPU clock)")
        print(out.read_text())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    return asyncio.run(run(parser.parse_args().rounds))


if __name__ == "__main__":
    sys.exit(main())
