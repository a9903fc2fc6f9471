"""What one operator process shares across WeightSyncs: the Kubernetes client that writes status,
the connection pool that talks to the parties (daemons, vLLM servers), their bearer token, and one
Reconciler each."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
import kopf

from weightsync_operator.client import party_session
from weightsync_operator.kube import AsyncStatusWriter, KubeApi
from weightsync_operator.reconciler import Reconciler


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

            def emit(type: str, reason: str, message: str) -> None:
                kopf.event(body, type=type, reason=reason, message=message[:1024])

            self._reconcilers[key] = Reconciler(namespace, name, self.http, write_status, emit, self.token,
                                                self.recheck_interval)
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
