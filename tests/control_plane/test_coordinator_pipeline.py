"""Each party moves through a round at its own pace; the barriers are only where the protocol needs
them. The parties are emulated at the HTTP level (httpx's MockTransport) so that one of them can
hold an answer until another party's call arrives: that only completes if the coordinator does
not wait for every party at that step (tests/control_plane/test_coordinator.py runs real daemons)."""

from __future__ import annotations

import asyncio
import json

import httpx

from weightsync_operator.client import Endpoint
from weightsync_operator.coordinator import Coordinator, SyncSpec, Timeouts

HOLD = 5.0  # seconds a held answer waits for the call it needs; the round fails if it never comes


def test_targets_go_from_pause_to_start_and_finish_to_resume_on_their_own_and_the_update_waits_for_all():
    """Target `d` (a daemon) and `v` (a vLLM server). v's pause is held until d's start arrived,
    and v's finish until d's resume arrived: both rounds complete only if d does not wait for v.
    Still no update is sent before every party's start answered, and v (one call at a time)
    gets its start only once its pause answered."""
    log: list[str] = []
    arrived: dict[str, asyncio.Event] = {}

    def seen(what: str) -> asyncio.Event:
        return arrived.setdefault(what, asyncio.Event())

    async def handler(request: httpx.Request) -> httpx.Response:
        party, path = request.url.host, request.url.path
        body = json.loads(request.content or b"{}")
        log.append(f"{party}{path}")
        seen(f"{party}{path}").set()
        if (party, path) == ("v", "/pause"):
            await asyncio.wait_for(seen("d/start_weight_update").wait(), HOLD)
        if (party, path) == ("v", "/finish_weight_update"):
            await asyncio.wait_for(seen("d/resume").wait(), HOLD)
        log.append(f"{party}{path} answered")
        if path == "/get_world_size":
            return httpx.Response(200, json={"world_size": 1})
        if path == "/update_weights":
            return httpx.Response(200, json={"bytes": 10, "checksum": "c0ffee"})
        if path == "/finish_weight_update":
            return httpx.Response(200, json={"weight_version": body.get("weight_version")})
        if path == "/weight_info":
            return httpx.Response(200, json={"weight_version": "7"})
        return httpx.Response(200, json={"message": "ok"})

    async def drive():
        spec = SyncSpec(pause_mode="keep", timeouts=Timeouts(request=HOLD * 2, start=HOLD * 2, finish=HOLD * 2))
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            coordinator = Coordinator(Endpoint("t", "http://t"), [Endpoint("d", "http://d"),
                                                                  Endpoint("v", "http://v", kind="vllm")], spec, http)
            await coordinator.init()
            log.clear()
            return await coordinator.sync(7)

    result = asyncio.run(drive())
    assert result.ok, result.reason
    assert [(p.name, p.ok, p.weight_version) for p in result.parties] == [("t", True, "7"), ("d", True, "7"),
                                                                          ("v", True, "7")]

    def at(entry: str) -> int:
        return log.index(entry)

    first_update = min(at(f"{p}/update_weights") for p in "tdv")
    assert all(at(f"{p}/start_weight_update answered") < first_update for p in "tdv")  # the one barrier
    assert at("d/start_weight_update") < at("v/pause answered")  # d did not wait for v's pause
    assert at("v/pause answered") < at("v/start_weight_update")  # vLLM: one call at a time
    assert at("d/resume") < at("v/finish_weight_update answered")  # d did not wait for v's finish
    assert at("v/finish_weight_update answered") < at("v/resume")
    assert log.count("d/resume") == 1 and log.count("v/resume") == 1  # each target resumed once


def test_a_target_whose_finish_failed_is_resumed_and_one_that_finished_keeps_its_version():
    """d finishes (and resumes) while v's finish fails: the round fails naming v at finish, d's
    weights stay on the version it finished, and every target is resumed exactly once."""
    log: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        party, path = request.url.host, request.url.path
        log.append(f"{party}{path}")
        if path == "/get_world_size":
            return httpx.Response(200, json={"world_size": 1})
        if path == "/update_weights":
            return httpx.Response(200, json={"bytes": 10, "checksum": "c0ffee"})
        if (party, path) == ("v", "/finish_weight_update"):
            return httpx.Response(500, json={"detail": "disk on fire"})
        if path == "/finish_weight_update":
            return httpx.Response(200, json={"weight_version": "8"})
        return httpx.Response(200, json={"message": "ok"})

    async def drive():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            coordinator = Coordinator(Endpoint("t", "http://t"), [Endpoint("d", "http://d"), Endpoint("v", "http://v")],
                                      SyncSpec(pause_mode="keep"), http)
            await coordinator.init()
            log.clear()
            return await coordinator.sync(8), coordinator.needs_init

    result, needs_init = asyncio.run(drive())
    assert not result.ok and "v: finish failed: HTTP 500: disk on fire" in result.reason
    assert {p.name: (p.ok, p.step) for p in result.parties} == {"t": (True, None), "d": (True, None),
                                                               "v": (False, "finish")}
    assert needs_init  # a failed finish: the next round forms the group afresh
    assert log.count("d/resume") == 1 and log.count("v/resume") == 1
    assert "v/abort_weight_update" in log  # the failed round is ended on the party that did not finish


