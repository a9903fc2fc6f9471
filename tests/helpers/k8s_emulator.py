"""An emulated Kubernetes API server for the operator's tests: kmock's KubernetesEmulator plus the
few things kopf, kubectl and our assertions need from a real API server.

kmock serves list/watch/create/patch/delete over real HTTP with watch streams, but it stamps no
metadata, treats `/status` like the main resource and validates nothing. This subclass, like an
API server:

- stamps `uid`, `creationTimestamp`, `resourceVersion` (on every write) and `generation` (bumped
  when the spec changes), and expands `generateName` (kopf posts Events that way);
- honours the status subresource: a PATCH of the object leaves `.status` alone, a PATCH of
  `/status` changes only `.status`;
- installs a CustomResourceDefinition when one is created (discovery, short names, printer
  columns), and rejects custom objects that do not satisfy its `openAPIV3Schema` (HTTP 422),
  including fields the real server would silently prune;
- lists objects in the order of their keys (namespace, then name), as etcd returns them;
- answers what kubectl asks for: list `kind`s, server-side printing (`as=Table`, with the CRD's
  printer columns, and the real server's columns for pods), and JSON watch streams;
- merges a strategic merge patch's `status.conditions` by `type`, as the API server does for pods.

It counts the requests it serves by verb and resource (`requests`, e.g. `("PATCH",
"weightsyncs/status")`), so that a test or benchmark can say how many API calls a round costs.

It also stands in for the kubelet in one respect: a pod with `readinessGates` is Ready only while
its containers are ready and every gate's condition is True (recomputed on every write).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import functools
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonschema
import kmock
from kmock._internal import dicts as kmock_dicts

CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
POD_RESOURCE = kmock.resource("", "v1", "pods")
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
_CREATE, _UPDATE, _DELETE = kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the CRD's schema, as the API server applies it ----------------------------------------
def schema_problems(obj: dict, schema: dict) -> list[str]:
    """Why `obj` would be rejected (or silently pruned) by a server holding this CRD schema.

    OpenAPI v3 schemas are JSON Schema draft 4 in spirit (boolean exclusiveMinimum), so draft 4
    validates them; pruning is checked separately, since JSON Schema allows unknown fields.
    """
    validator = _validator(json.dumps(schema, sort_keys=True))
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))]
    for section in ("spec", "status"):
        if section in obj and section in schema.get("properties", {}):
            problems += [f"{path}: unknown field (a real API server prunes it)"
                         for path in _unknown_fields(obj[section], schema["properties"][section], section)]
    return problems


@functools.lru_cache(maxsize=16)
def _validator(schema_json: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(json.loads(schema_json))


def _unknown_fields(value: Any, schema: dict, path: str) -> list[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        if "properties" in schema:
            found = []
            for key, sub in value.items():
                if key not in schema["properties"]:
                    found.append(f"{path}.{key}")
                else:
                    found += _unknown_fields(sub, schema["properties"][key], f"{path}.{key}")
            return found
        if isinstance(schema.get("additionalProperties"), dict):
            return [p for key, sub in value.items()
                    for p in _unknown_fields(sub, schema["additionalProperties"], f"{path}.{key}")]
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [p for i, item in enumerate(value) for p in _unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


# -- server-side printing ---------------------------------------------------------------------
def _json_path(obj: Any, path: str) -> Any:
    """A printer column's simple JSONPath (`.status.lastSync.gbps`); None when absent."""
    for part in path.strip(".").split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _strategic_merge(old: dict, patch: dict) -> dict:
    """A strategic merge patch as the API server applies it to a pod's status: a merge patch,
    except that `status.conditions` entries merge by `type` instead of replacing the list."""
    conditions = (patch.get("status") or {}).get("conditions")
    if conditions is None:
        return dict(kmock_dicts.merge_patch_dict(old, patch))
    rest = {**patch, "status": {k: v for k, v in patch["status"].items() if k != "conditions"}}
    new = copy.deepcopy(dict(kmock_dicts.merge_patch_dict(old, rest)))
    merged = {c.get("type"): c for c in (new.get("status") or {}).get("conditions") or []}
    for condition in conditions:
        merged[condition.get("type")] = {**merged.get(condition.get("type"), {}), **condition}
    new.setdefault("status", {})["conditions"] = list(merged.values())
    return new


