"""The trainer's side: push weights into SGLang servers that run the weightsync plugin.

It speaks only SGLang's own HTTP routes and sends with `weightsync.WeightSender` as rank 0; it
does not import SGLang.

    trainer = SGLangTrainer.connect(["http://127.0.0.1:30000"], master_address="127.0.0.1",
                                    master_port=29700, backend="cpu")
    trainer.push(model.named_parameters(), version="step-10")

One push is SGLang's update session: `/pause_generation` (mode `pause_mode`) →
`/begin_weight_update` → `/update_weights_from_distributed` on every server while the sender
sends (SGLang records `version` with the update, so each request's `meta_info.weight_versions`
says which tokens came from which weights) → `/end_weight_update` → `/continue_generation`. A
failed round raises `SGLangUpdateError` with each server's answer, which says whether its
weights are intact; the session is ended and generation continued either way.

`pause_mode` (SGLang's): `retract` (the default) takes the running requests back to the queue and
frees their KV cache, so they recompute it on the new weights; `abort` ends them; `in_place`
freezes them with their KV cache (computed with the old weights) and continues them on the new
weights — SGLang cannot flush its cache while they hold it, so the round does not ask it to: call
`flush_cache()` once they are done, or later prompts that share a cached prefix reuse KV cache of
the old weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError as FutureTimeout
from typing import Any, Literal, get_args

import httpx
import torch

from weightsync.errors import ProtocolError, WeightSyncError
from weightsync.protocol import InitInfo
from weightsync.source import WeightSource
from weightsync.trainer import WeightSender
from weightsync.transports import RoundStats

from weightsync_sglang.wire import init_body

SGLangPauseMode = Literal["retract", "abort", "in_place"]
DEFAULT_PAUSE_MODE: SGLangPauseMode = "retract"
_SGLANG_WRAPPER = "Failed to receive weights: "  # SGLang's scheduler around the worker's reason


class SGLangUpdateError(WeightSyncError):
    """A round did not land in every SGLang server; `answers` holds each server's error text."""

    def __init__(self, message: str, answers: list[str]):
        super().__init__(message)
        self.answers = answers


class SGLangEndpoint:
    """One SGLang server's routes, as SGLang defines them."""

    def __init__(self, url: str, timeout: float = 600.0, api_key: str | None = None):
        """`api_key`: SGLang's `--admin-api-key` (or, where only `--api-key` is set, that key),
        which its weight-update, pause and version routes require once configured."""
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers,
                                 limits=httpx.Limits(max_keepalive_connections=0))

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One route; an HTTP error or SGLang's `success: false` raises with SGLang's message."""
        response = self.http.request(method, path, **kwargs)
        answer: Any = response.json() if response.content and _is_json(response) else {}
        if response.status_code >= 400 or (isinstance(answer, dict) and answer.get("success") is False):
            reason = answer.get("message", response.text) if isinstance(answer, dict) else response.text
            reason = str(reason).removeprefix(_SGLANG_WRAPPER)
            raise SGLangUpdateError(f"{self.url}{path}: HTTP {response.status_code}: {reason}", [str(reason)])
        return answer if isinstance(answer, dict) else {}

    def world_size(self) -> int:
        """The server's tensor-parallel workers (each a receiver); SGLang's distributed update
        takes no data-parallel replicas."""
        info = self.call("GET", "/server_info")
        if int(info.get("dp_size", 1)) != 1:
            raise SGLangUpdateError(f"{self.url}: SGLang's distributed update takes no data-parallel replicas "
                                    f"(dp_size {info['dp_size']})", [])
        return int(info["tp_size"])

    def init(self, init: InitInfo, rank_offset: int) -> None:
        self.call("POST", "/init_weights_update_group", json=init_body(init, rank_offset))

    def pause(self, mode: SGLangPauseMode = DEFAULT_PAUSE_MODE) -> None:
        self.call("POST", "/pause_generation", json={"mode": mode})

    def resume(self) -> None:
        self.call("POST", "/continue_generation", json={})

    def begin(self) -> None:
        self.call("POST", "/begin_weight_update", json={})

    def end(self) -> None:
        self.call("POST", "/end_weight_update", json={})

    def update(self, group_name: str, version: str | None, flush_cache: bool) -> None:
        """One weightsync round: empty names/dtypes/shapes take the trainer's manifest."""
        self.call("POST", "/update_weights_from_distributed",
                  json={"names": [], "dtypes": [], "shapes": [], "group_name": group_name,
                        "weight_version": version, "flush_cache": flush_cache})

    def flush_cache(self, timeout_s: float = 60.0) -> None:
        """Drop SGLang's prefix (radix) cache once no request is in flight: SGLang's
        `/flush_cache` refuses while any runs, so it is asked to wait up to `timeout_s`."""
        response = self.http.post("/flush_cache", params={"timeout": timeout_s})
        if response.status_code >= 400:
            raise SGLangUpdateError(f"{self.url}/flush_cache: HTTP {response.status_code}: {response.text}",
                                    [response.text])

    def set_version(self, version: str) -> None:
        """Label the served weights without an update (SGLang's `/update_weight_version`),
        leaving the requests in flight alone."""
        self.call("POST", "/update_weight_version", json={"new_version": version, "abort_all_requests": False})

    def weight_version(self) -> str:
        return str(self.call("GET", "/model_info")["weight_version"])

    def close(self) -> None:
        self.http.close()


def _is_json(response: httpx.Response) -> bool:
    return "json" in response.headers.get("content-type", "")


