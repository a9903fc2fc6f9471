"""The Helm chart, rendered by Helm's own Go template engine (helm-python-sdk) and every manifest
validated: Kubernetes kinds against the API server's schemas (kubernetes-validate, strict),
Prometheus Operator kinds against models generated from its CRDs, kopf's peering objects
against the CRD the chart renders for them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from helpers.chart import (CHART, FULL, NAMESPACE, ROOT, find, kinds, pod_spec, render, validate_all)

pytestmark = pytest.mark.chart

REPO_CRD = ROOT / "crds" / "weightsync.dev_weightsyncs.yaml"
CHART_CRD = CHART / "files" / "crds" / "weightsync.dev_weightsyncs.yaml"
SIDECAR = CHART / "examples" / "inference-sidecar.yaml"

EVERYTHING_ON = {
    "commonLabels": {"team": "rl"},
    "imagePullSecrets": [{"name": "registry"}],
    "operator": {"replicas": 2, "extraArgs": ["--verbose"],
                 "extraEnv": [{"name": "LOG_LEVEL", "value": "debug"}],
                 "podAnnotations": {"a": "b"}, "nodeSelector": {"pool": "system"},
                 "tolerations": [{"key": "system", "operator": "Exists"}], "priorityClassName": "high"},
    "serviceAccount": {"annotations": {"iam": "role"}},
    "trainerRbac": {"bindings": [{"namespace": "rl", "serviceAccount": "trainer"}]},
    "daemon": {"enabled": True, "syncName": "grpo-policy", "replicas": 8, "backend": "ipc",
               "gpu": {"resource": "nvidia.com/mig-3g.40gb"},
               "extraEnv": [{"name": "NCCL_DEBUG", "value": "WARN"}], "runtimeClassName": "nvidia",
               "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                              "whenUnsatisfiable": "ScheduleAnyway",
                                              "labelSelector": {"matchLabels": {"weightsync.dev/role": "inference"}}}]},
    "networkPolicy": {"enabled": True, "trainerNamespaceSelector": {"matchLabels": {"team": "rl"}},
                      "metricsFrom": [{"namespaceSelector": {"matchLabels": {
                          "kubernetes.io/metadata.name": "monitoring"}}}]},
    "metrics": {"serviceMonitor": {"enabled": True, "additionalLabels": {"release": "kps"},
                                   "namespaceSelector": {"any": True}},
                "prometheusRule": {"enabled": True, "additionalLabels": {"release": "kps"},
                                   "alertLabels": {"team": "rl"}},
                "dashboard": {"enabled": True, "namespace": "grafana",
                              "annotations": {"grafana_folder": "weightsync"}}},
}


DEFAULT_KINDS = {  # what the default values render; every feature adds to it
    ("CustomResourceDefinition", "weightsyncs.weightsync.dev"),
    ("Deployment", f"{FULL}-operator"),
    ("ServiceAccount", FULL),
    ("ClusterRole", f"{FULL}-operator"),
    ("ClusterRoleBinding", f"{FULL}-operator"),
    ("ClusterRole", f"{FULL}-trainer"),
    ("Secret", f"{FULL}-auth"),
    ("Service", f"{FULL}-inference"),
    ("Service", f"{FULL}-trainer"),
}


def test_defaults_render_and_validate():
    docs = render()
    validate_all(docs)
    assert kinds(docs) == DEFAULT_KINDS


def test_every_feature_on_renders_and_validates():
    docs = render(EVERYTHING_ON)
    validate_all(docs)
    assert kinds(docs) == DEFAULT_KINDS | {
        ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
        ("CustomResourceDefinition", "kopfpeerings.kopf.dev"),
        ("ClusterKopfPeering", FULL),
        ("Deployment", f"{FULL}-daemon"),
        ("RoleBinding", f"{FULL}-trainer-trainer"),
        ("NetworkPolicy", f"{FULL}-daemon"),
        ("ServiceMonitor", FULL),
        ("PrometheusRule", FULL),
        ("ConfigMap", f"{FULL}-dashboard"),
    }
    assert all(d["metadata"]["labels"]["team"] == "rl" for d in docs)


def test_namespaced_operator_renders_and_validates():
    docs = render({"operator": {"watchNamespaces": ["team-a", "team-b"], "replicas": 3}})
    validate_all(docs)
    rbac_kinds = ("Role", "RoleBinding", "KopfPeering")
    assert {(d["kind"], d["metadata"].get("namespace")) for d in docs if d["kind"] in rbac_kinds} \
        == {(k, ns) for k in rbac_kinds for ns in ("team-a", "team-b")}


def test_lint_is_clean():
    for values in ({}, EVERYTHING_ON):
        report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], problems or report["errors"]


def test_a_wrong_value_is_refused_naming_the_field():
    cases = [({"operator": {"replica": 2}}, "replica"),
             ({"daemon": {"backend": "rdma"}}, "backend"),
             ({"operator": {"replicas": 0}}, "replicas"),
             ({"metrics": {"prometheusRule": {"syncsFailing": {"window": "ten minutes"}}}}, "window")]
    for values, field in cases:
        with pytest.raises(helm_python.HelmValuesError, match=field):
            render(values)


# -- the CRD ------------------------------------------------------------------------------

def test_crd_is_installed_and_kept_by_values():
    crd = find(render(), "CustomResourceDefinition", "weightsyncs.weightsync.dev")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    names = crd["spec"]["names"]
    assert (crd["spec"]["group"], names["kind"], names["plural"], names["shortNames"]) == \
        ("weightsync.dev", "WeightSync", "weightsyncs", ["wsync"])
    assert any(v["name"] == "v1alpha1" and v["storage"] for v in crd["spec"]["versions"])
    loose = find(render({"crds": {"keep": False}}), "CustomResourceDefinition", "weightsyncs.weightsync.dev")
    assert "helm.sh/resource-policy" not in loose["metadata"].get("annotations", {})
    assert not [d for d in render({"crds": {"install": False}}) if d["kind"] == "CustomResourceDefinition"]


def test_chart_crd_is_the_repository_crd():
    if not REPO_CRD.exists():
        pytest.skip(f"{REPO_CRD.relative_to(ROOT)} does not exist yet (the operator's CRD); "
                    "the chart ships a provisional copy until it does")
    assert CHART_CRD.read_text() == REPO_CRD.read_text(), \
        f"copy {REPO_CRD.relative_to(ROOT)} to {CHART_CRD.relative_to(ROOT)}"


# -- the operator -------------------------------------------------------------------------

def test_operator_runs_hardened_with_the_contract_command():
    docs = render()
    spec = pod_spec(docs, f"{FULL}-operator")
    (container,) = spec["containers"]
    assert container["command"] + container["args"] == [
        "weightsync", "operator", "--all-namespaces", "--standalone", "--liveness=http://0.0.0.0:8080/healthz"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert {"name": "WEIGHTSYNC_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": f"{FULL}-auth", "key": "token"}}} in container["env"]
    assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"]
    deployment = find(docs, "Deployment", f"{FULL}-operator")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert spec["serviceAccountName"] == FULL


def test_operator_command_parses_with_the_operator_cli():
    """The chart's command line, read by the operator's own argument parser (the contract)."""
    if not (OPERATOR_CODE / "operator_cli.py").exists():
        pytest.skip("weightsync_operator.operator_cli (the `weightsync operator` command) is not there yet")
    from weightsync_operator.operator_cli import parse_args

    def args(values: dict) -> list[str]:
        container = pod_spec(render(values), f"{FULL}-operator")["containers"][0]
        assert container["command"] == ["weightsync", "operator"]
        return container["args"]

    default = parse_args(args({}))
    assert default.all_namespaces and default.standalone and not default.peering
    assert default.liveness == "http://0.0.0.0:8080/healthz"
    scoped = parse_args(args({"operator": {"watchNamespaces": ["rl", "eval"], "replicas": 2, "extraArgs": ["-v"]}}))
    assert scoped.namespace == ["rl", "eval"] and not scoped.all_namespaces
    assert scoped.peering == FULL and not scoped.standalone and scoped.verbose


@pytest.mark.parametrize("backend", ["nccl", "p2p", "ipc", "cpu"])
def test_daemon_command_parses_with_the_daemon_cli(backend):
    from weightsync_daemon.server import parse_args

    docs = render({"daemon": {"enabled": True, "syncName": "policy", "backend": backend}})
    container = pod_spec(docs, f"{FULL}-daemon")["containers"][0]
    parsed = parse_args(container["args"])
    assert (parsed.host, parsed.port, parsed.backend, parsed.device) == ("0.0.0.0", 8200, backend, "cuda:0")


def test_more_replicas_peer_through_kopf():
    docs = render({"operator": {"replicas": 3}})
    container = pod_spec(docs, f"{FULL}-operator")["containers"][0]
    assert f"--peering={FULL}" in container["args"] and "--standalone" not in container["args"]
    peering = find(docs, "ClusterKopfPeering", FULL)
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert "strategy" not in find(docs, "Deployment", f"{FULL}-operator")["spec"]
    rules = find(docs, "ClusterRole", f"{FULL}-operator")["rules"]
    assert {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"],
            "verbs": ["get", "list", "watch", "patch"]} in rules
    named = render({"operator": {"replicas": 2, "peering": {"name": "shared", "installCRDs": False}}})
    assert "--peering=shared" in pod_spec(named, f"{FULL}-operator")["containers"][0]["args"]
    assert not [d for d in named if d["kind"] == "CustomResourceDefinition" and "kopf" in d["metadata"]["name"]]


def test_an_existing_secret_is_used_instead_of_a_generated_one():
    docs = render({"auth": {"existingSecret": "my-token"}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = pod_spec(docs, f"{FULL}-operator")["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"] == {"name": "my-token", "key": "token"}
    generated = find(render(), "Secret")
    assert generated["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    import base64

    assert len(base64.b64decode(generated["data"]["token"])) == 48


# -- RBAC ---------------------------------------------------------------------------------

def grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


NAMESPACED = ({("weightsync.dev", "weightsyncs", v) for v in ("list", "watch", "patch")}
              | {("weightsync.dev", "weightsyncs/status", "patch")}
              | {("", "pods", v) for v in ("list", "watch")}
              | {("", "pods/status", "patch")}
              | {("", "events", "create")})
DISCOVERY = ({("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
             | {("", "namespaces", v) for v in ("list", "watch")})


def test_rbac_grants_only_what_the_operator_uses():
    docs = render()
    cluster = grants(find(docs, "ClusterRole", f"{FULL}-operator")["rules"])
    assert cluster == NAMESPACED | DISCOVERY
    assert not {g for g in cluster if "*" in g or g[1] == "secrets"}
    binding = find(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULL, "namespace": NAMESPACE}]
    assert binding["roleRef"]["name"] == find(docs, "ClusterRole", f"{FULL}-operator")["metadata"]["name"]


def test_rbac_is_namespaced_when_namespaces_are_listed():
    docs = render({"operator": {"watchNamespaces": ["team-a"]}})
    assert grants(find(docs, "ClusterRole", f"{FULL}-operator")["rules"]) == DISCOVERY
    role = find(docs, "Role")
    assert role["metadata"]["namespace"] == "team-a" and grants(role["rules"]) == NAMESPACED
    assert find(docs, "RoleBinding")["subjects"][0]["namespace"] == NAMESPACE
    args = pod_spec(docs, f"{FULL}-operator")["containers"][0]["args"]
    assert args[:2] == ["--namespace=team-a", "--standalone"]


# What each KubeApi method needs, for the scan of the code below.
KUBE_API_VERBS = {"get": {("weightsync.dev", "weightsyncs", "get")},
                  "patch_spec": {("weightsync.dev", "weightsyncs", "patch")},
                  "replace_status": {("weightsync.dev", "weightsyncs/status", "patch")},
                  "patch_pod_condition": {("", "pods/status", "patch")},
                  "watch": {("weightsync.dev", "weightsyncs", v) for v in ("list", "watch")}}
OPERATOR_CODE = ROOT / "operator" / "weightsync_operator"


def _kube_calls(paths: list[Path]) -> set[str]:
    """Names of the KubeApi methods the code calls or hands to a thread (`kube.<method>`)."""
    calls = set()
    for path in paths:
        calls |= set(re.findall(r"\bkube\.(\w+)", path.read_text()))
    return calls - {"close", "from_environment", "for_url"}


def test_rbac_covers_every_kubernetes_call_the_code_makes():
    """Read the operator's and the trainer client's code: each KubeApi call and kopf event needs
    its verbs in the matching role (and the roles hold nothing else, see above)."""
    trainer_code = OPERATOR_CODE / "trainer_client.py"
    if not (OPERATOR_CODE / "handlers.py").exists():
        pytest.skip("the operator's kopf handlers are not there yet")
    operator_code = [p for p in OPERATOR_CODE.glob("*.py") if p.name not in ("kube.py", "trainer_client.py")]
    docs = render()
    operator_grants = grants(find(docs, "ClusterRole", f"{FULL}-operator")["rules"])
    trainer_grants = grants(find(docs, "ClusterRole", f"{FULL}-trainer")["rules"])
    calls = _kube_calls(operator_code)
    assert calls <= set(KUBE_API_VERBS), f"unknown KubeApi calls {calls - set(KUBE_API_VERBS)}: map them to verbs"
    for call in calls:
        assert KUBE_API_VERBS[call] <= operator_grants, f"the operator calls kube.{call} without its verbs"
    handlers = (OPERATOR_CODE / "handlers.py").read_text() + (OPERATOR_CODE / "runtime.py").read_text()
    if "kopf.event(" in handlers:
        assert ("", "events", "create") in operator_grants
    if '"pods"' in handlers:
        assert {("", "pods", "list"), ("", "pods", "watch")} <= operator_grants
    if trainer_code.exists():
        needed = set().union(*(KUBE_API_VERBS[c] for c in _kube_calls([trainer_code])))
        assert needed == trainer_grants


def test_trainer_role_is_bound_where_asked():
    docs = render({"trainerRbac": {"bindings": [{"namespace": "rl", "serviceAccount": "trainer"},
                                                {"namespace": "rl-eval", "serviceAccount": "eval"}]}})
    role = find(docs, "ClusterRole", f"{FULL}-trainer")
    assert grants(role["rules"]) == {("weightsync.dev", "weightsyncs", v) for v in ("get", "list", "watch", "patch")}
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {(b["metadata"]["namespace"], b["subjects"][0]["name"], b["roleRef"]["name"]) for b in bindings} == {
        ("rl", "trainer", f"{FULL}-trainer"), ("rl-eval", "eval", f"{FULL}-trainer")}
    assert not [d for d in render({"trainerRbac": {"create": False}}) if "trainer" in d["metadata"]["name"]
                and "Role" in d["kind"]]


def test_rbac_and_operator_can_be_left_out():
    docs = render({"operator": {"enabled": False}})
    assert not [d for d in docs if d["kind"] in ("Deployment", "ClusterRole", "ServiceAccount")
                and d["metadata"]["name"] != f"{FULL}-trainer"]
    assert not [d for d in render({"rbac": {"create": False}})
                if "Role" in d["kind"] and "operator" in d["metadata"]["name"]]


# -- the GPU daemons ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["nccl", "p2p", "ipc", "cpu"])
def test_one_daemon_per_gpu_with_host_ipc_only_for_ipc(backend):
    docs = render({"daemon": {"enabled": True, "syncName": "policy", "replicas": 4, "backend": backend}})
    deployment = find(docs, "Deployment", f"{FULL}-daemon")
    assert deployment["spec"]["replicas"] == 4
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert labels["weightsync.dev/role"] == "inference" and labels["weightsync.dev/sync"] == "policy"
    spec = template["spec"]
    assert spec.get("hostIPC", False) is (backend == "ipc")
    (container,) = spec["containers"]
    assert container["command"] + container["args"] == [
        "weightsync", "daemon", "--host=0.0.0.0", "--port=8200", f"--backend={backend}", "--device=cuda:0"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["ports"] == [{"name": "http", "containerPort": 8200, "protocol": "TCP"}]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "WEIGHTSYNC_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": f"{FULL}-auth", "key": "token"}}} in container["env"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_daemons_need_the_weightsync_they_serve():
    with pytest.raises(helm_python.HelmRenderError, match="daemon.syncName is required"):
        render({"daemon": {"enabled": True}})


def test_network_policy_limits_the_daemon_port_to_operator_and_trainer():
    docs = render(EVERYTHING_ON)
    policy = find(docs, "NetworkPolicy")["spec"]
    daemon_labels = find(docs, "Deployment", f"{FULL}-daemon")["spec"]["selector"]["matchLabels"]
    operator_labels = find(docs, "Deployment", f"{FULL}-operator")["spec"]["selector"]["matchLabels"]
    assert policy["podSelector"] == {"matchLabels": daemon_labels}
    assert policy["policyTypes"] == ["Ingress"]
    http, transfer = policy["ingress"]
    trainer = {"podSelector": {"matchLabels": {"weightsync.dev/role": "trainer", "weightsync.dev/sync": "grpo-policy"}},
               "namespaceSelector": {"matchLabels": {"team": "rl"}}}
    assert http["ports"] == [{"port": 8200, "protocol": "TCP"}]
    assert http["from"] == [{"podSelector": {"matchLabels": operator_labels}}, trainer,
                            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert transfer["ports"] == [{"port": 32768, "endPort": 60999, "protocol": "TCP"}]
    assert transfer["from"] == [trainer, {"podSelector": {"matchLabels": daemon_labels}}]
    assert not 32768 <= 8200 <= 60999  # the transfer range never opens the HTTP port


def test_sidecar_example_is_a_valid_inference_target():
    docs = list(yaml.safe_load_all(SIDECAR.read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.34", strict=True)
    pod = find(docs, "Deployment")["spec"]["template"]
    assert pod["metadata"]["labels"]["weightsync.dev/role"] == "inference"
    assert pod["metadata"]["labels"]["weightsync.dev/sync"]
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always" and sidecar["command"] == ["weightsync", "daemon"]
    assert {"name": "http", "containerPort": 8200, "protocol": "TCP"} in sidecar["ports"]
    assert sidecar["env"][0]["name"] == "WEIGHTSYNC_AUTH_TOKEN"
    assert sidecar["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert "hostIPC" not in pod["spec"]
    claims = {c["name"] for c in pod["spec"]["resourceClaims"]}
    assert all({c["name"] for c in c_["resources"]["claims"]} == claims
               for c_ in [sidecar, *pod["spec"]["containers"]])


def test_inference_pods_carry_the_synced_readiness_gate():
    """The chart's daemons, the sidecar example and the vLLM example are Ready (in their Service)
    only while the operator says they serve the current version."""
    from weightsync_operator.pods import SYNCED_CONDITION

    gate = [{"conditionType": SYNCED_CONDITION}]
    daemons = render({"daemon": {"enabled": True, "syncName": "policy"}})
    assert pod_spec(daemons, f"{FULL}-daemon")["readinessGates"] == gate
    sidecar = find(list(yaml.safe_load_all(SIDECAR.read_text())), "Deployment")
    assert sidecar["spec"]["template"]["spec"]["readinessGates"] == gate
    vllm = find(list(yaml.safe_load_all((ROOT / "examples" / "vllm-inference.yaml").read_text())), "Deployment")
    kubernetes_validate.validate(vllm, "1.34", strict=True)
    assert vllm["spec"]["template"]["spec"]["readinessGates"] == gate


# -- monitoring ---------------------------------------------------------------------------

def test_service_monitor_selects_the_metrics_services():
    docs = render(EVERYTHING_ON)
    monitor = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [d for d in docs if d["kind"] == "Service"]
    assert len(services) == 2
    for service in services:
        assert selector.items() <= service["metadata"]["labels"].items()
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["ports"] == [{"name": "http", "port": 8200, "targetPort": 8200, "protocol": "TCP"}]
        assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert {s["spec"]["selector"]["weightsync.dev/role"] for s in services} == {"inference", "trainer"}
    assert monitor["spec"]["jobLabel"] in services[0]["metadata"]["labels"]
    with pytest.raises(helm_python.HelmRenderError, match="metrics.services.enabled"):
        render({"metrics": {"services": {"enabled": False}, "serviceMonitor": {"enabled": True}}})


def test_dashboard_configmap_ships_the_dashboard_for_grafanas_sidecar():
    docs = render(EVERYTHING_ON)
    configmap = find(docs, "ConfigMap")
    assert configmap["metadata"]["namespace"] == "grafana"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "weightsync"}
    shipped = json.loads(configmap["data"]["weightsync.json"])
    assert shipped == json.loads((CHART / "dashboards" / "weightsync.json").read_text())


# -- values are documented ----------------------------------------------------------------

def _value_lines() -> list[tuple[tuple[str, ...], int]]:
    """(key path, line index) of every key in values.yaml, from its indentation."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    found, stack = [], []
    for index, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w]*):", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        stack = stack[:depth] + [match.group(2)]
        found.append((tuple(stack), index))
    return found


