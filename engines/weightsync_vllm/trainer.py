"""The trainer's side: push weights into vLLM servers that run the weightsync backend.

It speaks only vLLM's own weight-transfer HTTP routes (server started with
`VLLM_SERVER_DEV_MODE=1` and `--weight-transfer-config '{"backend": "weightsync"}'`) and sends
with `weightsync.WeightSender` as rank 0. It does not import vLLM.

    trainer = VLLMTrainer.connect(["http://127.0.0.1:8000"], master_address="127.0.0.1",
                                  master_port=29700, backend="cpu")
    trainer.push(model.named_parameters(), version="step-10")

One push is vLLM's round: `/pause?mode=<pause_mode>` → `/start_weight_update` →
`/update_weights` on every server while the sender sends → `/finish_weight_update` (with the
version) → `/resume`. A failed round raises `VLLMUpdateError` carrying each server's answer,
which says whether its weights are intact; the servers are resumed either way.

`pause_mode` (see docs/vllm.md, "Pause modes", for what a client sees in each, measured):
`keep` (the default) freezes the generations in flight and continues them on the new weights
once resumed, so a push never waits on the longest rollout; `abort` ends them (finish reason
`abort`); `wait` lets them finish on the old weights first, so the push waits for the longest.
In `keep` the frozen requests' KV cache, computed with the old weights, is dropped before the
resume (`/reset_prefix_cache?reset_running_requests=true`: vLLM 0.33 ignores `/pause`'s
`clear_cache` in this mode), so they recompute it with the new ones.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, get_args

import httpx
import torch
from pydantic import ValidationError

from weightsync.dtypes import tensors_manifest
from weightsync.errors import ProtocolError, WeightSyncError
from weightsync.protocol import InitInfo, Manifest, PauseMode
from weightsync.source import WeightSource, adapt, is_source, manifest_of
from weightsync.trainer import WeightSender
from weightsync.transports import RoundStats


DEFAULT_PAUSE_MODE: PauseMode = "keep"


class VLLMUpdateError(WeightSyncError):
    """A round did not land in every vLLM server; `answers` holds each server's error text."""

    def __init__(self, message: str, answers: list[str]):
        super().__init__(message)
        self.answers = answers


class VLLMEndpoint:
    """One vLLM server's weight-transfer routes, as vLLM defines them."""

    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url.rstrip("/")
        # No kept-alive connections: vLLM's server closes one after an error answer, and a
        # later call (the resume after a failed round) must not trip over the closed socket.
        self.http = httpx.Client(base_url=self.url, timeout=timeout,
                                 limits=httpx.Limits(max_keepalive_connections=0))

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            reason = vllm_reason(response.text)
            raise VLLMUpdateError(f"{self.url}{path}: HTTP {response.status_code}: {reason}", [reason])
        answer: dict[str, Any] = response.json() if response.content else {}
        return answer

    def world_size(self) -> int:
        return int(self._call("GET", "/get_world_size", params={"include_dp": "true"})["world_size"])

    def init(self, init_info: dict[str, Any]) -> None:
        self._call("POST", "/init_weight_transfer_engine", json={"init_info": init_info})

    def pause(self, mode: PauseMode = DEFAULT_PAUSE_MODE) -> None:
        self._call("POST", "/pause", params={"mode": mode, "clear_cache": "true"})

    def resume(self) -> None:
        self._call("POST", "/resume")

    def start(self) -> None:
        self._call("POST", "/start_weight_update")

    def update(self, update_info: dict[str, Any]) -> None:
        self._call("POST", "/update_weights", json={"update_info": update_info})

    def finish(self, version: str | None = None) -> None:
        self._call("POST", "/finish_weight_update", json={"weight_version": version} if version else None)

    def reset_prefix_cache(self, running: bool = False) -> None:
        """Drop the prefix cache; with `running`, the KV cache of the requests in flight too (they
        are preempted and recompute it): vLLM answers 200 either way, with success false when
        blocks were still held."""
        answer = self._call("POST", "/reset_prefix_cache",
                            params={"reset_running_requests": "true"} if running else None)
        if answer.get("success") is False:
            raise VLLMUpdateError(f"{self.url}/reset_prefix_cache: vLLM could not drop its KV cache", [str(answer)])

    def weight_version(self) -> str:
        return str(self._call("GET", "/weight_info")["weight_version"])

    def close(self) -> None:
        self.http.close()


