"""A real SGLang server (0.5.23, with the weightsync plugin) as a local child process: started,
awaited until `/health` answers (with a deadline), and stopped with every process it forked
(HTTP server, scheduler, detokenizer).

Which Python runs it: $WEIGHTSYNC_SGLANG_PYTHON if set (a venv holding `sglang==0.5.23` and
`weightsync[sglang]`, as `make sglang-venv` builds), else this interpreter. On a machine without
a GPU it serves with SGLang's CPU engine; SGLang's kernel package has no CPU build on the
registry, so the caller's environment must make one importable (`make demo-sglang` puts the
tests' pure-torch stand-in on PYTHONPATH).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx

from weightsync_operator.demo.vllm_server import _signal_group, _terminate_with_parent

PYTHON_ENV = "WEIGHTSYNC_SGLANG_PYTHON"
# SGLang's CPU engine as measured on 2 cores: torch attention and sampling, no graphs, a small pool.
CPU_FLAGS = ["--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
             "--disable-cuda-graph", "--disable-overlap-schedule", "--max-total-tokens", "4096",
             "--max-running-requests", "8"]


def sglang_python() -> str:
    return os.environ.get(PYTHON_ENV) or sys.executable


def serve_args(model: str | Path, port: int, cpu: bool, admin_key: str | None) -> list[str]:
    """The tiny float32 model (exact greedy comparisons need float32), token ids in and out."""
    return ["--model-path", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--context-length", "256", "--skip-tokenizer-init", *(CPU_FLAGS if cpu else []),
            *([f"--admin-api-key={admin_key}"] if admin_key else [])]  # one word: a key may start with "-"


@dataclass
class SglangServer:
    url: str
    process: asyncio.subprocess.Process
    log_path: Path
    _log: BinaryIO | None = field(default=None, repr=False)

    @classmethod
    async def start(cls, model: str | Path, port: int, work_dir: str | Path, cpu: bool = True,
                    admin_key: str | None = None, timeout: float = 300.0, python: str | None = None) -> "SglangServer":
        """Start the server and return once `/health` answers 200; on a deadline or an early exit,
        stop it and raise with the end of its log. `admin_key`: its --admin-api-key (the
        coordinator's token, so that its weight-update routes take only that)."""
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        log_path = work_dir / f"sglang-{port}.log"
        log = open(log_path, "wb")
        env = {**os.environ, "SGLANG_PLUGINS": "weightsync", **({"SGLANG_USE_CPU_ENGINE": "1"} if cpu else {})}
        process = await asyncio.create_subprocess_exec(
            python or sglang_python(), "-m", "sglang.launch_server", *serve_args(model, port, cpu, admin_key),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env,
            cwd=work_dir, start_new_session=True, preexec_fn=_terminate_with_parent)
        server = cls(f"http://127.0.0.1:{port}", process, log_path, log)
        try:
            await server._wait_healthy(timeout)
        except BaseException:
            await server.stop()
            raise
        return server

    async def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as http:
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"SGLang exited with {self.process.returncode} before it was healthy:\n"
                                       f"{self.log_tail()}")
                try:
                    if (await http.get(self.url + "/health", timeout=2.0)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SGLang was not healthy within {timeout:g}s:\n{self.log_tail()}")
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
        """SIGTERM to the server's process group, SIGKILL to whatever is left after `timeout`."""
        import signal

        if self.process.returncode is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                pass
        _signal_group(self.process.pid, signal.SIGKILL)
        if self.process.returncode is None:
            await self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
