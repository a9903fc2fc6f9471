"""The chart as the chart tests see it: rendered by Helm's own Go template engine
(helm-python-sdk) and each manifest validated — Kubernetes kinds against the API server's schemas
(kubernetes-validate, strict), Prometheus Operator kinds against models generated from its CRDs,
kopf's peering objects against the CRD the chart renders for them."""

from __future__ import annotations

from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "weightsync"
RELEASE, NAMESPACE = "ws", "ml"
FULL = f"{RELEASE}-weightsync"
KUBE_VERSIONS = ("1.30", "1.37")  # validated against both ends of the supported range


def render(values: dict | None = None) -> list[dict]:
    """Every manifest the chart renders (NOTES.txt dropped), parsed."""
    chart = helm_python.Chart.load(CHART)
    files = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(docs: list[dict]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def pod_spec(docs: list[dict], name: str) -> dict:
    return find(docs, "Deployment", name)["spec"]["template"]["spec"]


# -- schema validation --------------------------------------------------------------------

def _prometheus_operator_model(kind: str):
    from cloudcoil.models.prometheus_operator import v1

    return {"ServiceMonitor": v1.ServiceMonitor, "PrometheusRule": v1.PrometheusRule}[kind]


def validate_custom(doc: dict, docs: list[dict]) -> None:
    """Prometheus Operator kinds: the models generated from its CRDs must accept the object and
    keep every field (a dropped field is one the CRD does not know). kopf.dev kinds: the schema
    of the CRD the chart itself renders for them."""
    if doc["apiVersion"] == "monitoring.coreos.com/v1":
        model = _prometheus_operator_model(doc["kind"]).model_validate(doc)
        assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc, \
            f"{doc['kind']} has fields its CRD does not define"
        return
    group = doc["apiVersion"].split("/")[0]
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition" and d["spec"]["group"] == group
            and d["spec"]["names"]["kind"] == doc["kind"]]
    assert crds, f"no schema known for {doc['apiVersion']} {doc['kind']}"
    schema = crds[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.validate({k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}, schema)


def validate_all(docs: list[dict]) -> None:
    for doc in docs:
        try:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.utils.SchemaNotFoundError:
            validate_custom(doc, docs)
        except kubernetes_validate.utils.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {error.message}")