class VLLMTrainer:
    """Rank 0 of a weightsync group whose receivers are the workers of one or more vLLM servers."""

    def __init__(self, sender: WeightSender, endpoints: list[VLLMEndpoint], init: InitInfo):
        self.sender = sender
        self.endpoints = endpoints
        self.init = init

    @classmethod
    def connect(cls, urls: Iterable[str], *, master_address: str, master_port: int,
                backend: str = "cpu", device: torch.device | str | None = None, **fields: Any) -> VLLMTrainer:
        """Size the group from each server's `/get_world_size` (1 + every worker), give each
        server its rank offset, and join: the servers' inits run while the sender hosts the
        rendezvous. `fields` are further `InitInfo` fields (timeout_seconds, packed_*...)."""
        endpoints = [VLLMEndpoint(url) for url in urls]
        sizes = [endpoint.world_size() for endpoint in endpoints]
        init = InitInfo(backend=backend, master_address=master_address, master_port=master_port,
                        world_size=1 + sum(sizes), **fields)
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        with ThreadPoolExecutor(max_workers=len(endpoints)) as pool:
            futures = [pool.submit(endpoint.init, init.model_copy(update={"rank_offset": offset}).model_dump())
                       for endpoint, offset in zip(endpoints, offsets, strict=True)]
            try:
                sender = WeightSender.init(init, device=device)
            except BaseException as error:
                answers = _answers(futures, init.init_timeout_seconds)
                raise VLLMUpdateError(f"joining the vLLM servers failed: {error}; servers: {answers}",
                                      answers) from error
            for future in futures:
                future.result(timeout=init.init_timeout_seconds + 30)
        return cls(sender, endpoints, init)

    def push(self, weights: WeightSource | Iterable[tuple[str, torch.Tensor]], version: str | None = None,
             pause_mode: PauseMode = DEFAULT_PAUSE_MODE) -> RoundStats:
        """Send one update into every server; see the module docstring for the steps.

        `weights`: (name, tensor) pairs, or a source (`weightsync.source`, e.g.
        `ModuleSource(model, dtype=torch.bfloat16)` or `weightsync.hf.CheckpointSource`),
        which streams as `WeightSender.send_weights` does: one tensor materialized at a time.
        What the trainer can refuse alone (a name listed twice, the source's metadata) is
        refused before the first call to any server, which leaves the servers and the group as
        they were. `pause_mode`: what happens to the generations in flight (module docstring)."""
        if pause_mode not in get_args(PauseMode):
            raise ProtocolError("pause_mode", f"{pause_mode!r} is not one of {', '.join(get_args(PauseMode))}")
        if self.sender.sending.needs_trainer_update_info:
            # ipc/p2p receivers read the trainer's memory through handles its send returns; the
            # engine takes them in update_info, but this helper does not route them (untested).
            raise NotImplementedError(f"VLLMTrainer.push drives the collective transports (cpu, nccl), "
                                      f"not {self.init.backend}")
        checked = _checked(weights)
        started = False
        try:
            for endpoint in self.endpoints:
                endpoint.pause(pause_mode)
            started = True
            for endpoint in self.endpoints:
                endpoint.start()
            with ThreadPoolExecutor(max_workers=len(self.endpoints)) as pool:
                # An empty update_info takes the manifest from the trainer's round header.
                futures = [pool.submit(endpoint.update, {}) for endpoint in self.endpoints]
                try:
                    stats = self.sender.send_weights(checked)
                except BaseException as error:
                    answers = _answers(futures, self.init.timeout_seconds)
                    raise VLLMUpdateError(round_failure(error, answers), answers) from error
                answers = _answers(futures, self.init.timeout_seconds)
                if any(answers):
                    said = " | ".join(a for a in answers if a)
                    raise VLLMUpdateError(f"the round was sent but a server failed: {said}", answers)
            for endpoint in self.endpoints:
                endpoint.finish(version)
        except BaseException:
            if started:
                self.close_sessions()
            self._resume(pause_mode, quiet=True)  # the round's error is the one to report
            raise
        self._resume(pause_mode, quiet=False)
        return stats

    def close_sessions(self) -> None:
        """After a failed `/update_weights`: close the update session it left open on some of a
        server's workers (with tensor parallelism only the last worker reports a failure to
        vLLM, see `weightsync_vllm.engine`); that `/finish_weight_update` answers an error.
        Call it only then: a finish with no session open fails on every worker, which vLLM
        0.32's executor does not survive with tensor parallelism."""
        for endpoint in self.endpoints:
            try:
                endpoint.finish(None)
            except Exception:
                pass

    def _resume(self, pause_mode: PauseMode, quiet: bool) -> None:
        """Resume every server (each is tried even when one fails); after `keep`, first drop the
        frozen requests' KV cache, so that they continue on the new weights throughout."""
        failures = []
        for endpoint in self.endpoints:
            steps = [endpoint.resume]
            if pause_mode == "keep":
                steps.insert(0, functools.partial(endpoint.reset_prefix_cache, running=True))
            for step in steps:  # a failed reset still resumes: a server must not stay paused
                try:
                    step()
                except Exception as error:
                    failures.append(str(error))
        if failures and not quiet:
            raise VLLMUpdateError(f"the round landed but resuming failed: {failures}", failures)

    def close(self) -> None:
        self.sender.close()
        for endpoint in self.endpoints:
            endpoint.close()


