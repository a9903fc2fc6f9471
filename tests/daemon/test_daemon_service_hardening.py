"""The daemon as a service under concurrent clients and hostile input, with real processes: a
daemon process (`python -m weightsync_daemon`) and a gloo trainer in this process (issue 13,
items 2-7). Each test names the item it covers."""

import asyncio
import json
import socket
import time

import httpx
import jsonschema
import pytest
import torch

from weightsync.store import named_checksum
from weightsync_operator.local import free_port

from helpers.daemon_rounds import (
    AUTH, TOKEN, full_round, init_info, joined, manifest, refused_round, round_held_midway, state,
    weights,
)

pytestmark = pytest.mark.faults


# -- item 2: no request waits without bound, none runs after its client left -------------------
async def test_200_concurrent_updates_mid_round_get_409_and_the_round_completes(spawn):
    daemon = await spawn("daemon")
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        sender = await joined(http, [daemon], 2)
        await full_round(http, [daemon], sender, weights(1), 1)

        held, update, sending = await round_held_midway(http, daemon, sender)

        async def duplicate(i: int):
            began = time.monotonic()
            body = {} if i % 2 else {"update_info": manifest(weights(2))}
            answer = await http.post(daemon.url + "/update_weights", json=body)
            return answer, time.monotonic() - began

        duplicates = await asyncio.gather(*(duplicate(i) for i in range(200)))
        statuses = sorted({answer.status_code for answer, _ in duplicates})
        assert statuses == [409], (statuses, [a.text for a, _ in duplicates][:3])
        assert all("update of round" in a.json()["detail"] and "in progress" in a.json()["detail"]
                   for a, _ in duplicates), duplicates[0][0].text
        assert max(seconds for _, seconds in duplicates) < 5  # answered at once, not queued
        assert not sending.done()  # all of it while the round was in flight
        held.release()
        await sending
        first = await update
        assert first.status_code == 200, first.text
        done = await http.post(daemon.url + "/finish_weight_update", json={"weight_version": 2})
        assert done.status_code == 200, done.text
        checksum, health = await state(http, daemon)
        assert checksum == named_checksum(weights(2))  # bit-exact: SHA-256 of every parameter
        assert health["weights_intact"] and health["weight_version"] == "2" and health["phase"] == "ready"

        await full_round(http, [daemon], sender, weights(3), 3)  # the group still works
        assert (await state(http, daemon))[0] == named_checksum(weights(3))
        sender.close()


async def test_a_close_whose_client_gave_up_does_not_run(spawn, http):
    daemon = await spawn("daemon")
    sender = await joined(http, [daemon], 2)
    await full_round(http, [daemon], sender, weights(1), 1)

    held, update, sending = await round_held_midway(http, daemon, sender)
    with pytest.raises(httpx.ReadTimeout):  # close waits for the update in flight; its client does not
        await http.post(daemon.url + "/close_weight_transfer_engine", timeout=0.5)
    assert not sending.done()
    held.release()
    await sending
    assert (await update).status_code == 200
    assert (await http.post(daemon.url + "/finish_weight_update", json={"weight_version": 2})).status_code == 200
    checksum, health = await state(http, daemon)
    assert health["phase"] == "ready" and checksum == named_checksum(weights(2))  # the group was not torn down
    await full_round(http, [daemon], sender, weights(3), 3)
    sender.close()


async def test_abort_during_an_update_in_flight_answers_at_once(spawn, http):
    daemon = await spawn("daemon")
    sender = await joined(http, [daemon], 2)
    await full_round(http, [daemon], sender, weights(1), 1)
    held, update, sending = await round_held_midway(http, daemon, sender)
    began = time.monotonic()
    abort = await http.post(daemon.url + "/abort_weight_update?reason=gave%20up", timeout=5)
    assert time.monotonic() - began < 2 and not sending.done()
    held.release()
    assert abort.status_code == 200 and "round aborting" in abort.json()["message"], abort.text
    await sending  # the round in flight still completes on the wire...
    ended = await update
    assert ended.status_code == 409 and "aborted while this update ran" in ended.json()["detail"], ended.text
    checksum, health = await state(http, daemon)  # ...but is not made live: its bytes landed, unlabelled
    assert health["phase"] == "ready" and health["weight_version"] == "1" and health["weights_intact"] is False
    assert (await http.post(daemon.url + "/finish_weight_update", json={})).status_code == 409
    await full_round(http, [daemon], sender, weights(3), 3)
    checksum, health = await state(http, daemon)
    assert checksum == named_checksum(weights(3)) and health["weights_intact"]
    sender.close()


