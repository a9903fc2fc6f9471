"""vLLM targets in the chart and examples (issue 16 items 3, 4, 7): the NetworkPolicy that keeps
vLLM's unauthenticated weight routes away from everyone but the operator and the trainer, the
metrics Services and ServiceMonitor endpoints that scrape every vLLM worker once, the example
vLLM Deployment (examples/vllm-inference.yaml) and its image (docker/vllm.Dockerfile).

The policy is checked by what it admits: a small evaluator of NetworkPolicy ingress semantics
(a rule admits a connection when one of its ports and one of its peers match; a rule with no
peers admits every source) answers, for the example pods and the chart's own, who reaches which
port."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from helpers.chart import FULL, NAMESPACE, find, render, validate_all
from helpers.images import copied_sources, wheel_from_copies
from helpers.images import instructions as image_instructions
from weightsync_operator.pods import pod_ref

pytestmark = pytest.mark.chart

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vllm-inference.yaml"
WEIGHTSYNC = ROOT / "examples" / "weightsync.yaml"
TRAINER_POD = ROOT / "examples" / "trainer-pod.yaml"
DOCKERFILE = ROOT / "docker" / "vllm.Dockerfile"
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
ROUTER = {"podSelector": {"matchLabels": {"app": "router"}}}
VLLM_PORT, TRANSFER_PORT = 8000, 40000

VALUES = {
    "vllm": {"enabled": True, "syncName": "grpo-policy", "workersPerPod": 2, "inferenceFrom": [ROUTER]},
    "networkPolicy": {"enabled": True, "metricsFrom": [MONITORING]},
    "metrics": {"serviceMonitor": {"enabled": True}},
}


def example_pod() -> dict:
    """The example Deployment's pod, as the API server would serve it once running in `rl`."""
    template = find(list(yaml.safe_load_all(EXAMPLE.read_text())), "Deployment")["spec"]["template"]
    return {"metadata": {**template["metadata"], "name": "policy-vllm-0", "namespace": "rl", "uid": "u"},
            "spec": template["spec"],
            "status": {"phase": "Running", "podIP": "10.0.0.7",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


# -- a NetworkPolicy evaluator -------------------------------------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "the evaluator knows matchLabels only"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_admits(peer: dict, policy_ns: str, source: dict) -> bool:
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], source["namespace_labels"]):
            return False
    elif source["namespace"] != policy_ns:  # a bare podSelector: the policy's namespace only
        return False
    return "podSelector" not in peer or _selects(peer["podSelector"], source["labels"])


def _port_admits(rule_port: dict, port: int) -> bool:
    assert rule_port.get("protocol", "TCP") == "TCP" and isinstance(rule_port["port"], int)
    return rule_port["port"] <= port <= rule_port.get("endPort", rule_port["port"])


def admits(policy: dict, source: dict, port: int) -> bool:
    ns = policy["metadata"]["namespace"]
    for rule in policy["spec"]["ingress"]:
        if "ports" in rule and not any(_port_admits(p, port) for p in rule["ports"]):
            continue
        if not rule.get("from") or any(_peer_admits(peer, ns, source) for peer in rule["from"]):
            return True
    return False


def pod(labels: dict, namespace: str = NAMESPACE) -> dict:
    return {"labels": labels, "namespace": namespace, "namespace_labels": {"kubernetes.io/metadata.name": namespace}}


# -- the NetworkPolicy ---------------------------------------------------------------------

