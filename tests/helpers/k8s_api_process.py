"""The emulated API server (k8s_emulator.ClusterEmulator behind kmock's HTTP server) in a process
of its own.

In a cluster the API server is another machine; in-process (k8s_harness.cluster) it shares the
operator's event loop and its CPU is charged to the operator. The fleet benchmark measures the
operator's cost with many WeightSyncs at once, so it runs the API server here instead. Prints one
JSON line `{"url": ...}` once it listens (weightsync_operator.local.LocalProcess reads it) and
serves until its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys

import kmock

from helpers.k8s_emulator import ClusterEmulator


async def serve() -> None:
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        print(json.dumps({"url": str(server.url).rstrip("/")}), flush=True)
        await asyncio.to_thread(sys.stdin.read)  # returns at EOF: the parent stopped or died


if __name__ == "__main__":
    asyncio.run(serve())