# -- item 3: init honours init_timeout_seconds end to end and can be cancelled ------------------
async def test_an_unresolvable_rendezvous_fails_within_init_timeout(spawn, http):
    daemon = await spawn("daemon")
    began = time.monotonic()
    answer = await http.post(daemon.url + "/init_weight_transfer_engine", json={"init_info": {
        **init_info(free_port(), 2, rank_offset=1), "master_address": "trainer.weightsync-test.invalid",
        "init_timeout_seconds": 3}})
    elapsed = time.monotonic() - began
    assert answer.status_code == 503 and "trainer.weightsync-test.invalid" in answer.json()["detail"], answer.text
    assert elapsed < 3 + 2, elapsed
    assert (await http.get(daemon.url + "/healthz")).json()["phase"] == "uninitialized"


async def pending_init(http, daemon, **extra):
    """An init that waits for a trainer who never comes, and proof that it is pending."""
    nobody = free_port()
    init = asyncio.ensure_future(http.post(daemon.url + "/init_weight_transfer_engine", json={"init_info": {
        **init_info(nobody, 2, rank_offset=1), "init_timeout_seconds": 60, **extra}}))
    deadline = time.monotonic() + 20
    while True:  # start answers at once while the init is pending (409 naming it)
        answer = await http.post(daemon.url + "/start_weight_update", timeout=2)
        if "init of group" in answer.json()["detail"]:
            assert answer.status_code == 409
            return init
        assert time.monotonic() < deadline, answer.text
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["abort", "close"])
async def test_abort_and_close_cancel_a_pending_init_at_once(spawn, http, how):
    daemon = await spawn("daemon")
    init = await pending_init(http, daemon)
    began = time.monotonic()
    path = "/abort_weight_update" if how == "abort" else "/close_weight_transfer_engine"
    answer = await http.post(daemon.url + path, timeout=5)
    assert answer.status_code == 200, answer.text
    cancelled = await asyncio.wait_for(init, 5)
    assert time.monotonic() - began < 3
    assert cancelled.status_code == 409 and "cancelled" in cancelled.json()["detail"], cancelled.text
    assert (await http.get(daemon.url + "/healthz")).json()["phase"] == "uninitialized"
    sender = await joined(http, [daemon], 2)  # and a real init afterwards works
    await full_round(http, [daemon], sender, weights(1), 1)
    sender.close()


async def test_an_init_whose_client_left_gives_up(spawn, http):
    daemon = await spawn("daemon")
    init = await pending_init(http, daemon)
    init.cancel()  # the client disconnects
    deadline = time.monotonic() + 5
    while "init of group" in (answer := await http.post(daemon.url + "/start_weight_update", timeout=2)).text:
        assert time.monotonic() < deadline, "the abandoned init is still pending"
        await asyncio.sleep(0.05)
    assert answer.status_code == 409 and "uninitialized" in answer.json()["detail"]


# -- item 4: version labels ---------------------------------------------------------------------
@pytest.mark.parametrize("label", ["1" * 30000 + "x", "9" * 5000, "v" * 257],
                         ids=["30k-digits", "5000-digits", "257-chars"])
async def test_a_bad_version_label_gets_422_and_changes_nothing(spawn, http, label):
    daemon = await spawn("daemon")
    sender = await joined(http, [daemon], 2)
    await full_round(http, [daemon], sender, weights(1), "step-1")
    before = await state(http, daemon)
    assert (await http.post(daemon.url + "/start_weight_update")).status_code == 200
    await asyncio.gather(asyncio.to_thread(sender.send_weights, weights(2)),
                         http.post(daemon.url + "/update_weights", json={}))
    body = json.dumps({"weight_version": label if not label.isdigit() else "NUMBER"}).replace('"NUMBER"', label)
    finish = asyncio.ensure_future(http.post(daemon.url + "/finish_weight_update", content=body,
                                             headers={"content-type": "application/json"}))
    health = await http.get(daemon.url + "/healthz", timeout=2)  # the event loop is not frozen
    answer = await finish
    assert answer.status_code == 422 and answer.json()["field"] == "weight_version", answer.text[:300]
    assert health.status_code == 200
    _, after = await state(http, daemon)
    assert after["weight_version"] == "step-1" and after["phase"] == "updating"  # nothing moved
    done = await http.post(daemon.url + "/finish_weight_update", json={"weight_version": 256 * "7"})
    assert done.status_code == 200 and done.json()["weight_version"] == 256 * "7"
    assert (await state(http, daemon))[0] == named_checksum(weights(2)) != before[0]
    sender.close()


