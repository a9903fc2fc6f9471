"""The few Kubernetes API calls on WeightSync objects that the operator and the trainer make.

Built on the official `kubernetes` client, so credentials come from the usual places: the pod's
service account in a cluster, else the kubeconfig (`$KUBECONFIG`, `~/.kube/config`). KubeApi's
calls block (the trainer's get, patch and watch); the operator's status writes are async, on its
event loop, with the same credentials (runtime.AsyncStatusWriter: aiohttp is the operator's, not
the trainer's).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator

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

    def watch(self, namespace: str, name: str, resource_version: str | None, timeout: float) -> Generator[dict]:
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
        return json.loads(error.body or "").get("message", error.reason)
    except (TypeError, ValueError):
        return str(error.reason)
