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
from dataclasses import dataclass
from pathlib import Path


from weightsync_operator.demo.engine_process import EngineProcess, terminate_with_parent

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
class SglangServer(EngineProcess):
    engine = "SGLang"

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
            cwd=work_dir, start_new_session=True, preexec_fn=terminate_with_parent)
        server = cls(f"http://127.0.0.1:{port}", process, log_path, log)
        try:
            await server._wait_healthy(timeout)
        except BaseException:
            await server.stop()
            raise
        return server
