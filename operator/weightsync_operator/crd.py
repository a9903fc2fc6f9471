"""Generate the WeightSync CustomResourceDefinition from the models in `resource.py`.

    python -m weightsync_operator.crd > crds/weightsync.dev_weightsyncs.yaml   # regenerate
    python -m weightsync_operator.crd --check crds/weightsync.dev_weightsyncs.yaml

Kubernetes wants a structural OpenAPI v3 schema: no `$ref`, no `anyOf` with null, boolean
`exclusiveMinimum`. This module turns pydantic's JSON Schema into that shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from weightsync_operator import resource as r

CRD_FILE = "crds/weightsync.dev_weightsyncs.yaml"
_DROP = {"title"}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON Schema, inlined and reduced to what a Kubernetes structural schema allows."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    return _convert(schema, defs)


def _convert(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_convert(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    return _convert_children(_openapi_keywords(_inlined(dict(node), defs)), defs)


def _inlined(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """No `$ref`, one-member `allOf` or null `anyOf` left: a structural schema has none."""
    if "$ref" in node:  # inline, letting the field's own keys (description, default) win
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node.pop("allOf")[0]
        node = {**_convert(inner, defs), **node}
    if "anyOf" in node:  # Optional[X] is X: absent fields are simply left out, never null
        members = [m for m in node.pop("anyOf") if m.get("type") != "null"]
        if sorted(m.get("type") for m in members) == ["integer", "string"]:  # Kubernetes' IntOrString
            node = {"x-kubernetes-int-or-string": True, "anyOf": [_convert(m, defs) for m in members], **node}
        elif len(members) != 1:
            raise ValueError(f"not expressible as a structural schema: {members}")
        else:
            node = {**_convert(members[0], defs), **node}
    return node


def _openapi_keywords(node: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema 2020's keywords in OpenAPI 3.0's forms, as the API server reads them."""
    if node.get("default", 0) is None:
        del node["default"]
    if node.get("additionalProperties") is False:  # extra="forbid"; Kubernetes prunes unknown fields
        del node["additionalProperties"]
    if "exclusiveMinimum" in node:  # the number form becomes the boolean form
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    return node


def _convert_children(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: _convert(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _convert(value, defs)
        else:
            out[key] = value
    return out


def _without_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated sub-schemas out in full: anchors and aliases would puzzle readers."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Version", "type": "integer", "jsonPath": ".status.currentVersion",
     "description": "The version every target holds."},
    {"name": "Ready", "type": "string", "jsonPath": ".status.readyTargets",
     "description": "Targets holding the desired version / all targets."},
    {"name": "Last GB/s", "type": "number", "jsonPath": ".status.lastSync.gbps"},
    {"name": "Last duration", "type": "number", "jsonPath": ".status.lastSync.totalSeconds",
     "description": "Seconds of the last sync, pause to resume."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    spec_schema = structural_schema(r.WeightSyncSpec)
    status_schema = _without_defaults(structural_schema(r.WeightSyncStatus))  # the operator writes it all
    status_schema["description"] = "What the operator observed and did; written by the operator only."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{r.PLURAL}.{r.GROUP}"},
        "spec": {
            "group": r.GROUP,
            "names": {"kind": r.KIND, "listKind": f"{r.KIND}List", "plural": r.PLURAL,
                      "singular": r.SINGULAR, "shortNames": list(r.SHORT_NAMES)},
            "scope": "Namespaced",
            "versions": [{
                "name": r.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "Keeps every inference pod's weights at the version the trainer publishes.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema,
                        "status": status_schema,
                    },
                }},
            }],
        },
    }


def render() -> str:
    header = ("# Generated by `python -m weightsync_operator.crd` from "
              "operator/weightsync_operator/resource.py. Do not edit by hand.\n")
    return header + yaml.dump(build_crd(), Dumper=_PlainDumper, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weightsync_operator.crd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", type=Path, metavar="FILE",
                        help="exit 1 if FILE differs from what the models generate")
    args = parser.parse_args(argv)
    if args.check is not None:
        if yaml.safe_load(args.check.read_text()) != build_crd():
            print(f"{args.check} is out of date: run python -m weightsync_operator.crd > {args.check}",
                  file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