def _combining_daemons(log: list[str], start_error: dict | None = None):
    """Parties t (trainer), d and e (daemons that take `pause` with their start and `resume`
    with their finish); e's resume fails; with `start_error`, d's start answers that error."""
    async def handler(request: httpx.Request) -> httpx.Response:
        party, path = request.url.host, request.url.path
        query = str(request.url.params)
        log.append(f"{party}{path}" + (f"?{query}" if query else ""))
        if path == "/get_world_size":
            return httpx.Response(200, json={"world_size": 1})
        if path == "/start_weight_update" and request.url.params.get("pause"):
            if party == "d" and start_error is not None:
                return httpx.Response(start_error["status"], json=start_error["body"])
            return httpx.Response(200, json={"message": "weight update started", "paused": True})
        if path == "/update_weights":
            return httpx.Response(200, json={"bytes": 10, "checksum": "c0ffee"})
        if path == "/finish_weight_update":
            answer = {"message": "weight update finished", "weight_version": "9"}
            if request.url.params.get("resume") == "true":
                answer.update(resumed=True) if party == "d" else answer.update(resumed=False,
                                                                               resume_error="scheduler gone")
            return httpx.Response(200, json=answer)
        return httpx.Response(200, json={"message": "ok"})
    return handler


def _drive(handler) -> tuple:
    async def drive():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            coordinator = Coordinator(Endpoint("t", "http://t"), [Endpoint("d", "http://d"), Endpoint("e", "http://e")],
                                      SyncSpec(pause_mode="keep"), http)
            await coordinator.init()
            return await coordinator.sync(9)
    return asyncio.run(drive())


def test_a_daemon_takes_its_pause_with_its_start_and_its_resume_with_its_finish():
    """One call each instead of two; a resume that failed inside the finish is recorded against
    that target without failing the round (its weights are live)."""
    log: list[str] = []
    result = _drive(_combining_daemons(log))
    round_calls = [entry for entry in log if "/get_world_size" not in entry
                   and "/init_weight_transfer_engine" not in entry]
    assert result.ok, result.reason
    for target in "de":
        assert f"{target}/start_weight_update?pause=keep" in round_calls
        assert f"{target}/finish_weight_update?resume=true" in round_calls
    assert "t/start_weight_update" in round_calls and "t/finish_weight_update" in round_calls  # the trainer: no pause
    # d and e took no separate pause; only the resume after init (a fresh group serves) is separate.
    assert [c for c in round_calls if c.startswith(("d/pause", "e/pause"))] == []
    assert [c for c in round_calls if c.startswith(("d/resume", "e/resume"))] == ["d/resume", "e/resume"]
    assert {p.name: (p.ok, p.step, p.reason) for p in result.parties} == {
        "t": (True, None, None), "d": (True, None, None), "e": (False, "resume", "scheduler gone")}
    assert [p.weight_version for p in result.parties] == ["9", "9", "9"]


def test_a_combined_start_that_fails_is_named_by_the_step_the_daemon_names():
    """The daemon's error names `pause` when its pause failed: the round fails at d's pause; an
    error that names no field is its start's."""
    for error, step in (({"status": 500, "body": {"detail": "pause failed: stuck", "field": "pause"}}, "pause"),
                        ({"status": 409, "body": {"detail": "busy", "field": None}}, "start")):
        log: list[str] = []
        result = _drive(_combining_daemons(log, start_error=error))
        assert not result.ok and f"d: {step} failed: HTTP {error['status']}" in result.reason, result.reason
        assert {p.name: (p.ok, p.step) for p in result.parties}["d"] == (False, step)
        assert log.count("d/resume") == 2 and log.count("e/resume") == 2  # after init, and once after the round
        assert "e/abort_weight_update" in " ".join(log)
