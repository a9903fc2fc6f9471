"""How the operator reads pods (readiness, where the daemon listens, restarts), selects group
members with Kubernetes label-selector semantics, and keeps metav1.Condition transition times."""

from __future__ import annotations

import pytest

from weightsync_operator.client import Endpoint
from weightsync_operator.conditions import get_condition, set_condition
from weightsync_operator.pods import matches, pod_ref, select
from weightsync_operator.resource import LabelSelector


def pod(name="infer-0", labels=None, annotations=None, ports=None, phase="Running", ready="True",
        ip="10.0.0.7", restarts=(0,), deleting=False) -> dict:
    meta = {"name": name, "namespace": "rl", "uid": f"uid-{name}", "labels": labels or {},
            "annotations": annotations or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": "engine", "ports": [{"name": "http", "containerPort": 8000}]},
                                {"name": "sidecar", "ports": ports or []}]},
        "status": {"phase": phase, "podIP": ip, "conditions": [{"type": "Ready", "status": ready}],
                   "containerStatuses": [{"name": f"c{i}", "restartCount": r} for i, r in enumerate(restarts)]},
    }


def test_where_the_daemon_listens():
    assert pod_ref(pod()).endpoint(8200).url == "http://10.0.0.7:8200"  # the WeightSync's daemonPort
    named = pod_ref(pod(ports=[{"name": "weightsync", "containerPort": 9100}]))
    assert named.endpoint(8200).url == "http://10.0.0.7:9100"  # a container port named weightsync
    annotated = pod_ref(pod(annotations={"weightsync.dev/daemon-port": "31000",
                                         "weightsync.dev/rendezvous-port": "31001"},
                            ports=[{"name": "weightsync", "containerPort": 9100}]))
    assert annotated.endpoint(8200).url == "http://10.0.0.7:31000"  # the annotation wins
    assert annotated.rendezvous_port == 31001
    assert pod_ref(pod(annotations={"weightsync.dev/daemon-port": "http"})).daemon_port is None  # not a port
    assert pod_ref(pod(annotations={"weightsync.dev/daemon-port": "70000"})).daemon_port is None
    assert pod_ref(pod(ip="fd00::7")).endpoint(8200).url == "http://[fd00::7]:8200"


def test_the_engine_annotation_picks_the_client_kind():
    assert pod_ref(pod()).endpoint(8200).kind == "daemon"
    served = pod_ref(pod(annotations={"weightsync.dev/engine": "vllm", "weightsync.dev/daemon-port": "8000"}))
    assert served.usable and served.endpoint(8200) == Endpoint("infer-0", "http://10.0.0.7:8000", "vllm")
    assert served.identity(8200) != pod_ref(pod(annotations={"weightsync.dev/daemon-port": "8000"})).identity(8200)
    assert not pod_ref(pod(annotations={"weightsync.dev/engine": "vlm"})).usable  # a typo joins no group
    sglang = pod_ref(pod(annotations={"weightsync.dev/engine": "SGLang", "weightsync.dev/daemon-port": "30000"}))
    assert sglang.usable and sglang.endpoint(8200) == Endpoint("infer-0", "http://10.0.0.7:30000", "sglang")


@pytest.mark.parametrize("changes, usable", [
    ({}, True),
    ({"ready": "False"}, False),
    ({"phase": "Pending"}, False),
    ({"ip": None}, False),
    ({"deleting": True}, False),
])
def test_only_ready_addressable_pods_that_stay_are_usable(changes, usable):
    assert pod_ref(pod(**changes)).usable is usable


def test_identity_changes_with_a_restart_a_new_pod_or_a_new_address():
    base = pod_ref(pod()).identity(8200)
    assert pod_ref(pod()).identity(8200) == base
    assert pod_ref(pod(restarts=(0, 1))).identity(8200) != base  # a container restarted
    assert pod_ref(pod(ip="10.0.0.8")).identity(8200) != base
    assert pod_ref(pod(annotations={"weightsync.dev/daemon-port": "9000"})).identity(8200) != base
    moved = pod()
    moved["metadata"]["uid"] = "another"  # same name, a new pod (e.g. a StatefulSet replaced it)
    assert pod_ref(moved).identity(8200) != base


@pytest.mark.parametrize("selector, labels, expected", [
    ({"matchLabels": {"role": "inference"}}, {"role": "inference", "x": "y"}, True),
    ({"matchLabels": {"role": "inference"}}, {"role": "trainer"}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}, {"tier": "b"}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]}, {}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["a"]}]}, {}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["a"]}]}, {"tier": "a"}, False),
    ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, {"gpu": ""}, True),
    ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, {"gpu": "h100"}, False),
    ({"matchLabels": {"role": "inference"}, "matchExpressions": [{"key": "gpu", "operator": "Exists"}]},
     {"role": "inference"}, False),
])
def test_label_selector_semantics(selector, labels, expected):
    assert matches(LabelSelector.model_validate(selector), labels) is expected


def test_select_keeps_usable_matching_pods_in_name_order():
    selector = LabelSelector.model_validate({"matchLabels": {"role": "inference"}})
    pods = [pod_ref(pod("b", {"role": "inference"})), pod_ref(pod("a", {"role": "inference"})),
            pod_ref(pod("c", {"role": "inference"}, ready="False")), pod_ref(pod("d", {"role": "trainer"}))]
    assert [p.name for p in select(pods, selector)] == ["a", "b"]


def test_conditions_keep_their_transition_time_while_the_status_holds(monkeypatch):
    times = iter(["2026-01-01T00:00:00Z", "2026-01-01T00:00:05Z", "2026-01-01T00:00:09Z"])
    monkeypatch.setattr("weightsync_operator.conditions.now", lambda: next(times))
    conditions = set_condition(None, "Ready", False, "Initializing", "forming", 1)
    conditions = set_condition(conditions, "Degraded", False, "AsExpected", "", 1)
    conditions = set_condition(conditions, "Ready", False, "Syncing", "syncing version 2", 2)
    ready = get_condition(conditions, "Ready")
    assert (ready.reason, ready.observed_generation, ready.last_transition_time) == \
        ("Syncing", 2, "2026-01-01T00:00:00Z")  # still False: the time it became False stays
    conditions = set_condition(conditions, "Ready", True, "Synced", "all hold version 2", 2)
    assert get_condition(conditions, "Ready").last_transition_time == "2026-01-01T00:00:09Z"
    assert [c.type for c in conditions] == ["Ready", "Degraded"]



def test_peering_replicas_get_distinct_priorities_unless_one_is_given():
    from weightsync_operator.operator_cli import parse_args, peering_priority

    replicas = {peering_priority(parse_args(["-A", "--peering", "weightsync"])) for _ in range(20)}
    assert len(replicas) == 20 and all(p > 0 for p in replicas)  # one active replica, the rest stand by
    assert peering_priority(parse_args(["-A", "--peering", "weightsync", "--priority", "7"])) == 7
    assert peering_priority(parse_args(["-A", "--standalone"])) is None
