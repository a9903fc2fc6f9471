"""A real vLLM server (the CPU build, from the vLLM venv) and the trainer process that feeds it
(tests/helpers/vllm_trainer.py, run with the vLLM venv's python: a tiny Hugging Face model whose
checkpoint the server starts from), as the engine and control-plane tests start them.

The vLLM venv is found through WEIGHTSYNC_VLLM_PYTHON (default .venv-vllm/bin/python, which
`make vllm-venv` builds); the `vllm_python` fixture (tests/conftest.py) skips without it, except
under CI, where it fails.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from weightsync_operator.local import free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = os.environ.get("WEIGHTSYNC_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
TRAINER = ROOT / "tests" / "helpers" / "vllm_trainer.py"
SERVER_START_S = 300  # a cold start on 2 busy cores; usually 25-50 s
TIMEOUT_S = 10.0  # the group's timeout_seconds: a lost trainer fails vLLM's update within it
MAX_TOKENS = 8
PROMPTS = [
    [5, 6, 7, 8, 9],
    [100, 200, 300],
    [17] * 3 + [4, 44, 444],
    # Longer than one KV block (32 tokens): asked again after every round, so a stale prefix
    # cache (KV computed with the old weights) would show.
    [(i * 37 + 11) % 1000 for i in range(50)],
]

# Chunks of 1 MiB: the round (2.2 MB) moves in three, and the loader's staging (two chunks)
# holds the largest tensor (the 512 KiB embedding) wherever it starts.
INIT_FIELDS = {"timeout_seconds": TIMEOUT_S, "init_timeout_seconds": 120, "packed_buffer_size_bytes": 1 << 20}


def vllm_python_problem() -> str | None:
    """Why the vLLM venv can't run these tests, or None."""
    if not Path(VLLM_PYTHON).exists():
        return f"no vLLM venv at {VLLM_PYTHON} (run `make vllm-venv` or set WEIGHTSYNC_VLLM_PYTHON)"
    probe = subprocess.run([VLLM_PYTHON, "-c", "import vllm, transformers, weightsync_vllm"],
                           capture_output=True, text=True, timeout=180)
    if probe.returncode != 0:
        return f"{VLLM_PYTHON} cannot import vllm/transformers/weightsync_vllm: {probe.stderr[-1500:]}"
    return None


