"""A mixture-of-experts model in a real vLLM server (the CPU build), tensor parallel 1 and 2.

A tiny Qwen3-MoE (8 experts, top 2; tests/helpers/vllm_trainer.py --arch qwen3_moe) is built
locally and served by vLLM with the weightsync backend. transformers 5 lists its experts as
fused 3-D parameters; the trainer sends them under the checkpoint's per-expert names through
`weightsync_vllm.hf.CheckpointSource`. After every round that lands, vLLM's greedy completions
must equal HF's on the trainer's weights, token for token: full rounds, and a layer's experts
alone. A round that would leave a layer half loaded (one expert's tensors, or one expert's
down_proj, without the rest of its layer) is refused by name before any byte moves, and vLLM
keeps serving what it served. One server per configuration serves every test.
"""

from __future__ import annotations

import pytest

from helpers.vllm_server import joined

pytestmark = pytest.mark.vllm

LAYER0_EXPERTS = r"^model\.layers\.0\.mlp\.experts\."


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def moe(request, vllm_python, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"vllm-moe-tp{request.param}")
    with joined(vllm_python, tmp, request.param, tied=False, arch="qwen3_moe") as pair:
        yield pair


def test_full_rounds_of_a_mixture_of_experts_land_exactly(moe):
    """Before the repair, a round with expert weights left vLLM serving them unpacked on CPU:
    its greedy tokens differed from HF's even for the values it already served."""
    trainer, server = moe
    assert server.completions() == trainer.hf_greedy()  # the checkpoint vLLM started from
    expected = trainer.hf_greedy()
    pushed = trainer.ask(cmd="round", seed=0, version="same")  # the values vLLM serves already
    assert pushed["tensors"] == 69  # per-expert checkpoint names, not transformers' fused ones
    assert server.completions() == expected, "the same values, pushed again"
    for version in ("m1", "m2"):
        trainer.ask(cmd="round", seed=hash(version) % 10_000, version=version)
        assert server.completions() == trainer.hf_greedy(), version
        assert server.http.get("/weight_info").json()["weight_version"] == version


def test_a_layers_experts_alone_land_exactly(moe):
    trainer, server = moe
    before = trainer.hf_greedy()
    answer = trainer.ask(cmd="subset", seed=31, params=LAYER0_EXPERTS, only=None, version="experts-0")
    assert answer["refused"] is None, answer["refused"]
    assert len(answer["sent"]) == 8 * 3  # gate, up and down of every expert of layer 0
    expected = trainer.hf_greedy()
    assert expected != before, "new experts should change the greedy output"
    assert server.completions() == expected


@pytest.mark.parametrize("only, missing", [
    (r"\.experts\.3\.", "model.layers.0.mlp.experts.0."),  # one expert's gate, up and down
    (r"\.experts\.5\.down_proj", "model.layers.0.mlp.experts.0."),  # one expert's down_proj
], ids=["one-expert", "one-down-proj"])
def test_a_subset_that_splits_the_experts_of_a_layer_is_refused_by_name(moe, only, missing):
    trainer, server = moe
    expected = trainer.hf_greedy()
    version = server.http.get("/weight_info").json()["weight_version"]
    answer = trainer.ask(cmd="subset", seed=47, params=LAYER0_EXPERTS, only=only, version="split")
    refused = answer["refused"]
    assert refused is not None, "vLLM accepted a round that leaves a layer half loaded"
    assert answer["sent"][0] in refused and "model.layers.0.mlp.experts" in refused, refused
    assert missing in refused and "intact (nothing of this round was loaded)" in refused, refused
    assert server.http.get("/weight_info").json()["weight_version"] == version
    assert server.completions() == expected


def test_transformers_fused_experts_pushed_as_listed_are_refused_naming_the_conversion(moe):
    """transformers 5's `named_parameters()` lists the experts fused; the checkpoint (and so
    vLLM) has them per expert: refused before any byte moves, saying what to push instead."""
    trainer, server = moe
    refused = trainer.ask(cmd="bad_round", kind="as_listed")["refused"]
    assert refused is not None and "mlp.experts.gate_up_proj" in refused, refused
    assert "CheckpointSource" in refused and "intact (nothing of this round was loaded)" in refused, refused
    assert server.completions() == trainer.hf_greedy()
