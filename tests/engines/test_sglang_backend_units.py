"""The SGLang backend's parts that need no SGLang: SGLang's init body carries weightsync's typed
InitInfo both ways, the trainer's one message for a refused round, the dependency direction (the
package and its trainer side import no SGLang), and the CPU kernel stand-in the tests serve with
(test infrastructure) against the Triton kernel's contract. The real server is
tests/engines/test_sglang_e2e.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weightsync.protocol import InitInfo
from weightsync_sglang.trainer import round_failure
from weightsync_sglang.wire import init_body, init_info_of

ROOT = Path(__file__).resolve().parents[2]


def test_the_init_body_carries_weightsyncs_init_info():
    """What the trainer posts to /init_weights_update_group is what each worker parses back."""
    init = InitInfo(backend="cpu", master_address="10.0.0.1", master_port=29700, world_size=3,
                    timeout_seconds=7.5, packed_buffer_size_bytes=1 << 20, atomic=True, group_name="g1")
    body = init_body(init, rank_offset=2)
    assert body["backend"] == "weightsync" and body["rank_offset"] == 2 and body["world_size"] == 3
    parsed = init_info_of(body["master_address"], body["master_port"], body["rank_offset"], body["world_size"],
                          body["group_name"])
    assert parsed == init.model_copy(update={"rank_offset": 2})


def test_a_plain_group_name_takes_every_default():
    parsed = init_info_of("127.0.0.1", 29700, 1, 2, "my-group")
    assert parsed.group_name == "my-group" and parsed.backend is None and parsed.atomic is False


@pytest.mark.parametrize("options, field", [('{"packed": "maybe"}', "init_info.packed"),
                                            ('{"world_size": 0}', "init_info.world_size"),
                                            ('{"packed": tru', "group_name")])
def test_a_bad_init_names_the_field(options, field):
    world_size = 0 if "world_size" in options else 2
    with pytest.raises(Exception, match=field.replace(".", r"\.")):
        init_info_of("127.0.0.1", 29700, 1, world_size, options)


def test_a_refusal_every_server_explains_is_said_once():
    answers = ["http://a/update_weights_from_distributed: HTTP 400: weightsync update refused: rank 1: parameter "
               "'x' ...; SGLang keeps serving the previous weights, intact (nothing of this round was loaded)"]
    message = round_failure(RuntimeError("rank 1: parameter 'x' ..."), answers)
    assert message.startswith("SGLang did not take the round: ") and message.count("parameter 'x'") == 1
    assert "SGLang answered: nothing" in round_failure(RuntimeError("trainer-side"), [""])


def test_the_package_and_its_trainer_import_no_sglang():
    probe = ("import sys, weightsync_sglang, weightsync_sglang.trainer, weightsync_sglang.worker; "
             "bad = [m for m in sys.modules if m.split('.')[0] in ('sglang', 'sgl_kernel')]; "
             "assert not bad, bad")
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT, timeout=120)


def test_the_cpu_kernel_stand_in_writes_each_requests_slots():
    """tests/helpers/sglang_cpu_kernel (test infrastructure): row req_pool_indices[i], columns
    start[i]:end[i], from the requests' slots concatenated in batch order; other *_cpu names
    import and raise when called; any other name is missing."""
    sys.path.insert(0, str(ROOT / "tests" / "helpers" / "sglang_cpu_kernel"))
    try:
        import sgl_kernel
    finally:
        sys.path.pop(0)
    table = torch.zeros(4, 8, dtype=torch.int32)
    sgl_kernel.assign_req_to_token_pool_cpu(torch.tensor([2, 0]), table, torch.tensor([1, 0]), torch.tensor([4, 2]),
                                            torch.tensor([10, 11, 12, 20, 21]), 8)
    assert table[2, 1:4].tolist() == [10, 11, 12] and table[0, :2].tolist() == [20, 21]
    assert int(table.count_nonzero()) == 5
    with pytest.raises(NotImplementedError, match="stand-in"):
        sgl_kernel.copy_all_layer_kv_cache_cpu()
    with pytest.raises(ImportError):
        from sgl_kernel import rmsnorm  # noqa: F401


def test_the_sglang_demo_without_sglang_says_what_to_run(tmp_path):
    """`weightsync demo --engine sglang` with a Python that lacks SGLang exits 2 naming the fix."""
    env = {**os.environ, "WEIGHTSYNC_SGLANG_PYTHON": str(tmp_path / "no-python")}
    run = subprocess.run([sys.executable, "-m", "weightsync_cli", "demo", "--engine", "sglang"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert "make demo-sglang" in run.stderr and "WEIGHTSYNC_SGLANG_PYTHON" in run.stderr, run.stderr