def test_only_operator_trainer_and_listed_clients_reach_vllms_port():
    docs = render(VALUES)
    validate_all(docs)
    policy = find(docs, "NetworkPolicy", f"{FULL}-vllm")
    target = example_pod()
    assert _selects(policy["spec"]["podSelector"], target["metadata"]["labels"]), \
        "the policy must select the example's vLLM pods"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (http_port,) = [p["containerPort"] for p in target["spec"]["containers"][0]["ports"] if p["name"] == "weightsync"]
    assert http_port == VLLM_PORT

    operator = pod(find(docs, "Deployment", f"{FULL}-operator")["spec"]["template"]["metadata"]["labels"])
    trainer_meta = yaml.safe_load(TRAINER_POD.read_text())["metadata"]
    trainer = pod(trainer_meta["labels"], NAMESPACE)  # the chart's trainerNamespaceSelector default: its own
    router = pod({"app": "router"})
    prometheus = pod({"app.kubernetes.io/name": "prometheus"}, "monitoring")
    other_vllm = pod(target["metadata"]["labels"])
    stranger = pod({"app": "curious"})
    stranger_elsewhere = pod({"app": "router"}, "default")

    expected = {  # source → (vLLM's HTTP port, worker 0 metrics, worker 1 metrics, a transfer port)
        "operator": (operator, True, False, False, False),
        "trainer": (trainer, True, False, False, True),
        "router (vllm.inferenceFrom)": (router, True, False, False, False),
        "prometheus (metricsFrom)": (prometheus, False, True, True, False),
        "another vLLM pod of the sync": (other_vllm, False, False, False, True),
        "any other pod": (stranger, False, False, False, False),
        "a router-labelled pod in another namespace": (stranger_elsewhere, False, False, False, False),
    }
    for name, (source, *wanted) in expected.items():
        got = [admits(policy, source, port) for port in (VLLM_PORT, 8200, 8201, TRANSFER_PORT)]
        assert got == wanted, f"{name}: admitted on (8000, 8200, 8201, transfer) = {got}"
    assert not admits(policy, prometheus, 8202), "only the pod's workers' metrics ports"


def test_without_metrics_peers_no_rule_admits_everyone():
    """A rule without peers would admit any source: with metricsFrom empty the metrics rule is
    left out (the ports stay closed), and no rule is ever peerless."""
    docs = render({**VALUES, "networkPolicy": {"enabled": True}})
    policy = find(docs, "NetworkPolicy", f"{FULL}-vllm")
    assert all(rule.get("from") for rule in policy["spec"]["ingress"])
    assert not admits(policy, pod({"app": "anything"}, "monitoring"), 8200)
    assert len(policy["spec"]["ingress"]) == 2


def test_vllm_targets_need_their_weightsync_and_valid_values():
    import helm_python

    with pytest.raises(helm_python.HelmRenderError, match="vllm.syncName is required"):
        render({"vllm": {"enabled": True}})
    for values, field in [({"workersPerPod": 0}, "/vllm/workersPerPod"), ({"port": "http"}, "/vllm/port"),
                          ({"inferenceFrom": {"app": "router"}}, "/vllm/inferenceFrom"), ({"ports": 1}, "ports")]:
        with pytest.raises(helm_python.HelmValuesError, match=field):
            render({"vllm": {"enabled": True, "syncName": "s", **values}})
    assert not [d for d in render({"networkPolicy": {"enabled": True}}) if d["kind"] == "NetworkPolicy"], \
        "no vLLM policy unless vllm.enabled"


# -- metrics -------------------------------------------------------------------------------

def test_every_vllm_worker_is_scraped_exactly_once():
    """Each of the example pod's metrics ports (8200 + worker) is a port of exactly one metrics
    Service selecting the pod whose port name is an endpoint of the ServiceMonitor; vLLM's own
    port is scraped by none (Prometheus is not admitted there)."""
    docs = render(VALUES)
    monitor = find(docs, "ServiceMonitor")
    endpoint_ports = [e["port"] for e in monitor["spec"]["endpoints"]]
    assert len(endpoint_ports) == len(set(endpoint_ports))
    target = example_pod()
    labels = target["metadata"]["labels"]
    services = [d for d in docs
                if d["kind"] == "Service" and _selects(monitor["spec"]["selector"], d["metadata"]["labels"])
                and d["spec"]["selector"].items() <= labels.items()]
    scraped = [p["targetPort"] for s in services for p in s["spec"]["ports"] if p["name"] in endpoint_ports]
    metrics_ports = [p["containerPort"] for p in target["spec"]["containers"][0]["ports"] if p["name"] != "weightsync"]
    assert sorted(scraped) == sorted(metrics_ports) == [8200, 8201]
    # Prometheus gives every target the pods' WeightSync labels, as for daemons.
    assert {"weightsync.dev/role", "weightsync.dev/sync"} <= set(monitor["spec"]["podTargetLabels"])


