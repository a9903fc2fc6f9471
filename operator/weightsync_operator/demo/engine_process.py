"""An inference server (vLLM, SGLang) as a local child process in a process group of its own:
awaited until `/health` answers, with a deadline, and stopped with every process it forked (its
API server, engine core, schedulers, workers), so a demo or a test leaves no server behind."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, ClassVar

import httpx


def terminate_with_parent() -> None:
    """In the child before it runs the server: SIGTERM when this process dies, however it dies,
    so a killed demo or test run leaves no server behind (the server then stops its own
    children). Linux only; elsewhere `stop()` is the only way."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class EngineProcess:
    """A started server: where it answers, its process (the leader of its group) and its log."""

    engine: ClassVar[str]  # its name in messages
    url: str
    process: asyncio.subprocess.Process
    log_path: Path
    _log: BinaryIO | None = field(default=None, repr=False)

    async def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as http:
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"{self.engine} exited with {self.process.returncode} before it was "
                                       f"healthy:\n{self.log_tail()}")
                try:
                    if (await http.get(self.url + "/health", timeout=2.0)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.engine} was not healthy within {timeout:g}s:\n{self.log_tail()}")
                try:  # poll every half second, or return at once if the process exits
                    await asyncio.wait_for(asyncio.shield(self.process.wait()), 0.5)
                except TimeoutError:
                    pass

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group (it shuts its own children down), SIGKILL to
        whatever is left after `timeout`."""
        if self.process.returncode is None:
            signal_group(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                pass
        signal_group(self.process.pid, signal.SIGKILL)  # stragglers (workers) of the group
        if self.process.returncode is None:
            await self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
