"""What one operator process shares across WeightSyncs: the Kubernetes client that writes status,
the connection pool that talks to the parties (daemons, vLLM servers), their bearer token, and one
Reconciler each."""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
import kubernetes

from weightsync_operator.client import party_session
from weightsync_operator.kube import KubeApi, KubeError
from weightsync_operator.reconciler import Reconciler
from weightsync_operator.resource import GROUP, PLURAL, VERSION


class AsyncStatusWriter:
    """The operator's one frequent API call, made on its event loop: no thread hop and none of
    the generated client's per-call validation (a status write is on every sync's critical path).
    It goes through aiohttp, the operator's HTTP stack (kopf's and the party pool's): a call costs
    the event loop a fraction of httpx's CPU time. Host, TLS, proxy and credentials come from the
    same kubernetes client configuration; a bearer token is read per request, so the service
    account's rotating token is honoured."""

    TIMEOUT_SECONDS = 30.0

    def __init__(self, config: kubernetes.client.Configuration):
        self._config = config
        self._http: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = False

    @classmethod
    def sharing_credentials_with(cls, api: KubeApi) -> "AsyncStatusWriter":
        return cls(api.api_client.configuration)

    def _client(self) -> aiohttp.ClientSession:
        # Made in the operator's event loop, on first use; one keep-alive connection pool.
        if self._http is None:
            config = self._config
            self._ssl = False
            if config.verify_ssl:
                self._ssl = ssl.create_default_context(cafile=config.ssl_ca_cert)
                if config.cert_file:
                    self._ssl.load_cert_chain(config.cert_file, config.key_file)
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.TIMEOUT_SECONDS),
                                               trust_env=False)
        return self._http

    def _headers(self, content_type: str) -> dict[str, str]:
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        settings: dict[str, Any] = dict(self._config.auth_settings())  # kubernetes' TypedDict, keyed by scheme
        for setting in settings.values():
            if setting["in"] == "header" and setting["value"]:
                headers[setting["key"]] = setting["value"]
        return headers

    async def replace_status(self, namespace: str, name: str, status: dict) -> dict:
        """Replace the whole status (a JSON patch of /status), so fields left out are really gone."""
        url = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        body = [{"op": "add", "path": "/status", "value": status}]
        return await self._patch(url, body, "application/json-patch+json",
                                 f"write status of weightsync {namespace}/{name}")

    async def patch_pod_condition(self, namespace: str, name: str, condition: dict) -> dict:
        """Set one condition of a pod's status (a strategic merge patch: the API server merges
        conditions by type, so the kubelet's own are left alone)."""
        url = f"/api/v1/namespaces/{namespace}/pods/{name}/status"
        body = {"status": {"conditions": [condition]}}
        return await self._patch(url, body, "application/strategic-merge-patch+json",
                                 f"set condition {condition['type']} of pod {namespace}/{name}")

    async def _patch(self, path: str, body: object, content_type: str, what: str) -> dict:
        url = f"{self._config.host.rstrip('/')}{path}"
        http = self._client()
        try:
            async with http.patch(url, data=json.dumps(body), headers=self._headers(content_type), ssl=self._ssl,
                                  proxy=self._config.proxy or None) as response:
                code, content = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise KubeError(f"{what}: {error!r}") from None
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if code >= 400:
            message = answer.get("message") if isinstance(answer, dict) else None
            raise KubeError(f"{what}: HTTP {code}: {message or content.decode(errors='replace')}", code)
        if not isinstance(answer, dict):
            raise KubeError(f"{what}: the API server answered something that is not a JSON object")
        return answer

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


class Runtime:
    def __init__(self, kube: KubeApi, token: str | None = None, recheck_interval: float = 30.0):
        self.kube = kube
        self.status_writer = AsyncStatusWriter.sharing_credentials_with(kube)
        self.token = token
        self.recheck_interval = recheck_interval
        self._http: aiohttp.ClientSession | None = None
        self._reconcilers: dict[tuple[str, str], Reconciler] = {}

    @property
    def http(self) -> aiohttp.ClientSession:
        # Made in the operator's event loop, on first use; keep-alive connections to every party.
        if self._http is None:
            self._http = party_session()
        return self._http

    def reconciler(self, namespace: str, name: str, body: Mapping) -> Reconciler:
        key = (namespace, name)
        if key not in self._reconcilers:
            kube = self.status_writer  # KubeApi's status write, on this event loop

            async def write_status(status: dict) -> None:
                await kube.replace_status(namespace, name, status)

            async def set_pod_condition(pod: str, condition: dict) -> None:
                await kube.patch_pod_condition(namespace, pod, condition)

            def emit(type: str, reason: str, message: str) -> None:
                kopf.event(body, type=type, reason=reason, message=message[:1024])

            self._reconcilers[key] = Reconciler(namespace, name, self.http, write_status, emit, self.token,
                                                self.recheck_interval, set_pod_condition)
        return self._reconcilers[key]

    def existing(self, namespace: str, name: str) -> Reconciler | None:
        return self._reconcilers.get((namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        self._reconcilers.pop((namespace, name), None)

    def wake_namespace(self, namespace: str) -> None:
        """Something changed among this namespace's pods: let its WeightSyncs take another look."""
        for (ns, _), reconciler in self._reconcilers.items():
            if ns == namespace:
                reconciler.wake.set()

    async def close(self) -> None:
        await self.status_writer.close()
        if self._http is not None:
            await self._http.close()
            self._http = None
