"""The protocol's typed messages: validation names the field, JSON round-trips, no pickle."""

import json
import re
import pathlib

import pytest

from weightsync.errors import ProtocolError
from weightsync.protocol import InitInfo, Manifest, RoundHeader, TensorSpec, UpdateInfo, parse

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_init_info_json_round_trip():
    info = InitInfo(master_address="10.0.0.1", master_port=29500, rank_offset=1, world_size=3,
                    packed_buffer_size_bytes=1 << 20, packed_num_buffers=3)
    again = InitInfo.model_validate_json(info.model_dump_json())
    assert again == info
    assert again.packed_buffer_size_bytes == 1 << 20 and again.packed_num_buffers == 3


def test_update_info_accepts_vllm_bodies():
    body = {"names": ["w", "b"], "dtype_names": ["bfloat16", "float32"], "shapes": [[4, 8], [8]],
            "packed": True, "is_checkpoint_format": True}
    info = parse(UpdateInfo, body, "update_info")
    assert info.manifest == Manifest(tensors=(TensorSpec(name="w", dtype="bfloat16", shape=(4, 8)),
                                              TensorSpec(name="b", dtype="float32", shape=(8,))))
    assert parse(UpdateInfo, {}, "update_info").manifest is None  # all empty: the trainer's header decides


@pytest.mark.parametrize("body, field, words", [
    ({"names": ["a"], "dtype_names": [], "shapes": [[1]]}, "update_info", "dtype_names"),
    ({"names": ["a"], "dtype_names": ["float31"], "shapes": [[1]]}, "update_info", "dtype_names[0]"),
    ({"names": ["a", "a"], "dtype_names": ["int8", "int8"], "shapes": [[1], [1]]}, "update_info", "duplicate"),
    ({"names": ["a"], "dtype_names": ["int8"], "shapes": [[-1]]}, "update_info.shapes.0.0", "greater than"),
    ({"update_kind": "diagonal"}, "update_info.update_kind", "dense"),
    # vLLM's per-batch knobs that weightsync does not read are refused, not ignored.
    ({"packed_num_buffers": 2}, "update_info.packed_num_buffers", "Extra inputs"),
    ({"packed_buffer_size_bytes": 1001}, "update_info.packed_buffer_size_bytes", ""),
    ({"tensor_sizes": [4]}, "update_info.tensor_sizes", "Extra inputs"),
    ({"surprise": 1}, "update_info.surprise", "Extra inputs"),
])
def test_update_info_errors_name_the_field(body, field, words):
    with pytest.raises(ProtocolError) as caught:
        parse(UpdateInfo, body, "update_info")
    assert caught.value.field == field
    assert words in str(caught.value)


@pytest.mark.parametrize("body, field", [
    ({"master_address": "h", "world_size": 2}, "init_info"),
    ({"master_address": "h", "master_port": 70000, "world_size": 2}, "init_info.master_port"),
    ({"master_address": "h", "master_port": 1, "world_size": 2, "rank_offset": 2}, "init_info"),
    ({"master_address": "h", "master_port": 1, "world_size": 0}, "init_info.world_size"),
])
def test_init_info_errors_name_the_field(body, field):
    with pytest.raises(ProtocolError) as caught:
        parse(InitInfo, body, "init_info")
    assert caught.value.field == field


def test_round_header_round_trips_through_json():
    header = RoundHeader(round_id="r1", update_kind="dense",
                         manifest=Manifest(tensors=(TensorSpec(name="x", dtype="int8", shape=(3, 0)),)),
                         buffer_size_bytes=4096, num_buffers=2, alignment=256)
    assert parse(RoundHeader, json.loads(header.model_dump_json()), "header") == header


def test_nothing_on_the_wire_is_pickled():
    sources = [p for d in ("weightsync", "daemon", "operator") for p in (ROOT / d).rglob("*.py")]
    unpickling = re.compile(r"^\s*(import (c?pickle|dill)|from (c?pickle|dill) import)"
                            r"|pickle\.loads?\(|torch\.load\(", re.M)
    offenders = [str(p) for p in sources if unpickling.search(p.read_text())]
    assert sources and offenders == []


def test_operator_stays_the_standard_library():
    import operator

    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "daemon" / "__init__.py").exists()
    assert hasattr(operator, "itemgetter") and "site-packages" not in (operator.__file__ or "")
