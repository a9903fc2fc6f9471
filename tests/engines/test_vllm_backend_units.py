"""The vLLM backend's parts that need no vLLM: the manifest check against a safetensors
checkpoint, the loader's fused-group key, and the dependency direction (the core never imports
the plugin; the plugin's package and trainer side import no vLLM). The real server is
tests/engines/test_vllm_e2e.py."""

from __future__ import annotations

import ast
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weightsync.protocol import Manifest, TensorSpec
from weightsync_vllm.checkpoint import CheckpointManifest, fused_group_key

ROOT = Path(__file__).resolve().parents[2]


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A file in safetensors' layout (header length, JSON header, data) with zeroed data."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in tensors.items():
        nbytes = sizes[dtype] * int(torch.tensor(shape).prod()) if shape else sizes[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(offset))


def _manifest(*specs: tuple[str, str, tuple[int, ...]]) -> Manifest:
    return Manifest(tensors=tuple(TensorSpec(name=n, dtype=d, shape=s) for n, d, s in specs))


@pytest.fixture
def checkpoint(tmp_path) -> CheckpointManifest:
    # A sharded checkpoint: the check sees the union of every file's header.
    _write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {
        "model.embed_tokens.weight": ("BF16", [32, 8]),
        "model.layers.0.self_attn.q_proj.weight": ("BF16", [8, 8]),
    })
    _write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {
        "model.layers.0.self_attn.q_proj.bias": ("BF16", [8]),
        "model.positions": ("I64", [4]),
    })
    return CheckpointManifest.from_dir(tmp_path, served_dtype=torch.float32)


def test_a_manifest_the_checkpoint_holds_is_accepted(checkpoint):
    assert len(checkpoint.tensors) == 4
    assert checkpoint.mismatch(_manifest(("model.embed_tokens.weight", "bfloat16", (32, 8)),
                                         ("model.layers.0.self_attn.q_proj.bias", "float32", (8,)))) is None


@pytest.mark.parametrize("spec, words", [
    (("model.layers.9.self_attn.q_proj.weight", "bfloat16", (8, 8)),
     ["'model.layers.9.self_attn.q_proj.weight'", "not in the served model's checkpoint"]),
    (("model.embed_tokens.weight", "bfloat16", (33, 8)), ["'model.embed_tokens.weight'", "[32, 8]", "[33, 8]"]),
    (("model.embed_tokens.weight", "float16", (32, 8)),
     ["'model.embed_tokens.weight'", "float16", "bfloat16 or float32"]),
    (("model.positions", "float32", (4,)), ["'model.positions'", "takes int64"]),  # the served dtype is for floats only
])
def test_a_tensor_the_checkpoint_cannot_take_is_named(checkpoint, spec, words):
    reason = checkpoint.mismatch(_manifest(("model.embed_tokens.weight", "bfloat16", (32, 8)), spec)
                                 if spec[0] != "model.embed_tokens.weight" else _manifest(spec))
    assert reason is not None
    for word in words:
        assert word in reason, reason


def test_a_directory_without_safetensors_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        CheckpointManifest.from_dir(tmp_path)


def test_fused_groups_follow_the_models_packing_table():
    group_of = fused_group_key({"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]})
    keys = {name: group_of(name) for name in [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight",
        "model.embed_tokens.weight", "lm_head.weight"]}
    assert keys["model.layers.0.self_attn.q_proj.weight"] == keys["model.layers.0.self_attn.k_proj.bias"] \
        == keys["model.layers.0.self_attn.v_proj.weight"] == "model.layers.0.self_attn.qkv_proj"
    assert keys["model.layers.0.mlp.gate_proj.weight"] == keys["model.layers.0.mlp.up_proj.weight"] \
        == "model.layers.0.mlp.gate_up_proj"
    # Everything else is its own group: o_proj, down_proj, another layer's q, the embedding, the head.
    rest = [keys[n] for n in ["model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight",
                              "model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"]]
    assert len(set(rest)) == len(rest) and "model.layers.0.self_attn.qkv_proj" not in rest


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_core_never_imports_the_vllm_plugin_or_vllm():
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & {"weightsync_vllm", "vllm"})
                 for p in (ROOT / "weightsync").rglob("*.py")}
    assert {p: names for p, names in offenders.items() if names} == {}


