"""Malformed input and authentication against a real daemon process: every bad body gets a 4xx
that names the field (never a 5xx), nothing is unpickled, and the weights stay bit-identical."""

import json
import os
import pickle
import subprocess
import sys
import tempfile

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightsync import WeightSender
from weightsync.store import named_checksum
from weightsync_operator.local import free_port

pytestmark = pytest.mark.faults
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NAMED = [("w", torch.randn(64, 64)), ("b", torch.randn(64).half())]


@pytest.fixture(scope="module")
def daemon():
    """A token-protected daemon process holding NAMED after one real round."""
    process = subprocess.Popen([sys.executable, "-m", "weightsync_daemon", "--port", "0"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "WEIGHTSYNC_AUTH_TOKEN": TOKEN})
    try:
        url = json.loads(process.stdout.readline())["url"]
        port = free_port()
        base = {"master_address": "127.0.0.1", "master_port": port, "world_size": 2, "timeout_seconds": 20}
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            import threading

            answer = {}
            joiner = threading.Thread(target=lambda: answer.update(r=http.post(
                "/init_weight_transfer_engine", json={"init_info": {**base, "rank_offset": 1}})))
            joiner.start()
            sender = WeightSender.init(base)
            joiner.join(30)
            assert answer["r"].status_code == 200
            assert http.post("/start_weight_update").status_code == 200
            receiver = threading.Thread(target=lambda: answer.update(u=http.post("/update_weights", json={})))
            receiver.start()
            sender.send_weights(NAMED)
            receiver.join(30)
            assert answer["u"].status_code == 200, answer["u"].text
            assert http.post("/finish_weight_update", json={"weight_version": 1}).status_code == 200
        yield url
        sender.close()
    finally:
        process.stdin.close()
        process.terminate()
        process.wait(10)


def checksum(url: str) -> str:
    return httpx.post(url + "/weight_checker", json={"action": "checksum"}, headers=AUTH).json()["checksum"]


def assert_untouched(url: str, why: object) -> None:
    """The daemon still holds NAMED, bit for bit, at version 1, ready: `why` changed nothing."""
    assert checksum(url) == named_checksum(NAMED), why
    health = httpx.get(url + "/healthz").json()
    assert health["phase"] == "ready" and health["weight_version"] == "1" and health["weights_intact"], (why, health)


# -- authentication -----------------------------------------------------------------------------
MUTATING = ["/init_weight_transfer_engine", "/start_weight_update", "/update_weights",
            "/finish_weight_update", "/abort_weight_update", "/pause", "/resume", "/weight_checker"]


@pytest.mark.parametrize("path", MUTATING)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_mutating_endpoints_need_the_token(daemon, path, headers):
    answer = httpx.post(daemon + path, json={}, headers=headers)
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/get_world_size", "/weight_info", "/is_paused"])
def test_probes_and_metrics_stay_open(daemon, path):
    assert httpx.get(daemon + path).status_code == 200


def test_a_pickle_payload_is_refused_and_never_unpickled(daemon):
    marker = os.path.join(tempfile.mkdtemp(), "pwned")

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps({"update_info": Exploit()})
    before = checksum(daemon)
    for content_type in ("application/json", "application/octet-stream", "application/python-pickle"):
        answer = httpx.post(daemon + "/update_weights", content=payload,
                            headers={**AUTH, "content-type": content_type})
        assert answer.status_code in (400, 409, 415, 422), answer.text
        if answer.status_code != 409:
            assert answer.json()["field"] == "body"
    assert not os.path.exists(marker)
    assert checksum(daemon) == before


# -- generated malformed bodies -----------------------------------------------------------------
VALID = {
    "/init_weight_transfer_engine": {"init_info": {"master_address": "127.0.0.1", "master_port": 1,
                                                   "rank_offset": 1, "world_size": 2}},
    "/update_weights": {"update_info": {"names": ["w"], "dtype_names": ["float32"], "shapes": [[64, 64]]}},
    "/finish_weight_update": {"weight_version": "v2"},
    "/start_weight_update": {"is_checkpoint_format": True},
    "/weight_checker": {"action": "checksum"},
}
junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
# Values no field accepts: every field is a string, integer, boolean, list of strings or list of lists.
wrong_type = st.one_of(st.lists(st.integers(), min_size=1, max_size=2),
                       st.dictionaries(st.just("k"), st.integers(), min_size=1),
                       st.floats(1.25, 9.75).filter(lambda f: not f.is_integer()))


def _leaves(body, path=()):
    if isinstance(body, dict):
        for key, value in body.items():
            yield from _leaves(value, path + (key,))
    yield path


def _set(body, path, value):
    body = json.loads(json.dumps(body))
    if not path:
        return value
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


@st.composite
def malformed(draw):
    """A valid body with exactly one field broken: wrong type, unknown key, or dropped."""
    path = draw(st.sampled_from(sorted(VALID)))
    body = VALID[path]
    leaf = draw(st.sampled_from([p for p in _leaves(body) if p]))
    how = draw(st.sampled_from(["type", "extra", "drop", "junk-root"]))
    if how == "type":
        return path, _set(body, leaf, draw(wrong_type)), leaf[0]
    if how == "extra":
        parent = leaf[:-1]
        key = "unexpected_" + draw(st.text("abcdef", min_size=1, max_size=4))
        target = body
        for k in parent:
            target = target[k]
        if not isinstance(target, dict):
            return path, _set(body, (key,), 1), key
        return path, _set(body, parent + (key,), draw(junk)), (parent or (key,))[0]
    if how == "drop" and leaf[-1] in ("master_port", "world_size") or leaf == ("init_info",):
        parent = body
        for k in leaf[:-1]:
            parent = parent[k]
        trimmed = _set(body, leaf[:-1], {k: v for k, v in parent.items() if k != leaf[-1]})
        return path, trimmed, leaf[0]
    return path, draw(st.lists(junk, max_size=3)), "body"


@settings(max_examples=240, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(case=malformed())
def test_generated_bad_bodies_get_4xx_naming_the_field(daemon, case):
    path, body, field = case
    answer = httpx.post(daemon + path, json=body, headers=AUTH, timeout=10)
    assert 400 <= answer.status_code < 500, (path, body, answer.text)
    reply = answer.json()
    if answer.status_code == 422:
        assert reply["field"].split(".")[0] == field or reply["field"] == "body", (body, reply)
        assert reply["field"].split(".")[-1] in reply["detail"] or reply["field"] in reply["detail"]
    # Checked after every case, not by a later test (which would depend on the file's order):
    # nothing a bad body did changed a byte, the version or the phase.
    assert_untouched(daemon, (path, body))
