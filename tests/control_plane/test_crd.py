"""The WeightSync CRD: generated from the code's models, structural, and in agreement with them
on what a valid resource is. Custom resources are checked with jsonschema against the CRD's
openAPIV3Schema, as the API server would."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from helpers.k8s_emulator import schema_problems
from weightsync_operator.crd import PRINTER_COLUMNS, build_crd, main as crd_main
from weightsync_operator.resource import (
    Condition, Rendezvous, SyncFigures, TargetStatus, WeightSyncSpec, WeightSyncSpecError, WeightSyncStatus,
    parse_spec,
)

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "weightsync.dev_weightsyncs.yaml"
CRD = yaml.safe_load(CRD_FILE.read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
MINIMAL_SPEC = {"trainerSelector": {"matchLabels": {"weightsync.dev/role": "trainer"}},
                "targetSelector": {"matchLabels": {"weightsync.dev/role": "inference"}}}


def resource(spec: dict, status: dict | None = None) -> dict:
    obj = {"apiVersion": "weightsync.dev/v1alpha1", "kind": "WeightSync",
           "metadata": {"name": "policy-sync", "namespace": "rl"}, "spec": spec}
    if status is not None:
        obj["status"] = status
    return obj


def test_the_committed_crd_is_what_the_models_generate():
    assert CRD == build_crd(), "run: python -m weightsync_operator.crd > crds/weightsync.dev_weightsyncs.yaml"
    assert crd_main(["--check", str(CRD_FILE)]) == 0


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    stale = copy.deepcopy(CRD)
    stale["spec"]["names"]["shortNames"] = ["ws"]
    path = tmp_path / "crd.yaml"
    path.write_text(yaml.safe_dump(stale))
    assert crd_main(["--check", str(path)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_identity_scope_subresource_and_printer_columns():
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "weightsyncs.weightsync.dev"
    assert (spec["group"], spec["scope"], spec["names"]["kind"], spec["names"]["plural"]) == \
        ("weightsync.dev", "Namespaced", "WeightSync", "weightsyncs")
    assert spec["names"]["shortNames"] == ["wsync"]
    assert VERSION["name"] == "v1alpha1" and VERSION["served"] and VERSION["storage"]
    assert VERSION["subresources"] == {"status": {}}
    names = [c["name"] for c in VERSION["additionalPrinterColumns"]]
    assert names == ["Phase", "Version", "Ready", "Last GB/s", "Last duration", "Age"]
    # Every column points at a field the schema has, with the column's type.
    types = {"string": "string", "integer": "integer", "number": "number"}
    for column in PRINTER_COLUMNS:
        if column["jsonPath"].startswith(".metadata"):
            continue
        node = SCHEMA
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == types[column["type"]], column


def _walk(node, path="schema"):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_the_schema_is_structural_and_complete():
    for path, node in _walk(SCHEMA):
        if not isinstance(node, dict):
            continue
        if node.get("x-kubernetes-int-or-string"):  # Kubernetes' IntOrString, its one allowed anyOf
            assert "type" not in node and sorted(m["type"] for m in node["anyOf"]) == ["integer", "string"], path
        else:
            assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs", "nullable"} & set(node), path
        assert not node.get("x-kubernetes-preserve-unknown-fields"), path  # a complete schema
        if "properties" in node:
            assert node.get("type") == "object" and "additionalProperties" not in node, path
            for name, sub in node["properties"].items():
                assert "type" in sub or sub.get("x-kubernetes-int-or-string"), f"{path}.properties.{name} has no type"
    conditions = SCHEMA["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) == {"type", "status", "lastTransitionTime", "reason"}
    assert "observedGeneration" in item["properties"]
    assert item["properties"]["type"]["enum"] == ["Ready", "Progressing", "Degraded"]
    spec = SCHEMA["properties"]["spec"]["properties"]
    assert {"backend", "trainerSelector", "targetSelector", "daemonPort", "rendezvousPort",
            "packedBufferSizeBytes", "packedNumBuffers", "version", "pauseMode", "timeouts",
            "verify"} <= set(spec)
    assert spec["backend"]["enum"] == ["nccl", "p2p", "ipc", "cpu"]


def _apply_defaults(value, schema):
    """What the API server stores: schema defaults filled in where fields are absent."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _apply_defaults(value[key], sub)
    return value


def test_the_schemas_defaults_are_the_models_defaults():
    stored = _apply_defaults(copy.deepcopy(MINIMAL_SPEC), SCHEMA["properties"]["spec"])
    assert stored == WeightSyncSpec.model_validate(MINIMAL_SPEC).to_k8s()


def test_every_example_manifest_is_a_valid_weightsync():
    found = 0
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "WeightSync":
                found += 1
                assert schema_problems(doc, SCHEMA) == [], path
                parse_spec(doc["spec"])
    assert found >= 1