@pytest.mark.integration  # a fresh interpreter, to see what the import alone pulls in
def test_the_plugin_package_and_its_trainer_side_import_no_vllm():
    """vLLM loads the entry point in every process, and a trainer uses weightsync_vllm.trainer
    without vLLM installed: neither may import vLLM (only the worker engine does)."""
    probe = ("import sys, weightsync_vllm, weightsync_vllm.trainer, weightsync_vllm.checkpoint; "
             "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class _FusedAttention(torch.nn.Module):
    """q, k and v load into one parameter through its `weight_loader`, as vLLM's qkv_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(2, 6, bias=False)
        self.qkv.weight.weight_loader = self.load_shard

    @staticmethod
    def load_shard(param, loaded, shard: int) -> None:
        param.data[2 * shard : 2 * shard + 2].copy_(loaded)


def test_the_dry_run_learns_each_tensors_layer_refuses_a_split_and_restores_every_loader(tmp_path):
    """`weightsync_vllm.layers` over a model whose `load_weights` routes names the way vLLM's do:
    the dry run (meta tensors) records the layer each checkpoint tensor reaches, loads nothing,
    and puts every loader back; a partial update is refused naming the layer and what is missing;
    a tensor whose layer stays incomplete after a batch is handed over as a copy."""
    from weightsync_vllm.layers import learn_load_targets

    model = torch.nn.Module()
    model.attn, model.norm = _FusedAttention(), torch.nn.LayerNorm(2)
    shards = {"attn.q_proj.weight": 0, "attn.k_proj.weight": 1, "attn.v_proj.weight": 2}

    def load_weights(weights):
        params = dict(model.named_parameters())
        for name, tensor in weights:
            if name in shards:
                param = model.attn.qkv.weight
                param.weight_loader(param, tensor, shards[name])
            else:
                param = params[name]
                getattr(param, "weight_loader", lambda p, t: p.data.copy_(t))(param, tensor)

    _write_safetensors(tmp_path / "model.safetensors", {
        **{name: ("F32", [2, 2]) for name in shards}, "norm.weight": ("F32", [2]), "norm.bias": ("F32", [2])})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loader = model.attn.qkv.weight.weight_loader
    targets = learn_load_targets(model, CheckpointManifest.from_dir(tmp_path), load_weights)

    assert {name: targets.layers_of[name] for name in shards} == {name: ("attn.qkv",) for name in shards}
    assert targets.layers_of["norm.weight"] == targets.layers_of["norm.bias"] == ("norm",)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # nothing loaded
    assert model.attn.qkv.weight.weight_loader is loader and not hasattr(model.norm.weight, "weight_loader")

    def manifest(*names: str) -> Manifest:
        return Manifest(tensors=tuple(TensorSpec(name=n, dtype="float32", shape=(2, 2)) for n in names))

    refusal = targets.split(manifest("attn.k_proj.weight", "attn.v_proj.weight"))
    assert "'attn.k_proj.weight' loads into vLLM's layer 'attn.qkv'" in refusal
    assert "'attn.q_proj.weight'" in refusal and "'attn.v_proj.weight'" not in refusal.split("built from")[1]
    assert targets.split(manifest(*shards)) is None and targets.split(manifest()) is None

    q, k = torch.ones(2, 2), torch.zeros(2, 2)
    early = targets.outliving([("attn.q_proj.weight", q)], {"attn.q_proj.weight"})
    assert early[0][1] is not q and torch.equal(early[0][1], q)  # vLLM keeps it past the staging
    last = targets.outliving([("attn.k_proj.weight", k)], set(shards))
    assert last[0][1] is k  # its layer is complete with this batch
