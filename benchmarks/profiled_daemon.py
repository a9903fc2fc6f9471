"""`python -m weightsync_daemon`, under yappi's CPU clock on every thread (benchmarks/
daemon_call_profile.py starts it). When the daemon stops, the functions that cost it the most CPU
go to the file $WEIGHTSYNC_PROFILE_OUT, so that a per-call cost is cut where it is spent."""

from __future__ import annotations

import os
import sys

import yappi

from weightsync_daemon.server import main

TOP = 60


def run(argv: list[str]) -> int:
    yappi.set_clock_type("cpu")
    yappi.start(builtins=True, profile_threads=True)
    try:
        return main(argv)
    finally:
        yappi.stop()
        stats = yappi.get_func_stats()
        with open(os.environ["WEIGHTSYNC_PROFILE_OUT"], "w") as out:
            for order in ("tsub", "ttot"):
                out.write(f"== by {order} (seconds of CPU; ncall) ==\n")
                for s in list(stats.sort(order))[:TOP]:
                    out.write(f"{s.tsub:9.4f} {s.ttot:9.4f} {s.ncall:8d}  {s.full_name}\n")


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
