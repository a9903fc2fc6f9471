"""One backend package for vLLM 0.32 and 0.33, checked against each release's own code (issue 23 item 1).

vLLM 0.33 redesigned the trainer's `WeightSource` (`metadata` a cached property, `iter_full()` /
`iter_local()`, `ParamMeta.owners`) and gave `TrainerWeightTransferEngine.__init__` a `rank`.
Its GPU build cannot serve here, but its weight-transfer modules import beside torch's CPU
wheel: `make vllm033-venv` installs its wheel without dependencies (engines/vllm-0.33-contract.lock).
tests/helpers/vllm_contract.py runs in each release's venv (0.32: the CPU build the real-server
tests use; 0.33: that contract venv) and reports each check; each test here asserts one:
the trainer engine sends two bit-exact rounds of vLLM's own `ModuleSource` through vLLM's own
trainer factory; `VLLMTrainer.push` reads that source's manifest and stream; a parameter some
trainer rank does not own is refused by name; the worker engine's overrides match vLLM's base
class; every vLLM import of the backend resolves; every
route the trainer and the operator call exists with the query parameters they send.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "tests" / "helpers" / "vllm_contract.py"
# Each release: the python of its venv, who builds it, and the version it must report.
RELEASES = {
    "0.32": (os.environ.get("WEIGHTSYNC_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python")), "make vllm-venv"),
    "0.33": (os.environ.get("WEIGHTSYNC_VLLM033_PYTHON", str(ROOT / ".venv-vllm033" / "bin" / "python")),
             "make vllm033-venv"),
}
CHECKS = ["check_trainer_engine_sends_vllms_module_source", "check_vllm_trainer_push_takes_vllms_module_source",
          "check_a_parameter_a_trainer_rank_does_not_own_is_refused",
          "check_worker_engine_overrides_match_vllms_base", "check_the_backends_vllm_imports_resolve",
          "check_the_routes_the_backend_calls_exist"]

pytestmark = pytest.mark.vllm


def _unavailable(release: str, python: str, make: str) -> None:
    problem = f"no vLLM {release} venv at {python} (run `{make}`)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the vLLM contract tests: {problem}")
    pytest.skip(problem)


@pytest.fixture(scope="module", params=sorted(RELEASES))
def report(request, tmp_path_factory) -> dict:
    """The helper's report, run once per release in its venv (from a temp dir: vLLM's side files
    land there)."""
    release = request.param
    python, make = RELEASES[release]
    if not Path(python).exists():
        _unavailable(release, python, make)
    tmp = tmp_path_factory.mktemp(f"vllm-{release}")
    env = {**os.environ, "TMPDIR": str(tmp), "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
           "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([python, str(HELPER)], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip(), f"the contract helper failed:\n{done.stderr[-4000:]}"
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["vllm"].startswith(release + "."), f"{python} holds vLLM {got['vllm']}, not {release}"
    return got


@pytest.mark.parametrize("check", CHECKS)
def test_the_backend_keeps_vllms_contract(report, check):
    outcome = report[check]
    assert outcome["ok"], f"vLLM {report['vllm']}: {check} failed:\n{outcome['detail']}"
    assert outcome["detail"], check