async def test_finish_with_no_update_is_refused(spawn, http):
    daemon = await spawn("daemon")
    sender = await joined(http, [daemon], 2)
    await full_round(http, [daemon], sender, weights(1), "step-1")
    assert (await http.post(daemon.url + "/start_weight_update")).status_code == 200
    answer = await http.post(daemon.url + "/finish_weight_update", json={"weight_version": "step-2"})
    assert answer.status_code == 409 and "no update" in answer.json()["detail"]
    checksum, health = await state(http, daemon)
    assert health["weight_version"] == "step-1" and checksum == named_checksum(weights(1))
    assert (await http.post(daemon.url + "/abort_weight_update")).json()["message"] == "round aborted"
    await full_round(http, [daemon], sender, weights(2), "step-2")
    sender.close()


# -- item 5: bodies and slow clients ------------------------------------------------------------
def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send `head` (and `body`) on a raw socket; whatever the server answers within `timeout`."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.count(b"}") >= 1:
                    break
        except TimeoutError:
            pass
        return answer


async def test_the_token_is_checked_before_the_body_is_read(spawn, http):
    daemon = await spawn("daemon", "--port", "0", "--backend", "cpu", env={"WEIGHTSYNC_AUTH_TOKEN": TOKEN})
    # Headers announcing 300 MB, and not one body byte: the answer comes anyway.
    head = ("POST /update_weights HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 300000000\r\n")
    answer = await asyncio.to_thread(raw_request, daemon.url, head)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    # Whatever the body (broken JSON included), a stranger gets 401.
    for body in [b"{", b"[1,2", b"\xff\xfe", b'{"update_info": 5}', b"null", b"{" * 10000]:
        for path in ["/update_weights", "/init_weight_transfer_engine", "/finish_weight_update"]:
            refused = await http.post(daemon.url + path, content=body, headers={"content-type": "application/json"})
            assert refused.status_code == 401, (path, body[:20], refused.text)
    # With the token, a body over the limit is refused before it is read (413)...
    head = (f"POST /update_weights HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 300000000\r\n")
    answer = await asyncio.to_thread(raw_request, daemon.url, head)
    assert answer.startswith(b"HTTP/1.1 413") and b"max_body_bytes" in answer, answer[:300]

    # ... and so is a chunked one, once it passes the limit; /healthz answers meanwhile.
    async def chunks():
        for _ in range(20):
            yield b" " * (1 << 20)

    big, health = await asyncio.gather(
        http.post(daemon.url + "/update_weights", content=chunks(),
                  headers={**AUTH, "content-type": "application/json"}),
        http.get(daemon.url + "/healthz"))
    assert big.status_code == 413 and big.json()["field"] == "body" and health.status_code == 200
    assert (await http.get(daemon.url + "/healthz")).json()["weight_version"] is None


@pytest.fixture
def tight_server():
    """A receiver served in this process by the real uvicorn, with small limits."""
    from weightsync_daemon.app import create_app
    from weightsync_daemon.server import EmbeddedServer
    from weightsync_daemon.service import ReceiverService

    app = create_app(ReceiverService(), token=TOKEN, max_body_bytes=4096, body_timeout_seconds=1.0)
    server = EmbeddedServer(app, header_timeout_seconds=1.0).start()
    yield server
    server.stop()


def closed_within(url: str, head: bytes, trickle: bytes, seconds: float) -> tuple[bool, bytes]:
    """Send `head`, then `trickle` a byte every 0.2 s: whether the server answered or hung up
    within `seconds`, and what it said."""
    host, port = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + seconds
    with socket.create_connection((host, int(port)), timeout=seconds) as sock:
        sock.sendall(head)
        sock.settimeout(0.2)
        for byte in trickle:
            try:
                answer = sock.recv(4096)
                return True, answer  # answered (b"" = closed)
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                return False, b""
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return True, b""
    return False, b""


