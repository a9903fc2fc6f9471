"""The few Kubernetes API calls on WeightSync objects that the operator and the trainer make.

Built on the official `kubernetes` client, so credentials come from the usual places: the pod's
service account in a cluster, else the kubeconfig (`$KUBECONFIG`, `~/.kube/config`). KubeApi's
calls block (the trainer's get, patch and watch); the operator's status writes are async, on its
event loop, with the same credentials (AsyncStatusWriter).
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Iterator

import aiohttp
import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from weightsync_operator.resource import GROUP, PLURAL, VERSION


class KubeError(Exception):
    """An API call failed; `status` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class KubeApi:
    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.api_client = api_client
        self._objects = kubernetes.client.CustomObjectsApi(api_client)

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None, context: str | None = None) -> "KubeApi":
        """In-cluster credentials when running in a pod, else the kubeconfig."""
        config = kubernetes.client.Configuration()
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubernetes.config.load_incluster_config(client_configuration=config)
        else:  # $KUBECONFIG read now, not when the kubernetes package was imported
            kubernetes.config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"),
                                               context=context, client_configuration=config)
        return cls(kubernetes.client.ApiClient(config))

    @classmethod
    def for_url(cls, url: str, token: str | None = None) -> "KubeApi":
        """A client for one API server URL (tests, local emulators)."""
        config = kubernetes.client.Configuration(host=url.rstrip("/"))
        if token:
            config.api_key = {"authorization": f"Bearer {token}"}
        return cls(kubernetes.client.ApiClient(config))

    def close(self) -> None:
        self.api_client.close()


    @staticmethod
    def _call(what: str, fn, namespace: str, name: str, **kwargs):
        try:
            return fn(GROUP, VERSION, namespace, PLURAL, name, **kwargs)
        except ApiException as error:
            raise KubeError(f"{what}: HTTP {error.status}: {_message(error)}", error.status) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubeError(f"{what}: {error}") from None

    def get(self, namespace: str, name: str) -> dict:
        return self._call(f"get weightsync {namespace}/{name}", self._objects.get_namespaced_custom_object,
                          namespace, name, _request_timeout=30)

    def patch_spec(self, namespace: str, name: str, spec: dict) -> dict:
        """Merge `spec` into the object's spec; returns the object as stored."""
        return self._call(f"patch weightsync {namespace}/{name}", self._objects.patch_namespaced_custom_object,
                          namespace, name, body={"spec": spec},
                          _content_type="application/merge-patch+json", _request_timeout=30)

    def watch(self, namespace: str, name: str, resource_version: str | None, timeout: float) -> Iterator[dict]:
        """Yield the object each time it changes after `resource_version`, for up to `timeout`
        seconds (then stop quietly); reconnects when the stream ends early."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            watch = kubernetes.watch.Watch()
            kwargs = {"field_selector": f"metadata.name={name}", "timeout_seconds": max(1, int(left)),
                      "_request_timeout": left + 1}
            if resource_version:
                kwargs["resource_version"] = resource_version
            try:
                for event in watch.stream(self._objects.list_namespaced_custom_object, GROUP, VERSION,
                                          namespace, PLURAL, **kwargs):
                    obj = event["object"]
                    if event["type"] == "ERROR" or obj.get("metadata", {}).get("name") != name:
                        continue
                    resource_version = obj["metadata"].get("resourceVersion", resource_version)
                    yield obj
                    if time.monotonic() >= deadline:
                        return
            except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError, TimeoutError):
                pass  # the client-side deadline passed, or the server closed the stream: re-check
            except ApiException as error:
                raise KubeError(f"watch weightsync {namespace}/{name}: HTTP {error.status}: {_message(error)}",
                                error.status) from None
            finally:
                watch.stop()


def _message(error: ApiException) -> str:
    try:
        return json.loads(error.body).get("message", error.reason)
    except (TypeError, ValueError):
        return str(error.reason)


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

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json-patch+json", "Accept": "application/json"}
        for setting in self._config.auth_settings().values():
            if setting["in"] == "header" and setting["value"]:
                headers[setting["key"]] = setting["value"]
        return headers

    async def replace_status(self, namespace: str, name: str, status: dict) -> dict:
        """Replace the whole status (a JSON patch of /status), so fields left out are really gone."""
        what = f"write status of weightsync {namespace}/{name}"
        url = f"{self._config.host.rstrip('/')}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        body = json.dumps([{"op": "add", "path": "/status", "value": status}])
        http = self._client()
        try:
            async with http.patch(url, data=body, headers=self._headers(), ssl=self._ssl,
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