def test_one_worker_per_pod_needs_no_extra_service():
    docs = render({**VALUES, "vllm": {**VALUES["vllm"], "workersPerPod": 1}})
    assert not [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-vllm-workers")]
    assert [e["port"] for e in find(docs, "ServiceMonitor")["spec"]["endpoints"]] == ["http"]


# -- the example Deployment ----------------------------------------------------------------

def test_the_example_is_a_valid_vllm_target_of_the_example_weightsync():
    docs = list(yaml.safe_load_all(EXAMPLE.read_text()))
    for doc in docs:
        for version in ("1.30", "1.37"):
            kubernetes_validate.validate(doc, version, strict=True)
    target = example_pod()
    selector = yaml.safe_load(WEIGHTSYNC.read_text())["spec"]["targetSelector"]
    assert _selects(selector, target["metadata"]["labels"])
    ref = pod_ref(target)  # what the operator makes of the running pod
    assert ref.usable and ref.engine == "vllm" and ref.daemon_port == VLLM_PORT
    assert ref.endpoint(8200).url == f"http://10.0.0.7:{VLLM_PORT}"
    container = target["spec"]["containers"][0]
    assert container["image"].startswith("ghcr.io/weightsync/weightsync-vllm:")
    assert target["spec"]["securityContext"]["runAsUser"] == _dockerfile_uid()


# -- the image -----------------------------------------------------------------------------

def instructions() -> list[tuple[str, str]]:
    return image_instructions(DOCKERFILE)


def _dockerfile_uid() -> int:
    users = [value for kind, value in instructions() if kind == "USER"]
    return int(users[-1].split(":")[0])


def _env() -> dict[str, str]:
    return DockerfileParser(path=str(DOCKERFILE)).envs


def test_the_image_is_vllms_serving_image_plus_the_backend():
    parser = DockerfileParser(path=str(DOCKERFILE))
    assert parser.baseimage.startswith("vllm/vllm-openai:v0.33")
    runs = " ".join(value for kind, value in instructions() if kind == "RUN")
    assert 'pip install ".[vllm]"' in runs
    env = _env()
    assert env["VLLM_SERVER_DEV_MODE"] == "1"  # vLLM's weight routes exist only then
    assert env["WEIGHTSYNC_METRICS_PORT"] == "8200"
    assert env["WEIGHTSYNC_VLLM_URL"].endswith(f":{VLLM_PORT}")
    assert _dockerfile_uid() not in (0,)
    exposed = {p for kind, value in instructions() if kind == "EXPOSE" for p in value.split()}
    assert {str(VLLM_PORT), "8200"} <= exposed
    for source in copied_sources(DOCKERFILE):
        assert (ROOT / source).exists(), f"vllm.Dockerfile copies {source}, which does not exist"


def test_the_copied_files_build_the_backend_with_its_vllm_entry_point(tmp_path):
    """What `pip install ".[vllm]"` installs, built from only what the Dockerfile COPYs: the
    backend's modules and the entry point vLLM loads plugins by."""
    wheel = wheel_from_copies(DOCKERFILE, tmp_path)
    names, entry_points, metadata = wheel.names, wheel.entry_points, wheel.metadata
    for module in ("weightsync_vllm/__init__.py", "weightsync_vllm/engine.py", "weightsync_vllm/metrics.py"):
        assert module in names
    assert "[vllm.general_plugins]" in entry_points and "weightsync = weightsync_vllm:register" in entry_points
    assert "Provides-Extra: vllm" in metadata


@pytest.mark.vllm
def test_the_serve_command_parses_with_vllms_own_parser(vllm_python):
    """The image's entrypoint plus the example's args, parsed by vLLM's `vllm serve` parser (the
    CPU build's 0.32 in the vLLM venv; 0.33 moved it to vllm.entrypoints.common.cli_args): the
    weightsync backend, the port the example names "weightsync", and
    the tensor-parallel size that matches the example's metrics ports."""
    from helpers.vllm_server import vllm_serve_flags

    (entrypoint,) = [json.loads(value) for kind, value in instructions() if kind == "ENTRYPOINT"]
    assert entrypoint[:2] == ["vllm", "serve"]
    container = example_pod()["spec"]["containers"][0]
    argv = entrypoint[2:] + container["args"]
    got = vllm_serve_flags(vllm_python, argv)
    assert got["backend"] == "weightsync" and got["host"] == "0.0.0.0"
    assert got["port"] == VLLM_PORT
    metrics_ports = [p for p in container["ports"] if p["name"] != "weightsync"]
    assert got["tp"] == len(metrics_ports) == container["resources"]["limits"]["nvidia.com/gpu"]
