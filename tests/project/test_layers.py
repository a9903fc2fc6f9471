"""The arrows between the packages point one way (issue 17): the core (weightsync, with its
transports) imports none of the outer packages; the daemon and the vLLM backend import the core
and not each other; the operator sits above them and the `weightsync` command (weightsync_cli) on
top; the coordinator never imports the data plane (nor torch); the operator's runtime imports no
PyTorch, daemon or data plane (its image has none: tests/project/test_packaging.py); GPU pods' packages
import no Kubernetes; only the vLLM backend imports vLLM. The contracts
live in pyproject.toml's [tool.importlinter]; `lint-imports` checks them.

The contracts are also run on a copy of the packages with one wrong import planted, to show they
catch it (a contract that passes on anything would pass the first test too)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from weightsync.transports import available, get_transport
from weightsync_operator.backends import RELAYED_BACKENDS, relays_update_info

ROOT = Path(__file__).resolve().parents[2]
# Where each package's source lives (pyproject.toml's package-dir).
PACKAGES = {"weightsync": ROOT / "weightsync", "weightsync_daemon": ROOT / "daemon" / "weightsync_daemon",
            "weightsync_operator": ROOT / "operator" / "weightsync_operator",
            "weightsync_vllm": ROOT / "engines" / "weightsync_vllm",
            "weightsync_sglang": ROOT / "engines" / "weightsync_sglang",
            "weightsync_cli": ROOT / "cli" / "weightsync_cli"}


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """`lint-imports` with the contracts of pyproject.toml in `cwd`, the packages found first in
    `pythonpath` (where given)."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [shutil.which("lint-imports") or "lint-imports"]
    return subprocess.run([*command, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_layers_hold(capsys):
    """What `lint-imports` checks, in this process (the fast lane starts no process)."""
    from importlinter.cli import lint_imports as check

    status = check(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "9 kept, 0 broken" in out


def copy_tree(tmp_path: Path) -> Path:
    """The six packages and the contracts, side by side in `tmp_path`, without caches."""
    site = tmp_path / "src"
    for name, source in PACKAGES.items():
        shutil.copytree(source, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return site


@pytest.mark.integration  # lint-imports as a process, on a copy of the packages
def test_an_unchanged_copy_keeps_the_contracts(tmp_path):
    """The control for the planted imports below: the copy itself is not what breaks them."""
    site = copy_tree(tmp_path)
    run = lint_imports(tmp_path, site)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.integration  # lint-imports as a process, on a copy of the packages
@pytest.mark.parametrize(("module", "planted", "broken"), [
    # The core imports an outer package (what `weightsync.connect` did).
    ("weightsync/protocol.py", "import weightsync_operator.trainer_client",
     "weightsync.protocol -> weightsync_operator.trainer_client"),
    ("weightsync/transports/base.py", "import weightsync_daemon.auth",
     "weightsync.transports.base -> weightsync_daemon.auth"),
    # The daemon imports the operator.
    ("weightsync_daemon/service.py", "import weightsync_operator.kube",
     "weightsync_daemon.service -> weightsync_operator.kube"),
    # The daemon and the vLLM backend are independent of each other.
    ("weightsync_vllm/engine.py", "import weightsync_daemon.auth",
     "weightsync_vllm.engine -> weightsync_daemon.auth"),
    # The coordinator imports the transport registry (what it did to read needs_trainer_update_info).
    ("weightsync_operator/coordinator.py", "import weightsync.transports",
     "weightsync_operator.coordinator -> weightsync.transports"),
    ("weightsync_operator/client.py", "import torch", "weightsync_operator.client -> torch"),
    # The wire types import PyTorch (what their dtype helpers did before weightsync.dtypes): the
    # operator builds its bodies from them, and its image would need PyTorch.
    ("weightsync/protocol.py", "import torch", "weightsync.protocol -> torch"),
    # The operator's runtime imports the daemon package (what its command did for the token).
    ("weightsync_operator/operator_cli.py", "import weightsync_daemon.auth",
     "weightsync_operator.operator_cli -> weightsync_daemon.auth"),
    ("weightsync_operator/kube.py", "import numpy", "weightsync_operator.kube -> numpy"),
    # The trainer's client needs the operator's runtime (kopf is not in weightsync[trainer]).
    ("weightsync_operator/trainer_client.py", "import weightsync_operator.reconciler",
     "weightsync_operator.trainer_client -> weightsync_operator.reconciler"),
    # The core imports the command (which sits above every layer).
    ("weightsync/cli_args.py", "import weightsync_cli.main", "weightsync.cli_args -> weightsync_cli.main"),
    # A GPU pod's packages import Kubernetes; the daemon imports vLLM.
    ("weightsync_daemon/server.py", "import kubernetes", "weightsync_daemon.server -> kubernetes"),
    ("weightsync_daemon/service.py", "import vllm", "weightsync_daemon.service -> vllm"),
    # The nccl group reads the transport module (the import circle issue 27 removed).
    ("weightsync/transports/nccl_group.py", "import weightsync.transports.nccl",
     "weightsync.transports.nccl_group -> weightsync.transports.nccl"),
    # A shared round imports a transport built on it.
    ("weightsync/transports/collective/receiver.py", "import weightsync.transports.cpu",
     "weightsync.transports.collective.receiver -> weightsync.transports.cpu"),
])
def test_a_planted_wrong_import_breaks_a_contract(tmp_path, module, planted, broken):
    site = copy_tree(tmp_path)
    path = site / module
    source = path.read_text()
    # After the module docstring and `from __future__` (a statement that must come first).
    anchor = "from __future__ import annotations\n"
    assert anchor in source, f"{module} has no `{anchor.strip()}` to plant after"
    path.write_text(source.replace(anchor, f"{anchor}{planted}\n", 1))
    run = lint_imports(tmp_path, site)
    assert run.returncode != 0, run.stdout
    assert re.search(r"Contracts: \d+ kept, [1-9]\d* broken", run.stdout), run.stdout
    assert broken in run.stdout, run.stdout


@pytest.mark.parametrize("backend", available())
def test_the_coordinators_relay_table_matches_the_transports(backend):
    """The coordinator's torch-free table (weightsync_operator.backends) says for each built-in
    transport what the transport class says: whether the targets need the trainer's update_info."""
    assert relays_update_info(backend) == get_transport(backend).needs_trainer_update_info
    assert RELAYED_BACKENDS <= set(available())