@dataclass(frozen=True)
class _CheckedSource:
    """A source whose metadata `push` read and validated before calling any server; the round
    takes that manifest instead of reading the metadata again."""

    source: WeightSource
    manifest: Manifest

    def metadata(self) -> Manifest:
        return self.manifest

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.source)


def _checked(weights: WeightSource | Iterable[tuple[str, torch.Tensor]]
             ) -> _CheckedSource | list[tuple[str, torch.Tensor]]:
    """The round's weights with their manifest validated (ProtocolError naming the parameter):
    a source stays a source (it streams); pairs are resident already, so they are listed. A
    vLLM 0.33 source reads through its `iter_full()` (`weightsync.source.adapt`)."""
    weights = adapt(weights)
    if is_source(weights):
        return _CheckedSource(weights, _validated(lambda: manifest_of(weights)))
    named = list(weights)
    _validated(lambda: tensors_manifest(named))
    return named


def _validated(build: Callable[[], Manifest]) -> Manifest:
    try:
        return build()
    except ValidationError as error:
        message = error.errors()[0]["msg"]
        raise ProtocolError("weights", message.removeprefix("Value error, ")) from None


# How vLLM 0.32 and 0.33 wrap a worker's exception on its way to an HTTP answer: the engine core
# ("Call to update_weights method failed: ...") around the executor ("Worker failed with error
# '...', please check the stack trace above for the root cause"), in the JSON error body.
_WRAPPERS = (re.compile(r"^Call to \w+ method failed: (.*)$", re.S),
             re.compile(r"^Worker failed with error '(.*)', please check the stack trace above for the root cause\.?$",
                        re.S))


def vllm_reason(body: str) -> str:
    """The worker's own reason in a vLLM error answer, without vLLM's wrappers (the trainer gets
    it once, not inside ~1 KB of JSON and advice about a stack trace it cannot see)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.strip()[:2000]
    message = payload
    for key in ("error", "message", "detail"):  # {"error": {"message": ...}} or {"error": "..."}
        if isinstance(message, dict) and key in message:
            message = message[key]
    text: str = message if isinstance(message, str) else json.dumps(message)
    for wrapper in _WRAPPERS:
        unwrapped = wrapper.match(text.strip())
        text = unwrapped.group(1) if unwrapped else text
    return text.strip()[:2000]


def round_failure(error: BaseException, answers: list[str]) -> str:
    """One message for a round that failed on the trainer's side: the servers' answers, and the
    trainer's error only where no answer already says it (a refused manifest is refused on
    every party with the same reason)."""
    said = [a for a in answers if a]
    if said and all("weightsync update" in a for a in said):  # the workers' account: reason and state
        return "vLLM did not take the round: " + " | ".join(said)
    return f"{error}; vLLM answered: " + (" | ".join(said) or "nothing (every update call succeeded)")


def _answers(futures: Iterable[Future[None]], timeout: float) -> list[str]:
    """Each server's error text ('' when it succeeded), waiting at most `timeout` (+ margin)."""
    answers = []
    for future in futures:
        try:
            future.result(timeout=timeout + 30)
            answers.append("")
        except FutureTimeout:
            answers.append(f"no answer within {timeout + 30:g}s")
        except VLLMUpdateError as error:
            answers.append(str(error))
        except Exception as error:  # transport-level HTTP failures
            answers.append(f"{type(error).__name__}: {error}")
    return answers