def test_slow_headers_and_slow_bodies_time_out(tight_server):
    url = tight_server.url
    ended, _ = closed_within(url, b"POST /update_weights HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 200, 4)
    assert ended, "a client trickling its headers kept the connection"
    head = (f"POST /update_weights HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n").encode()
    ended, answer = closed_within(url, head, b"{" + b" " * 199, 4)
    assert ended and answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert httpx.get(url + "/healthz").status_code == 200
    small = httpx.post(url + "/update_weights", json={"update_info": {"names": ["x" * 1000] * 5}}, headers=AUTH)
    assert small.status_code == 413 and "4096" in small.json()["detail"]


# -- item 6: the OpenAPI document tells the truth ------------------------------------------------
async def test_every_answer_matches_the_openapi_document(spawn, http):
    daemon = await spawn("daemon", "--port", "0", "--backend", "cpu", env={"WEIGHTSYNC_AUTH_TOKEN": TOKEN})
    spec = (await http.get(daemon.url + "/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["paths"]["/update_weights"]["post"]["security"] == [{"bearerAuth": []}]
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    error = spec["components"]["schemas"]["ErrorBody"]
    assert error["properties"]["detail"]["type"] == "string"
    port = free_port()
    init = {"init_info": {**init_info(port, 2, rank_offset=1), "init_timeout_seconds": 1}}
    calls = [
        ("get", "/healthz", None, {}), ("get", "/metrics", None, {}), ("get", "/is_paused", None, {}),
        ("get", "/get_world_size?include_dp=false", None, {}), ("get", "/get_world_size?include_dp=maybe", None, {}),
        ("get", "/weight_info", None, {}),
        ("post", "/start_weight_update", None, {}), ("post", "/start_weight_update", None, AUTH),
        ("post", "/init_weight_transfer_engine", {"init_info": {"world_size": "two"}}, AUTH),
        ("post", "/init_weight_transfer_engine", init, AUTH),  # nobody there: 503 within 1 s
        ("post", "/init_weight_transfer_engine", {"init_info": {"master_address": "x" * 5000}}, AUTH),
        ("post", "/update_weights", {"update_info": {"packed": False}}, AUTH),
        ("post", "/update_weights", b"[" + b" " * (9 << 20) + b"]", AUTH),  # over 8 MiB
        ("post", "/update_weights", {}, AUTH),
        ("post", "/finish_weight_update", {"weight_version": ["x"]}, AUTH),
        ("post", "/finish_weight_update", {"weight_version": "v1"}, AUTH),
        ("post", "/abort_weight_update?reason=" + "r" * 600, None, AUTH),
        ("post", "/abort_weight_update", None, AUTH),
        ("post", "/pause?mode=keep", None, AUTH), ("post", "/pause?mode=never", None, AUTH),
        ("post", "/resume", None, AUTH), ("post", "/resume", None, {}),
        ("post", "/weight_checker", {"action": "checksum"}, AUTH),
        ("post", "/weight_checker", {"action": "compare", "baseline": {}}, AUTH),
        ("post", "/weight_checker", {"action": "explode"}, AUTH),
        ("post", "/weight_checker", "not json", AUTH),
        ("post", "/weight_checker", b"\x80 not utf-8", AUTH),
        ("post", "/close_weight_transfer_engine", None, AUTH),
        ("post", "/seed_weights", init, AUTH),
    ]
    seen = set()
    for method, path, body, headers in calls:
        if isinstance(body, (str, bytes)):
            raw = body.encode() if isinstance(body, str) else body

            async def chunks(raw=raw):  # no Content-Length: the limit applies as the body is read
                for i in range(0, len(raw), 1 << 20):
                    yield raw[i:i + (1 << 20)]

            answer = await http.request(method, daemon.url + path, content=chunks() if len(raw) > 1 << 20 else raw,
                                        headers={**headers, "content-type": "application/json"})
        else:
            answer = await http.request(method, daemon.url + path, json=body, headers=headers)
        declared = spec["paths"][path.split("?")[0]][method]["responses"]
        status = str(answer.status_code)
        assert status in declared, (method, path, answer.status_code, answer.text, sorted(declared))
        seen.add(answer.status_code)
        content = declared[status].get("content", {})
        if answer.headers["content-type"].startswith("application/json"):
            schema = content["application/json"]["schema"]
            jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(answer.json())
        else:
            assert answer.headers["content-type"].startswith("text/plain") and "text/plain" in content
    assert {200, 401, 409, 413, 422, 503} <= seen, seen  # a body that is not JSON: 422 naming `body`


# -- item 7: vLLM's bodies, accepted with vLLM's meaning or refused by name ---------------------
async def test_an_update_info_list_is_indexed_by_worker_rank(spawn, http):
    daemons = await asyncio.gather(spawn("daemon-a"), spawn("daemon-b"))
    sender = await joined(http, daemons, 3)
    named = weights(1)
    right, wrong = manifest(named), {**manifest(named), "names": [f"other{i}" for i in range(16)]}
    # Worker 0 (rank_offset 1) is entry 0, worker 1 (rank_offset 2) entry 1; the other entry would fail.
    await full_round(http, daemons, sender, named, 1,
                     bodies=[{"update_info": [right, wrong]}, {"update_info": [wrong, right]}])
    for daemon in daemons:
        assert (await state(http, daemon))[0] == named_checksum(named)
    empty = await http.post(daemons[1].url + "/update_weights", json={"update_info": []})
    assert empty.status_code == 422 and empty.json()["field"] == "update_info"
    sender.close()


async def test_vllm_fields_are_honoured_or_refused_by_name(spawn, http):
    daemon = await spawn("daemon")
    port = free_port()
    for key in ("packed",):
        refused = await http.post(daemon.url + "/init_weight_transfer_engine", json={"init_info": {
            **init_info(port, 2, rank_offset=1), key: False}})
        assert refused.status_code == 422 and refused.json()["field"] == "init_info.packed", refused.text
    ipc = await http.post(daemon.url + "/init_weight_transfer_engine", json={"init_info": {}})
    assert ipc.status_code == 422 and "world_size" in ipc.json()["detail"]
    assert (await http.get(daemon.url + "/get_world_size?include_dp=false")).json() == {"world_size": 1}
    bad_dp = await http.get(daemon.url + "/get_world_size?include_dp=perhaps")
    assert bad_dp.status_code == 422 and "include_dp" in bad_dp.json()["field"]

    sender = await joined(http, [daemon], 2)
    await full_round(http, [daemon], sender, weights(1), 1)
    before = await state(http, daemon)
    refused = await http.post(daemon.url + "/start_weight_update", json={"is_checkpoint_format": False})
    assert refused.status_code == 422 and refused.json()["field"] == "is_checkpoint_format"
    start_answer = await http.post(daemon.url + "/start_weight_update", json={"is_checkpoint_format": True})
    assert start_answer.status_code == 200
    assert (await http.post(daemon.url + "/abort_weight_update")).status_code == 200
    # A refused update body is the daemon's verdict on the round the trainer sends (issue 24 item 1).
    for key in ("packed", "is_checkpoint_format"):
        refused, trainer_error = await refused_round(http, daemon, lambda: sender.send_weights(weights(9)),
                                                     {"update_info": {key: False}})
        assert refused.status_code == 422 and refused.json()["field"] == f"update_info.{key}", refused.text
        assert f"update_info.{key}" in str(trainer_error)
    checksum, health = await state(http, daemon)
    assert checksum == before[0] and (health["phase"], health["weights_intact"]) == ("ready", True)

    # vLLM's sparse body: num_updates_list with each patched parameter's own shape.
    from weightsync.transports import SparsePatch

    indices, values = torch.tensor([0, 5, 16383]), torch.tensor([1.0, 2.0, 3.0])
    patches = [SparsePatch("layer3.weight", indices, values)]
    vllm_sparse = {"update_kind": "sparse_flat", "names": ["layer3.weight"], "dtype_names": ["float32"],
                   "shapes": [[128, 128]], "num_updates_list": [3]}
    wrong_shape, _ = await refused_round(http, daemon, lambda: sender.send_sparse(patches),
                                         {"update_info": {**vllm_sparse, "shapes": [[64, 256]]}})
    assert wrong_shape.status_code == 422 and wrong_shape.json()["field"] == "update_info.shapes"
    assert (await http.post(daemon.url + "/start_weight_update")).status_code == 200
    _, answer = await asyncio.gather(
        asyncio.to_thread(sender.send_sparse, patches),
        http.post(daemon.url + "/update_weights", json={"update_info": vllm_sparse}))
    assert answer.status_code == 200, answer.text
    assert (await http.post(daemon.url + "/finish_weight_update", json={"weight_version": 2})).status_code == 200
    expected = dict(weights(1))
    expected["layer3.weight"] = expected["layer3.weight"].clone()
    expected["layer3.weight"].view(-1)[indices] = values
    assert (await state(http, daemon))[0] == named_checksum(expected.items())
    sender.close()
