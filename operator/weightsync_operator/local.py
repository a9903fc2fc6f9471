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
from pathlib import Path

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
        assert process.stdout is not None and process.stdin is not None  # both piped above
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
        if self.process.stdin is not None:
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
    """A TCP port that was free a moment ago (for a rendezvous, or a server's --port), chosen
    below the kernel's ephemeral range: a process that binds port 0 meanwhile (a daemon started
    with --port 0, an outgoing connection) is never given it, and this process never hands the
    same port out twice."""
    import random
    import socket

    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - _RESERVED_SPAN), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free TCP port below {low} after 200 tries")


_RESERVED_SPAN = 20000  # the ports below the ephemeral range that free_port draws from
_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