def _is_group(node: dict) -> bool:
    return node.get("additionalProperties") is False


def _chart_owned(schema: dict, path: tuple[str, ...]) -> bool:
    """Whether the key is one of the chart's own fields, not inside a free-form Kubernetes object
    (resources, affinity, securityContext ...)."""
    node = schema
    for key in path[:-1]:
        node = node.get("properties", {}).get(key, {})
        if not _is_group(node):
            return False
    return True


def _schema_node(schema: dict, path: tuple[str, ...]) -> dict:
    node = schema
    for key in path:
        assert key in node.get("properties", {}), f"values.schema.json lacks {'.'.join(path)}"
        node = node["properties"][key]
    return node


def test_every_value_is_documented_and_typed():
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    for path, index in _value_lines():
        if not _chart_owned(schema, path):
            continue
        node = _schema_node(schema, path)
        if _is_group(node):
            continue  # a group: its fields carry the documentation
        assert node.get("description"), f"{'.'.join(path)} has no description in values.schema.json"
        above = lines[index - 1].strip() if index else ""
        assert above.startswith("#"), f"values.yaml: {'.'.join(path)} (line {index + 1}) has no comment"
    documented = {path for path, _ in _value_lines()}
    chart = helm_python.Chart.load(CHART)

    def leaves(tree: dict, prefix=()):
        for key, value in tree.items():
            yield prefix + (key,)
            if isinstance(value, dict) and _is_group(_schema_node(schema, prefix + (key,))):
                yield from leaves(value, prefix + (key,))

    assert set(leaves(chart.values)) <= documented