# Specs as a user might write them: the API server (schema) and the operator (model) must agree.
AGREED = [
    ({}, True),
    ({"backend": "cpu", "version": 7, "pauseMode": "none", "verify": False, "atomic": True}, True),
    ({"targetSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]}}, True),
    ({"timeouts": {"updateSeconds": 900, "transferSeconds": 120}}, True),
    ({"failurePolicy": {"maxFailed": 2}, "strategy": {"type": "Waves", "maxUnavailable": 3}}, True),
    ({"strategy": {"type": "Waves", "maxUnavailable": "25%"}}, True),
    ({"strategy": {"type": "Waves", "maxUnavailable": "0%"}}, False),
    ({"strategy": {"type": "Waves", "maxUnavailable": 0}}, False),
    ({"strategy": {"type": "Waves", "maxUnavailable": "three"}}, False),
    ({"strategy": {"type": "Canary"}}, False),
    ({"failurePolicy": {"maxFailed": -1}}, False),
    ({"backend": "tpu"}, False),
    ({"daemonPort": 0}, False),
    ({"rendezvousPort": 70000}, False),
    ({"packedBufferSizeBytes": 512}, False),
    ({"packedNumBuffers": 17}, False),
    ({"version": -1}, False),
    ({"version": "3"}, False),
    ({"pauseMode": "sometimes"}, False),
    ({"timeouts": {"initSeconds": 0}}, False),
    ({"trainerSelector": {}}, False),
    ({"targetSelector": {"matchExpressions": [{"key": "tier", "operator": "Near"}]}}, False),
]


@pytest.mark.parametrize("overrides, valid", AGREED)
def test_schema_and_model_agree(overrides, valid):
    spec = {**MINIMAL_SPEC, **overrides}
    schema_ok = schema_problems(resource(spec), SCHEMA) == []
    try:
        parse_spec(spec)
        model_ok = True
    except WeightSyncSpecError:
        model_ok = False
    assert (schema_ok, model_ok) == (valid, valid)


def test_missing_selectors_are_rejected_by_both_naming_the_field():
    problems = schema_problems(resource({"backend": "cpu"}), SCHEMA)
    assert any("trainerSelector" in p for p in problems)
    with pytest.raises(WeightSyncSpecError) as error:
        parse_spec({"backend": "cpu", "targetSelector": MINIMAL_SPEC["targetSelector"]})
    assert error.value.field == "trainerSelector"
    with pytest.raises(WeightSyncSpecError) as error:
        parse_spec({**MINIMAL_SPEC, "daemonPort": 0})
    assert error.value.field == "daemonPort" and "spec.daemonPort" in str(error.value)


def test_what_only_the_operator_checks():
    """Rules across fields are the model's: the API accepts them, the operator reports them."""
    spec = {**MINIMAL_SPEC, "timeouts": {"updateSeconds": 30, "transferSeconds": 60}}
    assert schema_problems(resource(spec), SCHEMA) == []
    with pytest.raises(WeightSyncSpecError, match="transferSeconds must be below"):
        parse_spec(spec)
    spec = {**MINIMAL_SPEC, "targetSelector": {"matchExpressions": [{"key": "tier", "operator": "In"}]}}
    with pytest.raises(WeightSyncSpecError, match="needs at least one value"):
        parse_spec(spec)


def test_a_full_status_from_the_models_satisfies_the_schema():
    figures = SyncFigures(version=3, outcome="Failed", bytes=10, seconds=0.5, total_seconds=0.7, gbps=0.02,
                          started="2026-01-01T00:00:00.000+00:00", finished="2026-01-01T00:00:01.000+00:00",
                          reason="infer-1: update failed", source="trainer-0", targets=["infer-0", "infer-1"])
    status = WeightSyncStatus(
        phase="Failed", message="version 3 failed", observed_generation=4, current_version=2, ready_targets="1/2",
        targets=[TargetStatus(pod="infer-0", rank=1, endpoint="http://10.0.0.7:8200", state="Synced", version="2"),
                 TargetStatus(pod="infer-1", rank=2, state="Failed", reason="update: unreachable")],
        last_sync=figures, last_catch_up=figures.model_copy(update={"outcome": "Succeeded", "reason": None}),
        rendezvous=Rendezvous(trainer_pod="trainer-0", trainer_endpoint="http://10.0.0.5:8200",
                              master_address="10.0.0.5", master_port=29500, world_size=3,
                              group_name="rl.policy-sync-1a2b3c4d", backend="nccl"),
        conditions=[Condition(type="Degraded", status="True", observed_generation=4,
                              last_transition_time="2026-01-01T00:00:01Z", reason="SyncFailed", message="x")])
    obj = resource(MINIMAL_SPEC, status.to_k8s())
    assert schema_problems(obj, SCHEMA) == []
    assert WeightSyncStatus.model_validate(obj["status"]) == status  # and it reads back the same


def test_the_schema_catches_what_a_server_would_prune_or_reject():
    bad_status = {"phase": "Done", "conditions": [{"type": "Ready", "status": "Yes", "reason": "1bad",
                                                   "lastTransitionTime": "now"}], "extra": 1}
    problems = " ".join(schema_problems(resource(MINIMAL_SPEC, bad_status), SCHEMA))
    for expected in ("phase", "conditions.0.status", "conditions.0.reason", "status.extra"):
        assert expected in problems, expected


@pytest.mark.parametrize("strategy, targets, size", [
    ({}, 6, 6), ({"type": "Waves"}, 6, 1), ({"type": "Waves", "maxUnavailable": 4}, 3, 3),
    ({"type": "Waves", "maxUnavailable": "34%"}, 6, 2), ({"type": "Waves", "maxUnavailable": "10%"}, 6, 1),
    ({"type": "Waves", "maxUnavailable": "100%"}, 32, 32)])
def test_a_wave_holds_max_unavailable_targets_at_least_one(strategy, targets, size):
    assert parse_spec({**MINIMAL_SPEC, "strategy": strategy}).strategy.wave_size(targets) == size