class SGLangTrainer:
    """Rank 0 of a weightsync group whose receivers are the workers of one or more SGLang servers."""

    def __init__(self, sender: WeightSender, endpoints: list[SGLangEndpoint], init: InitInfo):
        self.sender = sender
        self.endpoints = endpoints
        self.init = init

    @classmethod
    def connect(cls, urls: Iterable[str], *, master_address: str, master_port: int,
                backend: str = "cpu", device: torch.device | str | None = None, api_key: str | None = None,
                **fields: Any) -> SGLangTrainer:
        """Size the group from each server's tensor-parallel size, give each server its rank
        offset, and join: the servers' inits run while the sender hosts the rendezvous.
        `api_key`: the servers' admin key (`SGLangEndpoint`). `fields` are further `InitInfo`
        fields (timeout_seconds, packed_*, atomic...)."""
        endpoints = [SGLangEndpoint(url, api_key=api_key) for url in urls]
        sizes = [endpoint.world_size() for endpoint in endpoints]
        init = InitInfo(backend=backend, master_address=master_address, master_port=master_port,
                        world_size=1 + sum(sizes), **fields)
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        with ThreadPoolExecutor(max_workers=len(endpoints)) as pool:
            futures = [pool.submit(endpoint.init, init, offset)
                       for endpoint, offset in zip(endpoints, offsets, strict=True)]
            try:
                sender = WeightSender.init(init, device=device)
            except BaseException as error:
                answers = _answers(futures, init.init_timeout_seconds)
                raise SGLangUpdateError(f"joining the SGLang servers failed: {error}; servers: {answers}",
                                        answers) from error
            for future in futures:
                future.result(timeout=init.init_timeout_seconds + 30)
        return cls(sender, endpoints, init)

    def push(self, weights: WeightSource | Iterable[tuple[str, torch.Tensor]], version: str | None = None,
             pause_mode: SGLangPauseMode = DEFAULT_PAUSE_MODE) -> RoundStats:
        """Send one update into every server; see the module docstring for the steps."""
        if pause_mode not in get_args(SGLangPauseMode):
            raise ProtocolError("pause_mode", f"{pause_mode!r} is not one of {', '.join(get_args(SGLangPauseMode))}")
        try:
            for step in (lambda endpoint: endpoint.pause(pause_mode), lambda endpoint: endpoint.begin()):
                failures = self._each(step)
                if failures:
                    raise failures[0]
            stats = self._round(weights, version, flush_cache=pause_mode != "in_place")
        except BaseException:
            self._close_session(quiet=True)  # the round's error is the one to report
            raise
        self._close_session(quiet=False)
        return stats

    def _close_session(self, quiet: bool) -> None:
        """End the update session and continue generation on every server, each step tried on
        each server even when one fails (a server must not stay paused or in a session). An end
        with no session open (a begin that failed) is refused by SGLang and harmless."""
        failures = self._each(lambda endpoint: endpoint.end()) + self._each(lambda endpoint: endpoint.resume())
        if failures and not quiet:
            raise SGLangUpdateError(f"the round landed but closing its session failed: {failures}",
                                    [str(f) for f in failures])

    def _round(self, weights: WeightSource | Iterable[tuple[str, torch.Tensor]], version: str | None,
               flush_cache: bool) -> RoundStats:
        """The servers' update calls, answered while the sender sends; every answer is awaited
        (bounded by timeout_seconds) before the round is judged."""
        with ThreadPoolExecutor(max_workers=len(self.endpoints)) as pool:
            futures = [pool.submit(endpoint.update, self.init.group_name, version, flush_cache)
                       for endpoint in self.endpoints]
            try:
                stats = self.sender.send_weights(weights)
            except BaseException as error:
                answers = _answers(futures, self.init.timeout_seconds)
                raise SGLangUpdateError(round_failure(error, answers), answers) from error
            answers = _answers(futures, self.init.timeout_seconds)
        if any(answers):
            raise SGLangUpdateError("the round was sent but a server failed: " + " | ".join(a for a in answers if a),
                                    answers)
        return stats

    def _each(self, step: Callable[[SGLangEndpoint], None]) -> list[Exception]:
        """Run `step` on every server, each tried even when one fails; the failures, in order."""
        failures: list[Exception] = []
        for endpoint in self.endpoints:
            try:
                step(endpoint)
            except Exception as error:  # noqa: BLE001 - returned to the caller, who decides
                failures.append(error)
        return failures

    def close(self) -> None:
        self.sender.close()
        for endpoint in self.endpoints:
            endpoint.close()


def round_failure(error: BaseException, answers: list[str]) -> str:
    """One message for a round that failed on the trainer's side: the servers' answers, and the
    trainer's error only where no answer already says it (a refused manifest is refused by every
    party with the same reason)."""
    said = [a for a in answers if a]
    if said and all("weightsync update" in a for a in said):  # the workers' account: reason and state
        return "SGLang did not take the round: " + " | ".join(said)
    return f"{error}; SGLang answered: " + (" | ".join(said) or "nothing (every update call succeeded)")


def _answers(futures: Iterable[Future[None]], timeout: float) -> list[str]:
    """Each server's error text ('' when it succeeded), waiting at most `timeout` (+ margin)."""
    answers = []
    for future in futures:
        try:
            future.result(timeout=timeout + 30)
            answers.append("")
        except FutureTimeout:
            answers.append(f"no answer within {timeout + 30:g}s")
        except Exception as error:  # noqa: BLE001 - SGLang's answer or the HTTP failure, reported
            answers.append(str(error))
    return answers
