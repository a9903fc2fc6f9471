"""The documented vLLM serve commands run as written (issue 23 item 3).

The README's CPU command once died on a 24 GiB machine before serving anything: on the CPU,
`--gpu-memory-utilization` (0.92 by default) is the share of the machine's memory vLLM reserves,
and a loaded machine has less free. The blocks annotated `covered` by this file's tests, in the
README and docs/vllm.md:

- the CPU command runs exactly as written (bash, from a temp dir), with only the environment
  its first line reads (`MODEL`, `PORT`) pointing it at a local tiny checkpoint and a free
  port, and the vLLM venv's python first on PATH: it must serve (`/health`), complete a text
  prompt through the checkpoint's tokenizer, and expose the weight-transfer routes with the
  weightsync backend (`/get_world_size`);
- the GPU command (`vllm serve ...`) cannot run here: its flags are parsed by vLLM's own
  `vllm serve` parser, which must find the weightsync backend.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers.snippets import PAGES, page_snippets
from helpers.vllm_server import SERVER_START_S, side_files_env, vllm_serve_flags
from weightsync_operator.local import free_port

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
HERE = "tests/engines/test_vllm_serve_command.py::"
CPU_TEST = HERE + "test_the_cpu_serve_command_runs_as_written"
GPU_TEST = HERE + "test_the_gpu_serve_command_parses_with_vllms_parser"


def blocks(test_id: str) -> list[str]:
    """The distinct blocks of the README and docs pages that name `test_id` as their test."""
    found = [s.code for page in PAGES for s in page_snippets(page)
             if s.kind == "covered" and s.argument.split()[0] == test_id]
    assert found, f"no block of the README or docs/ is covered by {test_id}"
    return list(dict.fromkeys(found))


def checkpoint(python: str, directory: Path, tmp: Path) -> Path:
    made = subprocess.run([python, str(ROOT / "tests" / "helpers" / "tiny_checkpoint.py"), str(directory),
                           "--max-positions", "8192"], capture_output=True, text=True, timeout=300,
                          env=side_files_env(tmp), cwd=ROOT / "tests" / "helpers")
    assert made.returncode == 0, made.stderr[-3000:]
    return directory


def wait_healthy(url: str, process: subprocess.Popen, log: Path) -> float:
    started, deadline = time.monotonic(), time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the command exited with {process.returncode}:\n{log.read_text()[-4000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not healthy within {SERVER_START_S}s:\n{log.read_text()[-4000:]}")


@pytest.mark.parametrize("block", blocks(CPU_TEST), ids=lambda b: b.splitlines()[0][:40])
def test_the_cpu_serve_command_runs_as_written(vllm_python, tmp_path, block):
    model = checkpoint(vllm_python, tmp_path / "model", tmp_path)
    port = free_port()
    env = {**side_files_env(tmp_path), "MODEL": str(model), "PORT": str(port),
           "PATH": f"{Path(vllm_python).parent}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], stdout=out, stderr=subprocess.STDOUT,
                                   env=env, cwd=tmp_path, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        seconds = wait_healthy(url, process, log)
        print(f"\nthe CPU command served after {seconds:.1f}s", file=sys.stderr)
        served = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        completion = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": served, "prompt": "the quick brown fox", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] == 5
        # VLLM_SERVER_DEV_MODE=1 and the weightsync backend: the weight-transfer routes answer.
        assert httpx.get(f"{url}/get_world_size", timeout=30).json()["world_size"] == 1
        assert "Available memory on node" not in log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the session this test started
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


@pytest.mark.parametrize("block", blocks(GPU_TEST), ids=lambda b: b.splitlines()[0][:40])
def test_the_gpu_serve_command_parses_with_vllms_parser(vllm_python, block):
    (command,) = [c for c in block.replace("\\\n", " ").splitlines() if "vllm serve" in c]
    words = shlex.split(command)
    got = vllm_serve_flags(vllm_python, words[words.index("serve") + 1:])
    assert got["backend"] == "weightsync", got
    assert "VLLM_SERVER_DEV_MODE=1" in block, "without it vLLM has no weight-transfer routes"