def _kubelet_readiness(pod: dict) -> None:
    """The kubelet's rule for a pod with readiness gates: Ready = containers ready and every gate's
    condition True."""
    gates = [g.get("conditionType") for g in (pod.get("spec") or {}).get("readinessGates") or []]
    status = pod.get("status") or {}
    if not gates or not status:
        return
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    containers = status.get("containerStatuses") or []
    ready = bool(containers) and all(c.get("ready") for c in containers) and all(
        (conditions.get(g) or {}).get("status") == "True" for g in gates)
    for kind, value in (("ContainersReady", bool(containers) and all(c.get("ready") for c in containers)),
                        ("Ready", ready)):
        conditions[kind] = {**conditions.get(kind, {}), "type": kind, "status": "True" if value else "False"}
    status["conditions"] = list(conditions.values())


def _pod_row(pod: dict) -> list[Any]:
    """The real API server's printer columns for a pod (kubectl's READY, RESTARTS, READINESS GATES)."""
    status, spec = pod.get("status") or {}, pod.get("spec") or {}
    containers = status.get("containerStatuses") or []
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    gates = [g.get("conditionType") for g in spec.get("readinessGates") or []]
    return [f"{sum(bool(c.get('ready')) for c in containers)}/{len(spec.get('containers') or [])}",
            status.get("phase", "Pending"), sum(int(c.get("restartCount", 0)) for c in containers),
            _human_age(pod.get("metadata", {}).get("creationTimestamp")), status.get("podIP") or "<none>",
            spec.get("nodeName") or "<none>", "<none>",
            f"{sum(conditions.get(g) == 'True' for g in gates)}/{len(gates)}" if gates else "<none>"]


POD_COLUMNS = [("Ready", "string", 0), ("Status", "string", 0), ("Restarts", "string", 0), ("Age", "string", 0),
               ("IP", "string", 1), ("Node", "string", 1), ("Nominated Node", "string", 1),
               ("Readiness Gates", "string", 1)]


def _counted_path(request: kmock.Request) -> str:
    """What a request is counted under: its resource's plural and subresource (`pods/status`)."""
    plural = request.resource.plural if request.resource is not None and request.resource.plural else "-"
    return f"{plural}/{request.subresource}" if request.subresource else plural


