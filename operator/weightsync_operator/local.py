"""Local processes that speak the daemon protocol: started, awaited until ready, and stopped.

Each child prints one JSON line `{"url": ...}` once its HTTP server listens; the parent reads it
with a deadline. `stop` sends SIGTERM (and closes the child's stdin, which ends a child started
with `--exit-on-stdin-eof`, so children go with a parent that dies without stopping them).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass

from weightsync_operator.client import Endpoint


@dataclass
class LocalProcess:
    name: str
    url: str
    process: asyncio.subprocess.Process

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self.url)

    @classmethod
    async def start(cls, name: str, module: str, args: list[str], timeout: float = 60.0,
                    env: dict[str, str] | None = None, python: str | None = None) -> "LocalProcess":
        """Run `python -m module args` (this interpreter unless `python` names another, e.g. the
        vLLM venv's) and wait for its ready line."""
        process = await asyncio.create_subprocess_exec(
            python or sys.executable, "-m", module, *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
            env={**os.environ, **(env or {})})
        try:
            line = await asyncio.wait_for(process.stdout.readline(), timeout)
            url = json.loads(line)["url"]
        except (TimeoutError, ValueError, KeyError) as error:
            process.kill()
            await process.wait()
            raise RuntimeError(f"{name} did not become ready within {timeout:g}s ({error!r})") from None
        return cls(name, url, process)

    async def stop(self, timeout: float = 10.0) -> None:
        if self.process.returncode is not None:
            return
        self.process.stdin.close()
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def stop_all(processes: list[LocalProcess]) -> None:
    await asyncio.gather(*(p.stop() for p in processes), return_exceptions=True)


def free_port() -> int:
    """A TCP port that was free a moment ago (for the trainer's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
