"""A real SGLang server (0.5.23, CPU, from the SGLang venv) and the trainer process that feeds it
(tests/helpers/sglang_trainer.py, run with the SGLang venv's python), as the engine tests start
them.

The SGLang venv is found through WEIGHTSYNC_SGLANG_PYTHON (default .venv-sglang/bin/python, which
`make sglang-venv` builds); the `sglang_python` fixture (tests/conftest.py) skips without it,
except under CI, where it fails. The server runs SGLang's CPU engine with the test stand-in for
SGLang's kernel module on its path (tests/helpers/sglang_cpu_kernel: test infrastructure, never
the backend's), with the flags measured to work on 2 cores (../shared/reference/sglang-on-cpu.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from helpers.vllm_server import ROOT, Trainer, side_files_env, wait_healthy
from weightsync_operator.local import free_port

SGLANG_PYTHON = os.environ.get("WEIGHTSYNC_SGLANG_PYTHON", str(ROOT / ".venv-sglang" / "bin" / "python"))
TRAINER = ROOT / "tests" / "helpers" / "sglang_trainer.py"
CPU_KERNEL = ROOT / "tests" / "helpers" / "sglang_cpu_kernel"
SERVER_START_S = 300  # a cold start on 2 busy cores; measured 17-60 s
TIMEOUT_S = 10.0  # the group's timeout_seconds: a lost trainer fails SGLang's update within it
MAX_TOKENS = 8
PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], [17] * 3 + [4, 44, 444], [(i * 37 + 11) % 1000 for i in range(50)]]
# Chunks of 1 MiB: the round (about 2.2 MB) moves in several, so a trainer killed mid-round
# leaves part of it unsent.
INIT_FIELDS = {"timeout_seconds": TIMEOUT_S, "init_timeout_seconds": 120, "packed_buffer_size_bytes": 1 << 20}


def sglang_python_problem() -> str | None:
    """Why the SGLang venv can't run these tests, or None."""
    if not Path(SGLANG_PYTHON).exists():
        return f"no SGLang venv at {SGLANG_PYTHON} (run `make sglang-venv` or set WEIGHTSYNC_SGLANG_PYTHON)"
    probe = subprocess.run([SGLANG_PYTHON, "-c", "import sglang, transformers, weightsync_sglang"],
                           capture_output=True, text=True, timeout=180)
    if probe.returncode != 0:
        return f"{SGLANG_PYTHON} cannot import sglang/transformers/weightsync_sglang: {probe.stderr[-1500:]}"
    return None


class SGLangTrainerProcess(Trainer):
    """The trainer process (tests/helpers/sglang_trainer.py), spoken to in JSON lines as the
    vLLM tests' trainer is."""

    def __init__(self, python: str, tmp: Path, arch: str = "qwen2", name: str = "trainer"):
        self._argv = [python, str(TRAINER), "--model-dir", str(tmp / f"{name}-model"), "--arch", arch]
        super().__init__(python, tmp, tied=False, name=name)

    def _command(self) -> list[str]:
        return self._argv


class SGLangServer:
    """A real SGLang server process (its scheduler and detokenizer are its children)."""

    def __init__(self, python: str, tmp: Path, model_dir: Path, tp: int = 1, admin_key: str | None = None,
                 metrics_port: int | None = None):
        """`admin_key`: SGLang's `--admin-api-key` (its weight-update, pause and version routes then
        take only that key; generation stays open); this client sends it on every call.
        `metrics_port`: the plugin's WEIGHTSYNC_METRICS_PORT (worker i serves on it + i)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = side_files_env(tmp)
        env.update({"SGLANG_USE_CPU_ENGINE": "1", "SGLANG_CPU_OMP_THREADS_BIND": "|".join(str(i) for i in range(tp))
                    if tp > 1 else "0-1", "PYTHONPATH": str(CPU_KERNEL)})
        if metrics_port is not None:
            env["WEIGHTSYNC_METRICS_PORT"] = str(metrics_port)
        self.log_path = tmp / f"sglang-tp{tp}.log"
        self.log = open(self.log_path, "w")
        argv = [python, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--host", "127.0.0.1",
                "--port", str(self.port), "--device", "cpu", "--dtype", "float32", "--tp-size", str(tp),
                "--attention-backend", "torch_native", "--sampling-backend", "pytorch", "--disable-cuda-graph",
                "--disable-overlap-schedule", "--max-total-tokens", "4096", "--max-running-requests", "8",
                "--context-length", "256", "--skip-tokenizer-init",
                *(["--admin-api-key", admin_key] if admin_key else [])]
        self.started = time.monotonic()
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
                                        start_new_session=True)
        self.http = httpx.Client(base_url=self.url, timeout=120, limits=httpx.Limits(max_keepalive_connections=0),
                                 headers={"Authorization": f"Bearer {admin_key}"} if admin_key else {})
        self._wait_healthy()
        self.start_seconds = time.monotonic() - self.started

    def _wait_healthy(self) -> None:
        wait_healthy("SGLang", self.url, self.process, self.tail, SERVER_START_S)

    def tail(self) -> str:
        return self.log_path.read_text()[-4000:]

    def generate(self, prompt: list[int], max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        """SGLang's native /generate at temperature 0: the whole answer (ids and meta_info)."""
        response = self.http.post("/generate", json={"input_ids": prompt, "sampling_params": {
            "temperature": 0, "max_new_tokens": max_tokens, "ignore_eos": True}})
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def completions(self) -> list[list[int]]:
        return [self.generate(prompt)["output_ids"] for prompt in PROMPTS]

    def weight_version(self) -> str:
        return str(self.http.get("/model_info").json()["weight_version"])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the group this test started
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.http.close()
        self.log.close()
