"""A daemon takes its pause with its start (`/start_weight_update?pause=<mode>`) and its resume
with its finish (`/finish_weight_update?resume=true`): one call each instead of two, which the
coordinator uses for daemon targets (issue 16 item 6). Against a real daemon app served by
uvicorn in this process (so that its engine hooks can be made to fail), over real rounds on the
cpu transport:

- each combined call does both steps, in order, and says so in its answer (`paused`, `resumed`);
- a failed pause answers 500 naming the field `pause`, and the round was not started;
- a failed resume leaves the round finished (its weights live under the new version), and the
  answer says `resumed: false` with the reason;
- without the parameters the answers are exactly as before (vLLM's shape).
"""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from weightsync import WeightSender
from weightsync_daemon.server import serve_embedded
from weightsync_daemon.service import ReceiverService

pytestmark = pytest.mark.integration
NAMED = [("w", torch.arange(12, dtype=torch.float32).reshape(3, 4))]


class Hooks:
    """The engine's pause and resume hooks; each records its calls and fails while told to."""

    def __init__(self):
        self.calls: list[str] = []
        self.fail_pause = self.fail_resume = False

    def pause(self, mode: str) -> None:
        self.calls.append(f"pause {mode}")
        if self.fail_pause:
            raise RuntimeError("the engine would not drain")

    def resume(self) -> None:
        self.calls.append("resume")
        if self.fail_resume:
            raise RuntimeError("the scheduler is gone")


def test_a_daemon_pauses_with_its_start_and_resumes_with_its_finish(rendezvous_port):
    hooks = Hooks()
    service = ReceiverService(backend="cpu", on_pause=hooks.pause, on_resume=hooks.resume)
    server = serve_embedded(service, token="t0ken")
    base = {"master_address": "127.0.0.1", "master_port": rendezvous_port, "world_size": 2, "timeout_seconds": 20}
    http = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer t0ken"}, timeout=30)
    sender = None
    try:
        joined = {}
        joiner = threading.Thread(target=lambda: joined.update(r=http.post(
            "/init_weight_transfer_engine", json={"init_info": {**base, "rank_offset": 1}})))
        joiner.start()
        sender = WeightSender.init(base)
        joiner.join(30)
        assert joined["r"].status_code == 200, joined["r"].text

        def update(version: int) -> None:
            NAMED[0][1].add_(1)
            landed = {}
            receiver = threading.Thread(target=lambda: landed.update(r=http.post("/update_weights", json={})))
            receiver.start()
            sender.send_weights(NAMED)
            receiver.join(30)
            assert landed["r"].status_code == 200, landed["r"].text

        # Both steps in one call each, in the protocol's order.
        started = http.post("/start_weight_update", params={"pause": "keep"}, json={})
        assert started.status_code == 200 and started.json() == {"message": "weight update started", "paused": True}
        assert hooks.calls == ["pause keep"] and http.get("/is_paused").json() == {"is_paused": True}
        update(1)
        finished = http.post("/finish_weight_update", params={"resume": "true"}, json={"weight_version": 1})
        assert finished.json() == {"message": "weight update finished", "weight_version": "1", "resumed": True}
        assert hooks.calls == ["pause keep", "resume"] and http.get("/is_paused").json() == {"is_paused": False}

        # A pause that fails: 500 naming `pause`, and no round was started.
        hooks.fail_pause = True
        refused = http.post("/start_weight_update", params={"pause": "wait"}, json={})
        assert refused.status_code == 500
        assert refused.json()["field"] == "pause" and "the engine would not drain" in refused.json()["detail"]
        assert "not started" in refused.json()["detail"]
        assert http.get("/healthz").json()["phase"] == "ready"
        hooks.fail_pause = False
        assert http.post("/resume").status_code == 200

        # A resume that fails: the round is finished all the same, and the answer says why.
        hooks.fail_resume = True
        assert http.post("/start_weight_update", params={"pause": "abort"}, json={}).json()["paused"] is True
        update(2)
        finished = http.post("/finish_weight_update", params={"resume": "true"}, json={"weight_version": 2})
        assert finished.status_code == 200
        body = finished.json()
        assert body["weight_version"] == "2" and body["resumed"] is False
        assert "the scheduler is gone" in body["resume_error"]
        health = http.get("/healthz").json()
        assert (health["phase"], health["weight_version"], health["weights_intact"]) == ("ready", "2", True)
        hooks.fail_resume = False

        # Without the parameters: vLLM's answers, unchanged.
        assert http.post("/start_weight_update", json={}).json() == {"message": "weight update started"}
        update(3)
        assert http.post("/finish_weight_update", json={"weight_version": 3}).json() == {
            "message": "weight update finished", "weight_version": "3"}
        checksums = http.post("/weight_checker", json={"action": "checksum"}).json()
        assert checksums["weight_version"] == "3"

        # A bad mode is refused by name and starts nothing.
        bad = http.post("/start_weight_update", params={"pause": "sometimes"}, json={})
        assert bad.status_code == 422 and bad.json()["field"] == "query.pause"
        assert http.get("/healthz").json()["phase"] == "ready"
    finally:
        http.close()
        if sender is not None:
            sender.close()
        server.stop()