def _human_age(timestamp: str | None) -> str | None:
    if not timestamp:
        return None
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = max(0, int((datetime.datetime.now(datetime.UTC) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


@attrs.define
class _Kind:
    """What the server knows of one resource beyond kmock's discovery info."""

    kind: str
    schema: dict | None = None
    columns: list[dict] = attrs.field(factory=list)
    status_subresource: bool = False


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    _counter: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _kinds: dict[Any, _Kind] = attrs.field(factory=dict, init=False)
    _tombstones: dict[tuple, dict] = attrs.field(factory=dict, init=False)  # deleted: their last state
    # (HTTP method, "plural[/subresource]") -> requests served; discovery and the like as "-"
    requests: collections.Counter = attrs.field(factory=collections.Counter, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()  # without it kopf waits forever for namespaces

    # -- objects ----------------------------------------------------------------------------
    def get(self, resource: Any, namespace: str | None, name: str) -> dict | None:
        """The stored object as plain JSON, or None."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def history(self, resource: Any, namespace: str | None, name: str) -> list[dict]:
        """Every stored version of an object, oldest first (deletions left out)."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects:
            return []
        return [copy.deepcopy(v.raw) for v in self.objects[key].history if v is not None]

    def _kind(self, resource: Any) -> _Kind:
        if resource not in self._kinds:
            info = self.resources[resource] if resource in self.resources else None
            kind = info.kind if info is not None and info.kind else (resource.plural or "").capitalize()
            self._kinds[resource] = _Kind(kind=kind, status_subresource=bool(info and "status" in info.subresources))
        return self._kinds[resource]

    # -- requests: objects served directly, the rest (discovery) through kmock's reactions ---
    async def _handle(self, request: kmock.Request):
        self.requests[(request.method, _counted_path(request))] += 1
        if request.resource is None or not request.resource.plural or request.action not in self._serving:
            return await super(kmock.KubernetesEmulator, self)._handle(request)
        # kmock would match each request against every reaction it knows (milliseconds per
        # request); the objects' own requests go straight to their handlers instead.
        gone = None
        if request.action == _CREATE or (request.action in (_UPDATE, _DELETE) and request.name):
            async with self._lock:
                gone = await self._write(request)
        try:
            if request.action == kmock.action.WATCH:
                return await self._stream(request)
            return aiohttp.web.json_response(await self._serving[request.action](request))
        finally:
            if gone is not None:  # deletion released by its last finalizer: gone after answering
                async with self._lock:
                    raw = self._final(self.objects[gone].raw, request.resource)
                    self.objects[gone].delete()
                    await self._buses[request.resource].put({"type": "DELETED", "object": raw})

    @property
    def _serving(self) -> dict:
        return {kmock.action.LIST: self._serve_list, kmock.action.FETCH: self._serve_fetch,
                kmock.action.WATCH: None, _CREATE: self._serve_create, _UPDATE: self._serve_update,
                _DELETE: self._serve_delete}

    async def _stream(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request._raw_request)
        try:
            async for chunk in self._watch(request):
                await response.write(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the server is stopping
        return response

    def _final(self, raw: dict, resource) -> dict:
        """The object as its DELETED event carries it: at a resourceVersion of its own, so that a
        watch started from any earlier version sees the deletion (remembered for such watches)."""
        raw = copy.deepcopy(raw)
        meta = raw.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self._counter))
        self._tombstones[(resource, meta.get("namespace"), meta.get("name"))] = raw
        return raw

    async def _write(self, request: kmock.Request):
        resource = request.resource
        if request.action == _CREATE:
            return await self._create(request, resource)
        key = (resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        stored = self.objects[key]
        old = copy.deepcopy(stored.raw)
        if request.action == _DELETE:
            if old.get("metadata", {}).get("deletionTimestamp"):
                return None
            if old.get("metadata", {}).get("finalizers"):
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = _now()
                new["metadata"]["resourceVersion"] = str(next(self._counter))
                stored.create(new)
                await self._buses[resource].put({"type": "MODIFIED", "object": copy.deepcopy(new)})
                return None
            stored.delete()
            await self._buses[resource].put({"type": "DELETED", "object": self._final(old, resource)})
            return None
        new = self._patched(old, request, resource)
        stored.create(new)
        await self._buses[resource].put({"type": "MODIFIED", "object": copy.deepcopy(new)})
        meta = new.get("metadata", {})
        return key if meta.get("deletionTimestamp") and not meta.get("finalizers") else None

    async def _create(self, request: kmock.Request, resource):
        obj = request.data if isinstance(request.data, dict) else None
        if obj is None:
            raise kmock.KubernetesError(400, "BadRequest", "the body is not a JSON object")
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise kmock.KubernetesError(422, "Invalid", "metadata.name: Required value")
        if request.namespace:
            meta["namespace"] = request.namespace
        key = (resource, meta.get("namespace"), meta["name"])
        if key in self.objects and not self.objects[key].deleted:
            raise kmock.KubernetesError(409, "AlreadyExists", f"{resource.plural} {meta['name']!r} already exists")
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(),
                    resourceVersion=str(next(self._counter)), generation=1)
        self._tombstones.pop(key, None)
        if resource == CRD_RESOURCE:
            self._install(obj)
        if resource == POD_RESOURCE:
            _kubelet_readiness(obj)
        self._check(resource, obj)
        if key in self.objects:
            self.objects[key].create(obj)
        else:
            self.objects[key] = obj
        await self._buses[resource].put({"type": "ADDED", "object": copy.deepcopy(obj)})
        return None

    def _patched(self, old: dict, request: kmock.Request, resource) -> dict:
        patch = request.data
        if isinstance(patch, list):
            try:
                new = jsonpatch.apply_patch(old, patch, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                raise kmock.KubernetesError(422, "Invalid", f"JSON patch failed: {error}") from None
        elif isinstance(patch, dict) and STRATEGIC_MERGE in request.headers.get("Content-Type", ""):
            new = _strategic_merge(old, patch)
        elif isinstance(patch, dict):
            new = dict(kmock_dicts.merge_patch_dict(old, patch))
        else:
            raise kmock.KubernetesError(400, "BadRequest", "the patch is neither a JSON object nor a list")
        new = copy.deepcopy(new)
        if self._kind(resource).status_subresource:
            if request.subresource == "status":  # only the status changes through /status
                new = {**old, "status": new.get("status")} if new.get("status") is not None else \
                    {k: v for k, v in old.items() if k != "status"}
            elif "status" in old or "status" in new:  # ... and never through the object
                new = {**new, "status": old.get("status")} if "status" in old else \
                    {k: v for k, v in new.items() if k != "status"}
        meta = new.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "name", "namespace"):
            if field in old.get("metadata", {}):
                meta[field] = old["metadata"][field]
        meta["resourceVersion"] = str(next(self._counter))
        if resource == POD_RESOURCE:
            _kubelet_readiness(new)
        generation = old.get("metadata", {}).get("generation", 1)
        meta["generation"] = generation + 1 if new.get("spec") != old.get("spec") else generation
        self._check(resource, new)
        return new

    def _check(self, resource, obj: dict) -> None:
        schema = self._kind(resource).schema
        if schema is None:
            return
        problems = schema_problems(obj, schema)
        if problems:
            raise kmock.KubernetesError(422, "Invalid", f"{self._kind(resource).kind} is invalid: "
                                        + "; ".join(problems))

    def _install(self, crd: dict) -> None:
        """Serve a newly created CRD's resource, as the API server does."""
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for version in spec.get("versions", []):
            resource = kmock.resource(spec["group"], version["name"], names["plural"])
            subresources = set(version.get("subresources", {}))
            self.resources[resource] = kmock.ResourceInfo(
                kind=names["kind"], singular=names.get("singular"), shortnames=names.get("shortNames", []),
                categories=names.get("categories", []), namespaced=spec.get("scope") == "Namespaced",
                verbs=VERBS, subresources=subresources)
            self._kinds[resource] = _Kind(
                kind=names["kind"], schema=version.get("schema", {}).get("openAPIV3Schema"),
                columns=version.get("additionalPrinterColumns", []), status_subresource="status" in subresources)

    # -- reads: what kubectl needs --------------------------------------------------------
    async def _serve_list(self, request: kmock.Request):
        answer = await super()._serve_list(request)
        answer["items"] = sorted((o for o in answer["items"] if self._selected(
            request, o.get("metadata", {}).get("namespace"), o.get("metadata", {}).get("name"))),
            key=lambda o: (o.get("metadata", {}).get("namespace") or "", o.get("metadata", {}).get("name") or ""))
        kind = self._kind(request.resource).kind
        answer["metadata"]["resourceVersion"] = str(next(self._counter))
        if self._wants_table(request):
            return self._table(request.resource, answer["items"])
        return {"kind": f"{kind}List", "apiVersion": self._api_version(request.resource), **answer}

    async def _serve_fetch(self, request: kmock.Request):
        obj = await super()._serve_fetch(request)
        return self._table(request.resource, [obj]) if self._wants_table(request) else obj

    async def _watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        """A watch as the API server's: the objects as of now (only what changed after the given
        resourceVersion, deletions included), then every change. The bus is joined before the
        snapshot is taken, so no change can fall between the two."""
        since = int(request.params.get("resourceVersion") or 0)
        bus = self._buses[request.resource]
        mark = await bus.mark()
        try:
            yield b""  # the headers go out now, even if nothing happens for a while
            sent: dict[tuple, int] = {}
            async with self._lock:
                snapshot = [{"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                            for (res, ns, name), obj in self.objects.items()
                            if res == request.resource and not obj.deleted and self._selected(request, ns, name)]
                if since:
                    snapshot += [{"type": "DELETED", "object": copy.deepcopy(raw)}
                                 for (res, ns, name), raw in self._tombstones.items()
                                 if res == request.resource and self._selected(request, ns, name)]
            for event in snapshot:
                if (line := self._watch_line(request, event, since, sent)) is not None:
                    yield line
            async for event in bus.stream(since=mark):  # pragma: no branch
                if (line := self._watch_line(request, event, since, sent)) is not None:
                    yield line
        finally:
            await bus.unmark(mark)

    def _watch_line(self, request: kmock.Request, event: dict, since: int, sent: dict) -> bytes | None:
        meta = event["object"].get("metadata", {})
        key = (meta.get("namespace"), meta.get("name"))
        version = int(meta.get("resourceVersion", 0))
        if not self._selected(request, *key) or version <= max(since, sent.get(key, 0)):
            return None  # not asked for, or already known to the client
        sent[key] = version
        if self._wants_table(request):
            event = {"type": event["type"], "object": self._table(request.resource, [event["object"]])}
        return json.dumps(event).encode() + b"\n"

    @staticmethod
    def _selected(request: kmock.Request, namespace: str | None, name: str) -> bool:
        """The request's namespace and name, from its path or a metadata.* fieldSelector."""
        wanted = {"metadata.namespace": request.namespace, "metadata.name": request.name}
        for term in filter(None, request.params.get("fieldSelector", "").split(",")):
            field, _, value = term.partition("=")
            wanted[field] = value
        return (wanted["metadata.namespace"] in (None, namespace)) and (wanted["metadata.name"] in (None, name))

    async def _serve_version(self, request: kmock.Request):
        answer = await super()._serve_version(request)
        if not request.resource.group:  # the core group's is "v1" (kmock writes "/v1", which
            answer["groupVersion"] = request.resource.version  # kubectl skips: pods became PodMetrics)
        for entry in answer["resources"]:  # subresources have no short names of their own
            if "/" in entry["name"]:
                entry["shortNames"], entry["categories"] = [], []
        return answer

    @staticmethod
    def _wants_table(request: kmock.Request) -> bool:
        return "as=Table" in request.headers.get("Accept", "")

    @staticmethod
    def _api_version(resource) -> str:
        return f"{resource.group}/{resource.version}" if resource.group else resource.version

    def _table(self, resource, objects: list[dict]) -> dict:
        if resource == POD_RESOURCE:
            return self._pod_table(objects)
        columns = self._kind(resource).columns or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        definitions = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
        definitions += [{"name": c["name"], "type": c["type"], "format": c.get("format", ""),
                         "description": c.get("description", ""), "priority": c.get("priority", 0)}
                        for c in columns]
        rows = []
        for obj in objects:
            cells: list[Any] = [obj.get("metadata", {}).get("name")]
            for column in columns:
                value = _json_path(obj, column["jsonPath"])
                cells.append(_human_age(value) if column["type"] == "date" else value)
            rows.append({"cells": cells, "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": str(next(self._counter))},
                "columnDefinitions": definitions, "rows": rows}

    def _pod_table(self, pods: list[dict]) -> dict:
        definitions = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
        definitions += [{"name": name, "type": kind, "format": "", "description": "", "priority": priority}
                        for name, kind, priority in POD_COLUMNS]
        rows = [{"cells": [pod.get("metadata", {}).get("name"), *_pod_row(pod)], "object": {
            "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": pod.get("metadata", {})}}
            for pod in pods]
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": str(next(self._counter))},
                "columnDefinitions": definitions, "rows": rows}
