"""Typed async HTTP clients for the parties of a group, one class per kind of engine.

A group's trainer is always a weightsync agent; a target is a weightsync daemon, a vLLM server
running the `weightsync` weight-transfer backend, or an SGLang server with the weightsync plugin
(`SglangClient`, SGLang's own routes mapped onto the same steps). Both speak vLLM's four-phase
weight-transfer routes (init → start → update → finish, `/get_world_size`, `/pause`,
`/resume`, `/weight_info`), so the coordinator drives them through one interface
(`PartyClient`). Where vLLM has no route for what a daemon offers, `VllmClient` degrades in a
defined way rather than pretending:

- abort: vLLM has none. Once vLLM was asked to start the round and did not finish it, its
  update session may be open (the round failed elsewhere; or its own start or update failed,
  which the weightsync backend reports from vLLM's last worker only, leaving the other workers'
  sessions open). The coordinator closes it with one `/finish_weight_update`: labelled with the
  round's version if this server's whole update was received and verified (its weights then are
  exactly that version), else unlabelled (vLLM's layerwise reload puts back the previous tensors
  of every layer that received nothing, and the label stays the previous version's). Where the
  session is already closed vLLM refuses that finish, harmlessly. It never sends that finish
  otherwise (before the start, or after a finish that succeeded): a call vLLM 0.32 refuses on
  every worker of a tensor-parallel server leaves its executor answering each later call with
  the previous call's reply.
- health: `/health` says whether the engine is alive and `/weight_info` its version; vLLM
  cannot say whether it still holds its place in the transfer group or whether a failed round
  left its weights partly updated (`in_group` and `weights_intact` are None: unknown). A
  restarted server shows up as a failed round, after which the group is re-initialised.
- seed: vLLM cannot send its weights to peers, so it is never the source of a catch-up; a late
  vLLM joiner receives a catch-up from a daemon that holds the version, or else the trainer's
  next round, which includes it.
- close: vLLM's `/shutdown_weight_transfer_engine` (refused by vLLM during an open update).
- pause: vLLM's modes (`abort`, `wait`, `keep`), always with `clear_cache=true` so that no KV
  block computed with the old weights is reused after the update; a vLLM target cannot run a
  round unpaused (its layerwise reload empties the layers being loaded), which the coordinator
  refuses up front.
"""

from __future__ import annotations

import asyncio
import enum
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import aiohttp
import httpx

from weightsync.protocol import InitInfo, PauseMode

EngineKind = Literal["daemon", "vllm", "sglang"]

# The connection pool party calls go through. aiohttp (already the operator's, through kopf) is
# the one a round uses: a call costs the coordinator's event loop about a fifth of httpx's CPU
# time, and a round makes about ten on a loop that also runs the operator (benchmarks/
# operator_overhead.py). An httpx client is accepted too (callers' own clients, mock transports).
PartyHttp = aiohttp.ClientSession | httpx.AsyncClient


def _body(init_info: InitInfo) -> dict[str, Any]:
    """An init body as JSON: the fields the caller set (the rest are each party's defaults)."""
    return init_info.model_dump(mode="json", exclude_unset=True)


def _combined(party: "PartyClient", step: str, asked: bool) -> None:
    """Refuse a combined step (pause with start, resume with finish) from a party that takes
    each in a call of its own: a caller bug, not the party's failure."""
    if asked and not party.combines_steps:
        raise TypeError(f"{party.name}: a {party.kind} party takes no pause or resume with its {step}")