def side_files_env(tmp: Path) -> dict[str, str]:
    """vLLM's and torch's caches and temp files stay in the test's directory."""
    (tmp / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp / "tmp"), "VLLM_CACHE_ROOT": str(tmp / "cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(tmp / "cache" / "inductor"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class Trainer:
    """The trainer process, spoken to in JSON lines."""

    def __init__(self, python: str, tmp: Path, tied: bool, name: str = "trainer", arch: str = "qwen2",
                 max_positions: int = 256, layers: int = 2):
        self.log = open(tmp / f"{name}.log", "w")
        self.process = subprocess.Popen(
            self._command() or [python, str(TRAINER), "--model-dir", str(tmp / f"{name}-model"),
                                *(["--tied"] if tied else []), "--arch", arch, "--max-positions", str(max_positions),
                                "--layers", str(layers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=side_files_env(tmp), cwd=ROOT)
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.next(timeout=180)
        assert self.ready.get("ready"), self.ready
        self.model_dir = tmp / f"{name}-model"

    def _command(self) -> list[str] | None:
        """Another trainer script's command line (the SGLang tests' trainer), or None: this one."""
        return None

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(json.loads(line))

    def next(self, timeout: float) -> dict:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the trainer said nothing within {timeout}s "
                                 f"(exit code {self.process.poll()}; see {self.log.name})") from None

    def send(self, **command) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def ask(self, timeout: float = 120, **command) -> dict:
        self.send(**command)
        answer = self.next(timeout)
        assert "error" not in answer, answer
        return answer

    def hf_greedy(self) -> list[list[int]]:
        return self.ask(cmd="generate", prompts=PROMPTS, max_tokens=MAX_TOKENS)["tokens"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self.log.close()



def wait_healthy(engine: str, url: str, process: subprocess.Popen, tail: Callable[[], str], within_s: float) -> None:
    """Poll a server's /health until it answers 200; fail with its log's tail if the process
    exits first or `within_s` passes (the vLLM and SGLang test servers alike)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{engine} exited with {process.returncode}: {tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{engine} not healthy within {within_s}s: {tail()}")

class Server:
    """A real vLLM API server process (its engine core and workers are its children)."""

    def __init__(self, python: str, tmp: Path, model_dir: Path, tp: int, max_model_len: int = 256):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = side_files_env(tmp)
        env["VLLM_SERVER_DEV_MODE"] = "1"  # vLLM's weight-transfer routes exist only then
        if tp > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
        self.log_path = tmp / f"vllm-tp{tp}.log"
        self.log = open(self.log_path, "w")
        argv = [python, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_dir),
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
                "--max-model-len", str(max_model_len), "--max-num-seqs", "4", "--enforce-eager", "--block-size", "32",
                "--kv-cache-memory-bytes", str(64 << 20), "--skip-tokenizer-init",
                "--tensor-parallel-size", str(tp), "--weight-transfer-config", '{"backend": "weightsync"}']
        self.started = time.monotonic()
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        cwd=tmp, start_new_session=True)
        self.http = httpx.Client(base_url=self.url, timeout=120,
                                 limits=httpx.Limits(max_keepalive_connections=0))
        self._wait_healthy()
        self.start_seconds = time.monotonic() - self.started

    def _wait_healthy(self) -> None:
        wait_healthy("vLLM", self.url, self.process, self.tail, SERVER_START_S)

    def tail(self) -> str:
        return self.log_path.read_text()[-4000:]

    def completions(self) -> list[list[int]]:
        out = []
        for prompt in PROMPTS:
            response = self.http.post("/v1/completions", json={
                "model": self.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            assert response.status_code == 200, response.text
            out.append(response.json()["choices"][0]["token_ids"])
        return out

    @property
    def model(self) -> str:
        return self.http.get("/v1/models").json()["data"][0]["id"]

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


@contextmanager
def joined(python: str, tmp: Path, tp: int, server_options: dict | None = None,
           **trainer_options) -> Iterator[tuple[Trainer, Server]]:
    """A trainer and a vLLM server (tensor parallel `tp`) on the trainer's checkpoint, joined in
    one weightsync group; both are stopped on the way out (a test module's fixture holds them)."""
    trainer = Trainer(python, tmp, **trainer_options)
    server = None
    try:
        server = Server(python, tmp, trainer.model_dir, tp, **(server_options or {}))
        print(f"\n[{tmp.name}] vLLM healthy after {server.start_seconds:.1f}s", file=sys.stderr)
        trainer.ask(cmd="init", url=server.url, master_port=free_port(), fields=INIT_FIELDS)
        yield trainer, server
    finally:
        trainer.stop()
        if server is not None:
            server.stop()


def vllm_serve_flags(python: str, argv: list[str]) -> dict:
    """What vLLM's own `vllm serve` parser makes of `argv` (run with `python`, a vLLM venv's):
    port, host, model, the weight-transfer backend and the tensor-parallel size. 0.33 moved the
    parser from vllm.entrypoints.launchers.cli_args to vllm.entrypoints.common.cli_args."""
    probe = ("import json, sys\n"
             "try:\n"
             "    from vllm.entrypoints.common.cli_args import make_arg_parser\n"
             "except ImportError:  # vLLM 0.32\n"
             "    from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
             "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
             "a = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.argv[1]))\n"
             "print(json.dumps({'port': a.port, 'host': a.host, 'model': getattr(a, 'model_tag', None) or a.model,\n"
             "                  'backend': a.weight_transfer_config.backend, 'tp': a.tensor_parallel_size}))\n")
    parsed = subprocess.run([python, "-c", probe, json.dumps(argv)], capture_output=True, text=True,
                            timeout=180, cwd=ROOT)
    assert parsed.returncode == 0, parsed.stderr[-2000:]
    return json.loads(parsed.stdout.strip().splitlines()[-1])
