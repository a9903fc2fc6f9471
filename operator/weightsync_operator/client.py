"""A typed async HTTP client for one party's weight-transfer endpoints."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx


class PartyError(Exception):
    """A call to a party failed: it answered with an error, timed out, or could not be reached."""

    def __init__(self, party: str, step: str, reason: str, status: int | None = None):
        super().__init__(f"{party}: {step} failed: {reason}")
        self.party, self.step, self.reason, self.status = party, step, reason, status


@dataclass(frozen=True)
class Endpoint:
    """A party of a group: a name (pod name, or a local label) and its daemon's base URL."""

    name: str
    url: str


class PartyClient:
    def __init__(self, endpoint: Endpoint, http: httpx.AsyncClient, token: str | None = None):
        self.endpoint = endpoint
        self._http = http
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def name(self) -> str:
        return self.endpoint.name

    async def call(self, step: str, method: str, path: str, timeout: float,
                   body: dict | None = None, params: dict | None = None) -> dict[str, Any]:
        """One request with a hard deadline; any failure becomes a PartyError naming the party."""
        url = self.endpoint.url.rstrip("/") + path
        try:
            async with asyncio.timeout(timeout):
                response = await self._http.request(method, url, json=body, params=params,
                                                    headers=self._headers, timeout=timeout)
        except TimeoutError:
            raise PartyError(self.name, step, f"timed out after {timeout:g}s") from None
        except httpx.TimeoutException:
            raise PartyError(self.name, step, f"timed out after {timeout:g}s") from None
        except httpx.HTTPError as error:
            raise PartyError(self.name, step, f"unreachable: {error!r}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise PartyError(self.name, step, f"HTTP {response.status_code}: {detail}", response.status_code)
        return response.json()

    async def world_size(self, timeout: float) -> int:
        return int((await self.call("get_world_size", "GET", "/get_world_size", timeout))["world_size"])

    async def init(self, init_info: dict, timeout: float) -> dict:
        return await self.call("init", "POST", "/init_weight_transfer_engine", timeout, {"init_info": init_info})

    async def start(self, timeout: float) -> dict:
        return await self.call("start", "POST", "/start_weight_update", timeout, {})

    async def update(self, update_info: dict, timeout: float) -> dict:
        return await self.call("update", "POST", "/update_weights", timeout, {"update_info": update_info})

    async def finish(self, version: str, timeout: float) -> dict:
        return await self.call("finish", "POST", "/finish_weight_update", timeout, {"weight_version": version})

    async def abort(self, reason: str, timeout: float) -> dict:
        return await self.call("abort", "POST", "/abort_weight_update", timeout, params={"reason": reason[:500]})

    async def pause(self, mode: str, timeout: float) -> dict:
        return await self.call("pause", "POST", "/pause", timeout, params={"mode": mode})

    async def resume(self, timeout: float) -> dict:
        return await self.call("resume", "POST", "/resume", timeout)

    async def health(self, timeout: float) -> dict:
        return await self.call("health", "GET", "/healthz", timeout)

    async def checksum(self, timeout: float) -> dict:
        return await self.call("checksum", "POST", "/weight_checker", timeout, {"action": "checksum"})

    async def weight_version(self, timeout: float) -> str | None:
        return (await self.call("weight_info", "GET", "/weight_info", timeout)).get("weight_version")

    async def seed(self, init_info: dict, timeout: float) -> dict:
        """Have this receiver send its weights to late joiners, hosting a one-off group as rank 0."""
        return await self.call("seed", "POST", "/seed_weights", timeout, {"init_info": init_info})

    async def close(self, timeout: float) -> dict:
        """Leave the transfer group (teardown); the party keeps its weights."""
        return await self.call("close", "POST", "/close_weight_transfer_engine", timeout)