def party_session() -> aiohttp.ClientSession:
    """A pool of keep-alive connections to parties, for the running event loop; close it after use."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))  # no cap: one per party


class PartyError(Exception):
    """A call to a party failed: it answered with an error, timed out, or could not be reached."""

    def __init__(self, party: str, step: str, reason: str, status: int | None = None, field: str | None = None):
        super().__init__(f"{party}: {step} failed: {reason}")
        self.party, self.step, self.reason, self.status = party, step, reason, status
        self.field = field  # what the party's error answer names as at fault (a daemon's `field`)


@dataclass(frozen=True)
class Endpoint:
    """A party of a group: a name (pod name, or a local label), its base URL, and what serves
    there (a weightsync daemon or agent, or a vLLM server with the weightsync backend)."""

    name: str
    url: str
    kind: EngineKind = "daemon"


class Progress(enum.Enum):
    """How far one party got in a round that failed: what ending it has to undo."""

    NOT_STARTED = "not_started"  # the round ended before this party was asked to start
    STARTED = "started"  # asked to start: an update session may be open on it
    LANDED = "landed"  # its whole update was received and verified, not yet finished
    FINISHED = "finished"  # its finish succeeded: nothing of the round is left open on it


@dataclass(frozen=True)
class PartyHealth:
    """What a party says about itself; None where its kind of engine cannot say."""

    weight_version: str | None
    in_group: bool | None  # still initialised in a transfer group (False: restarted or left)
    weights_intact: bool | None  # False: a failed round left part of itself in the weights
    detail: str = ""  # the engine's own word for its state, for messages


def _error_detail(content: bytes) -> tuple[str, str | None]:
    """The message of an error answer: FastAPI's `detail`, vLLM's `error` (a string, or an
    object with a `message`), else the raw text; and the field at fault, where a daemon names one."""
    text = content.decode(errors="replace")
    try:
        body = json.loads(content)
    except ValueError:
        return text, None
    if not isinstance(body, dict):
        return text, None
    if "detail" in body:
        field = body.get("field")
        return str(body["detail"]), field if isinstance(field, str) else None
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message", error)), None
    if error is None and "message" in body:  # SGLang's {"success": false, "message": ...}
        return str(body["message"]), None
    return (str(error) if error is not None else text), None


class PartyClient(ABC):
    """One party's weight-transfer routes, with a hard deadline on every call."""

    kind: ClassVar[EngineKind]
    can_seed: ClassVar[bool]  # can host a one-off group that sends its weights to late joiners
    # Takes its pause with its start, and its resume with its finish, in one call each
    # (`start(timeout, pause=mode)`, `finish(version, timeout, resume=True)`); otherwise each is
    # its own call, one at a time.
    combines_steps: ClassVar[bool] = False

    def __init__(self, endpoint: Endpoint, http: PartyHttp, token: str | None = None):
        self.endpoint = endpoint
        self._http = http
        self._base = endpoint.url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def name(self) -> str:
        return self.endpoint.name

    async def call(self, step: str, method: str, path: str, timeout: float,
                   body: dict | None = None, params: dict | None = None) -> dict[str, Any]:
        """One request with a hard deadline; any failure becomes a PartyError naming the party."""
        url = self._base + path
        try:
            async with asyncio.timeout(timeout):
                if isinstance(self._http, aiohttp.ClientSession):
                    async with self._http.request(method, url, json=body, params=params, headers=self._headers,
                                                  timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                        status, content = response.status, await response.read()
                else:
                    reply = await self._http.request(method, url, json=body, params=params,
                                                     headers=self._headers, timeout=timeout)
                    status, content = reply.status_code, reply.content
        except (TimeoutError, httpx.TimeoutException):
            raise PartyError(self.name, step, f"timed out after {timeout:g}s") from None
        except (httpx.HTTPError, aiohttp.ClientError) as error:
            raise PartyError(self.name, step, f"unreachable: {error!r}") from None
        if status >= 400:
            detail, field = _error_detail(content)
            raise PartyError(self.name, step, f"HTTP {status}: {detail}", status, field)
        if not content:
            return {}
        try:
            answer = json.loads(content)
        except ValueError:
            raise PartyError(self.name, step, f"answered something that is not JSON: "
                                              f"{content[:200].decode(errors='replace')!r}") from None
        return answer if isinstance(answer, dict) else {"answer": answer}

    # -- the routes both kinds share (vLLM's weight-transfer API) -----------------------------
    async def world_size(self, timeout: float) -> int:
        """How many ranks this party takes in the group (a vLLM server: one per TP/PP/DP worker)."""
        answer = await self.call("get_world_size", "GET", "/get_world_size", timeout)
        try:
            size = int(answer["world_size"])
        except (KeyError, TypeError, ValueError):
            raise PartyError(self.name, "get_world_size", f"answered no world_size: {answer}") from None
        if size < 1:
            raise PartyError(self.name, "get_world_size", f"answered world_size {size}")
        return size

    async def init(self, init_info: InitInfo, timeout: float) -> dict:
        return await self.call("init", "POST", "/init_weight_transfer_engine", timeout, {"init_info": _body(init_info)})

    async def start(self, timeout: float, pause: PauseMode | None = None) -> dict:
        """Start the round. `pause`: pause the engine first, in the same call (only a party that
        `combines_steps`; the others take their pause in a call of its own)."""
        _combined(self, "start", pause is not None)
        return await self.call("start", "POST", "/start_weight_update", timeout, {})

    async def update(self, update_info: dict, timeout: float) -> dict:
        return await self.call("update", "POST", "/update_weights", timeout, {"update_info": update_info})

    async def resume(self, timeout: float) -> dict:
        return await self.call("resume", "POST", "/resume", timeout)

    async def is_paused(self, timeout: float) -> bool:
        return bool((await self.call("is_paused", "GET", "/is_paused", timeout)).get("is_paused"))

    async def weight_version(self, timeout: float) -> str | None:
        version = (await self.call("weight_info", "GET", "/weight_info", timeout)).get("weight_version")
        return None if version is None else str(version)

    # -- where the kinds differ ---------------------------------------------------------------
    @abstractmethod
    async def finish(self, version: str, timeout: float, resume: bool = False) -> dict:
        """Make the received weights live as `version`; the answer carries `weight_version`.
        `resume`: resume the engine too, in the same call (only a party that `combines_steps`)."""

    @abstractmethod
    async def abort(self, reason: str, timeout: float, progress: Progress, version: str) -> dict:
        """End a failed round (labelled `version`) on this party, which got as far as
        `progress`. An answer with `weight_version` says what the party serves afterwards."""

    @abstractmethod
    async def pause(self, mode: PauseMode, timeout: float) -> dict: ...

    @abstractmethod
    async def health(self, timeout: float) -> PartyHealth: ...

    @abstractmethod
    async def close(self, timeout: float) -> dict:
        """Leave the transfer group (teardown); the party keeps its weights and keeps serving."""

    async def seed(self, init_info: InitInfo, timeout: float) -> dict:
        """Have this receiver send its weights to late joiners, hosting a one-off group as rank 0."""
        raise PartyError(self.name, "seed", f"a {self.kind} target cannot send its weights to peers")


class DaemonClient(PartyClient):
    """A weightsync daemon or trainer agent: vLLM's routes plus abort, seed, close and /healthz."""

    kind = "daemon"
    can_seed = True
    combines_steps = True  # its routes' `pause` and `resume` parameters (weightsync's extension)

    async def start(self, timeout: float, pause: PauseMode | None = None) -> dict:
        """Start the round; with `pause`, pause the engine first in the same call. The answer
        says `paused: true` when it did (a daemon without that parameter ignores it: the caller
        then pauses it with its own call). A failure of the pause, or no answer at all, is the
        pause's failure (the first step of the call that is not confirmed)."""
        if pause is None:
            return await self.call("start", "POST", "/start_weight_update", timeout, {})
        try:
            return await self.call("start", "POST", "/start_weight_update", timeout, {}, params={"pause": pause})
        except PartyError as error:
            if error.status is None or error.field == "pause":
                raise PartyError(self.name, "pause", error.reason, error.status, error.field) from None
            raise

    async def finish(self, version: str, timeout: float, resume: bool = False) -> dict:
        """Make the round live as `version`; with `resume`, resume the engine in the same call.
        The answer then has `resumed` (false: `resume_error` says why; the round is finished
        either way); without it, the daemon did not know the parameter."""
        params = {"resume": "true"} if resume else None
        return await self.call("finish", "POST", "/finish_weight_update", timeout, {"weight_version": version},
                               params=params)

    async def abort(self, reason: str, timeout: float, progress: Progress, version: str) -> dict:
        # An idempotent route; the daemon knows itself whether its update landed (and then
        # reports weights_intact).
        return await self.call("abort", "POST", "/abort_weight_update", timeout, params={"reason": reason[:500]})

    async def pause(self, mode: PauseMode, timeout: float) -> dict:
        return await self.call("pause", "POST", "/pause", timeout, params={"mode": mode})

    async def health(self, timeout: float) -> PartyHealth:
        answer = await self.call("health", "GET", "/healthz", timeout)
        phase = answer.get("phase")
        return PartyHealth(weight_version=answer.get("weight_version"), in_group=phase == "ready",
                           weights_intact=bool(answer.get("weights_intact", True)), detail=str(phase))

    async def close(self, timeout: float) -> dict:
        return await self.call("close", "POST", "/close_weight_transfer_engine", timeout)

    async def seed(self, init_info: InitInfo, timeout: float) -> dict:
        return await self.call("seed", "POST", "/seed_weights", timeout, {"init_info": _body(init_info)})

    async def checksum(self, timeout: float) -> dict:
        return await self.call("checksum", "POST", "/weight_checker", timeout, {"action": "checksum"})


class VllmClient(PartyClient):
    """A vLLM server (0.32 or 0.33, `VLLM_SERVER_DEV_MODE=1`) with the weightsync weight-transfer
    backend; see the module docstring for what it lacks and how that degrades.

    After a `keep` pause the frozen requests' KV cache, computed with the old weights, is dropped
    before the resume (`/reset_prefix_cache?reset_running_requests=true`), so they continue on the
    new weights throughout: vLLM 0.32 drops it at the pause already, 0.33 ignores `/pause`'s
    `clear_cache` in that mode."""

    kind = "vllm"
    can_seed = False
    # combines_steps stays False: one call at a time, since vLLM's executor serialises its
    # workers' RPCs.

    def __init__(self, endpoint: Endpoint, http: PartyHttp, token: str | None = None):
        super().__init__(endpoint, http, token)
        # vLLM answers a failed weight-transfer call (an exception in its worker) with a 500 and
        # then drops the connection: a kept-alive connection would fail the next call with a
        # ReadError. One connection per call (a handful per round) avoids reusing a dead one.
        self._headers["Connection"] = "close"
        self._paused_mode: str | None = None

    async def finish(self, version: str, timeout: float, resume: bool = False) -> dict:
        _combined(self, "finish", resume)
        # vLLM answers only {"message"}; the version it now serves comes from /weight_info.
        await self.call("finish", "POST", "/finish_weight_update", timeout, {"weight_version": version})
        return {"weight_version": await self.weight_version(timeout)}

    async def abort(self, reason: str, timeout: float, progress: Progress, version: str) -> dict:
        # No abort route: close a session the failed round may have left open (module docstring).
        if progress in (Progress.STARTED, Progress.LANDED):
            label = version if progress is Progress.LANDED else None
            try:
                await self.call("abort", "POST", "/finish_weight_update", timeout, {"weight_version": label})
            except PartyError as error:
                if error.status is None:  # unreachable or timed out: nothing more to learn from it
                    raise
                # Refused where vLLM already ended the session itself (its update failed).
        return {"weight_version": await self.weight_version(timeout)}

    async def pause(self, mode: PauseMode, timeout: float) -> dict:
        self._paused_mode = mode
        return await self.call("pause", "POST", "/pause", timeout, params={"mode": mode, "clear_cache": "true"})

    async def resume(self, timeout: float) -> dict:
        kept, self._paused_mode = self._paused_mode == "keep", None
        dropped: PartyError | None = None
        if kept:
            try:
                await self.call("resume", "POST", "/reset_prefix_cache", timeout,
                                params={"reset_running_requests": "true"})
            except PartyError as error:  # resume anyway: a server must not stay paused
                dropped = error
        answer = await super().resume(timeout)
        if dropped is not None:
            raise dropped
        return answer

    async def health(self, timeout: float) -> PartyHealth:
        await self.call("health", "GET", "/health", timeout)  # 200 alive; 503 the engine died
        return PartyHealth(weight_version=await self.weight_version(timeout), in_group=None,
                           weights_intact=None, detail="serving")

    async def close(self, timeout: float) -> dict:
        return await self.call("close", "POST", "/shutdown_weight_transfer_engine", timeout)


# weightsync's pause modes as SGLang's. `keep` (requests continue on the new weights, their KV
# cache of the old ones dropped and recomputed, as the vLLM client does it) is SGLang's retract;
# SGLang's in_place keeps that stale cache, and cannot flush it while they run. `wait` (finish on
# the old weights first) has no SGLang mode: retract too, the closest that serves nothing stale.
SGLANG_PAUSE_MODES: dict[str, str] = {"abort": "abort", "keep": "retract", "wait": "retract"}


class SglangClient(PartyClient):
    """An SGLang server (0.5.23) with the weightsync plugin (weightsync_sglang): SGLang's own
    routes, a weightsync group selected by the init body (weightsync_sglang.wire). SGLang names
    the round's session begin/end, its pause and resume pause_generation/continue_generation.

    - abort: `/end_weight_update` closes the session the round opened (SGLang refuses it where
      none is open, harmlessly); the plugin loads nothing of a refused round and says in its
      answer whether the weights are intact.
    - health: `/health`, and `/model_info`'s version; `in_group` and `weights_intact` unknown
      (None), as for vLLM (the worker's metrics say `weightsync_weights_intact`).
    - seed: never (SGLang cannot send its weights to peers).
    - pause: weightsync's modes as SGLang's (SGLANG_PAUSE_MODES); every round flushes SGLang's
      prefix cache, so no KV computed with the old weights is reused.
    """

    kind = "sglang"
    can_seed = False

    def __init__(self, endpoint: Endpoint, http: PartyHttp, token: str | None = None):
        super().__init__(endpoint, http, token)
        self._group = "weightsync"

    async def world_size(self, timeout: float) -> int:
        """The server's tensor-parallel workers (SGLang's distributed update takes no data-parallel
        replicas)."""
        answer = await self.call("get_world_size", "GET", "/server_info", timeout)
        try:
            size, replicas = int(answer["tp_size"]), int(answer.get("dp_size") or 1)
        except (KeyError, TypeError, ValueError):
            raise PartyError(self.name, "get_world_size", f"answered no tp_size: {str(answer)[:200]}") from None
        if replicas != 1 or size < 1:
            raise PartyError(self.name, "get_world_size", f"tp_size {size}, dp_size {replicas}: SGLang's distributed "
                                                          "update takes tp_size >= 1 and no data-parallel replicas")
        return size

    async def init(self, init_info: InitInfo, timeout: float) -> dict:
        from weightsync_sglang.wire import init_body  # torch-free: SGLang's body for weightsync's InitInfo

        self._group = init_info.group_name
        return await self.call("init", "POST", "/init_weights_update_group", timeout,
                               init_body(init_info, init_info.rank_offset))

    async def start(self, timeout: float, pause: PauseMode | None = None) -> dict:
        _combined(self, "start", pause is not None)
        return await self.call("start", "POST", "/begin_weight_update", timeout, {})

    async def update(self, update_info: dict, timeout: float) -> dict:
        body = {"names": update_info.get("names", []), "dtypes": update_info.get("dtype_names", []),
                "shapes": update_info.get("shapes", []), "group_name": self._group, "flush_cache": True}
        return await self.call("update", "POST", "/update_weights_from_distributed", timeout, body)

    async def finish(self, version: str, timeout: float, resume: bool = False) -> dict:
        _combined(self, "finish", resume)
        await self.call("finish", "POST", "/end_weight_update", timeout, {})
        await self.call("finish", "POST", "/update_weight_version", timeout,
                        {"new_version": version, "abort_all_requests": False})
        return {"weight_version": await self.weight_version(timeout)}

    async def abort(self, reason: str, timeout: float, progress: Progress, version: str) -> dict:
        if progress in (Progress.STARTED, Progress.LANDED):
            try:
                await self.call("abort", "POST", "/end_weight_update", timeout, {})
            except PartyError as error:
                if error.status is None:  # unreachable or timed out: nothing more to learn from it
                    raise
        return {"weight_version": await self.weight_version(timeout)}

    async def pause(self, mode: PauseMode, timeout: float) -> dict:
        return await self.call("pause", "POST", "/pause_generation", timeout, {"mode": SGLANG_PAUSE_MODES[mode]})

    async def resume(self, timeout: float) -> dict:
        return await self.call("resume", "POST", "/continue_generation", timeout, {})

    async def is_paused(self, timeout: float) -> bool:
        raise PartyError(self.name, "is_paused", "SGLang 0.5.23 has no route that says whether it is paused")

    async def weight_version(self, timeout: float) -> str | None:
        version = (await self.call("weight_info", "GET", "/model_info", timeout)).get("weight_version")
        return None if version is None else str(version)

    async def health(self, timeout: float) -> PartyHealth:
        await self.call("health", "GET", "/health", timeout)
        return PartyHealth(weight_version=await self.weight_version(timeout), in_group=None,
                           weights_intact=None, detail="serving")

    async def close(self, timeout: float) -> dict:
        return await self.call("close", "POST", "/destroy_weights_update_group", timeout, {"group_name": self._group})


_CLIENTS: dict[str, type[PartyClient]] = {"daemon": DaemonClient, "vllm": VllmClient, "sglang": SglangClient}


def party_client(endpoint: Endpoint, http: PartyHttp, token: str | None = None) -> PartyClient:
    """The client for what serves at `endpoint`."""
    try:
        cls = _CLIENTS[endpoint.kind]
    except KeyError:
        raise ValueError(f"{endpoint.name}: unknown engine kind {endpoint.kind!r} "
                         f"(expected one of {', '.join(_CLIENTS)})") from None
    return cls(endpoint, http, token)
