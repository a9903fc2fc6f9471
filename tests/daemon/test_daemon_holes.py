"""The daemon's remaining holes (issue 24), each against real processes: a daemon process and a gloo
trainer in this process. Each test names the item it covers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from weightsync.store import named_checksum
from weightsync_operator.local import free_port

from helpers.daemon_rounds import TIMEOUT, full_round, init_info, joined, manifest, refused_round, state, weights

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[2]
QUICK = 5.0  # a refusal reaches the trainer well within this (the group's timeout is TIMEOUT)


class DaemonProcess:
    """`python -m weightsync_daemon` with everything it writes kept (stderr in a file, stdout's
    lines after the URL, where uvicorn's access log goes), for tests that read its log."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None):
        self.log = tmp_path / f"daemon-{time.monotonic_ns()}.log"
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "weightsync_daemon", "--port", "0", "--backend", "cpu", "--exit-on-stdin-eof",
             *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file,
            env={**os.environ, **(env or {})})
        line = self.process.stdout.readline()
        self.url = json.loads(line)["url"] if line else None
        self._stdout: list[str] = []
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self._stdout.append(line.decode(errors="replace"))

    def exit_code(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") + "".join(self._stdout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


@pytest.fixture
def daemon_process(tmp_path):
    started: list[DaemonProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        started.append(DaemonProcess(tmp_path, *args, env=env))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def nan_shape_body(named) -> bytes:
    """A manifest whose first shape holds NaN (JSON as Python writes it; valid to a lax parser)."""
    body = {"update_info": manifest(named)}
    body["update_info"]["shapes"][0][0] = float("nan")
    return json.dumps(body).encode()


# -- item 1: a refusal never breaks the transfer group -------------------------------------------
async def test_a_refused_body_fails_the_round_everywhere_at_once_and_the_group_goes_on(spawn, http):
    refuser, other = await asyncio.gather(spawn("refuser"), spawn("other"))
    sender = await joined(http, [refuser, other], 3)
    await full_round(http, [refuser, other], sender, weights(1), 1)
    named = weights(99)
    duplicate = manifest(named)
    duplicate["names"][1] = duplicate["names"][0]
    bodies = {
        "NaN in a shape": (nan_shape_body(named), "update_info.shapes.0.0"),
        "a name listed twice": ({"update_info": duplicate}, "update_info"),
        "a shape as text": ({"update_info": {**manifest(named), "shapes": [["128", 128]] * 16}},
                            "update_info.shapes.0.0"),
    }
    version = 1
    for what, (body, field) in bodies.items():
        landed = named_checksum(weights(version))
        began = time.monotonic()
        assert (await http.post(other.url + "/start_weight_update")).status_code == 200
        other_answer = asyncio.ensure_future(http.post(other.url + "/update_weights", json={}))
        refused, trainer_error = await refused_round(http, refuser, lambda: sender.send_weights(named), body)
        other_answer = await other_answer
        took = time.monotonic() - began
        print(f"{what}: refused in {took:.2f}s (group timeout {TIMEOUT:g}s): {trainer_error}")
        assert refused.status_code == 422 and refused.json()["field"] == field, (what, refused.text)
        assert field in str(trainer_error) and "rank 1" in str(trainer_error), (what, trainer_error)
        assert other_answer.status_code == 422 and field in other_answer.json()["detail"], other_answer.text
        assert took < QUICK, f"{what}: the refusal took {took:.1f}s to reach the trainer"
        for daemon in (refuser, other):  # nothing landed, the weights still say so
            checksum, health = await state(http, daemon)
            assert checksum == landed
            assert (health["phase"], health["weights_intact"], health["weight_version"]) \
                == ("ready", True, str(version))
        version += 1
        await full_round(http, [refuser, other], sender, weights(version), version)  # same group, no re-init
        for daemon in (refuser, other):
            assert (await state(http, daemon))[0] == named_checksum(weights(version))
    sender.close()


async def test_a_refused_sparse_body_reaches_the_trainer_and_the_next_round_lands(spawn, http):
    from weightsync.transports import SparsePatch

    daemon = await spawn("daemon")
    sender = await joined(http, [daemon], 2)
    await full_round(http, [daemon], sender, weights(1), 1)
    patches = [SparsePatch("layer3.weight", torch.tensor([0, 5, 16383]), torch.tensor([1.0, 2.0, 3.0]))]
    sparse = {"update_kind": "sparse_flat", "names": ["layer3.weight"], "dtype_names": ["float32"],
              "shapes": [[64, 256]], "num_updates_list": [3]}  # vLLM's spelling, with a wrong shape
    began = time.monotonic()
    refused, trainer_error = await refused_round(http, daemon, lambda: sender.send_sparse(patches),
                                                 {"update_info": sparse})
    assert refused.status_code == 422 and refused.json()["field"] == "update_info.shapes", refused.text
    assert "update_info.shapes" in str(trainer_error) and time.monotonic() - began < QUICK
    await full_round(http, [daemon], sender, weights(2), 2)
    assert (await state(http, daemon))[0] == named_checksum(weights(2))
    sender.close()


async def test_a_legal_manifest_of_100000_names_lands_within_a_4s_timeout(spawn, http):
    """The body is validated in time for the trainer's 4 s collective timeout (on main, validating
    it alone took longer), and the round lands."""
    daemon = await spawn("daemon")
    count = 100_000
    named = [(f"model.layers.{i // 1000}.experts.{i % 1000}.w", torch.full((2,), float(i))) for i in range(count)]
    sender = await joined(http, [daemon], 2, timeout_seconds=4)
    body = {"update_info": manifest(named)}
    assert len(json.dumps(body)) > 4 << 20
    for version in (1, 2):
        assert (await http.post(daemon.url + "/start_weight_update")).status_code == 200
        began = time.monotonic()
        _, answer = await asyncio.gather(asyncio.to_thread(sender.send_weights, named),
                                         http.post(daemon.url + "/update_weights", json=body))
        print(f"round {version}: {count} names, {time.monotonic() - began:.2f}s")
        assert answer.status_code == 200, answer.text
        finish_answer = await http.post(daemon.url + "/finish_weight_update", json={"weight_version": version})
        assert finish_answer.status_code == 200
    assert (await state(http, daemon))[0] == named_checksum(named)
    sender.close()


# -- item 2: every pending call can be cancelled --------------------------------------------------
async def until_started(http, daemon, deadline: float) -> None:
    """Poll until the daemon takes a start (no call in progress any more), then abort that round."""
    while True:
        answer = await http.post(daemon.url + "/start_weight_update")
        if answer.status_code == 200:
            assert (await http.post(daemon.url + "/abort_weight_update")).status_code == 200
            return
        assert answer.status_code == 409 and time.monotonic() < deadline, answer.text
        await asyncio.sleep(0.05)


async def seed_pending(http, daemon, deadline: float) -> None:
    """Poll until the daemon says a seed is in progress (an update, which changes nothing outside a
    round, is refused naming it)."""
    while True:
        answer = await http.post(daemon.url + "/update_weights", json={})
        assert answer.status_code == 409, answer.text
        if "seed_weights is in progress" in answer.json()["detail"]:
            return
        assert time.monotonic() < deadline, answer.text
        await asyncio.sleep(0.05)


async def test_abort_close_and_a_leaving_client_cancel_a_pending_seed(spawn, http):
    daemon = await spawn("daemon")
    sender = await joined(http, [daemon], 2)
    await full_round(http, [daemon], sender, weights(1), 1)

    def seed_body() -> dict:  # a one-off group nobody joins, allowed to wait ten minutes
        return {"init_info": {**init_info(free_port(), 2), "init_timeout_seconds": 600}}

    # Abort cancels it at once; the seed answers 409 saying why.
    seed = asyncio.ensure_future(http.post(daemon.url + "/seed_weights", json=seed_body()))
    await seed_pending(http, daemon, time.monotonic() + QUICK)
    began = time.monotonic()
    abort = await http.post(daemon.url + "/abort_weight_update?reason=operator%20gave%20up")
    assert abort.json()["message"] == "pending seed cancelled", abort.text
    answer = await seed
    refused_detail = answer.json()["detail"]
    assert answer.status_code == 409 and "seed of group" in refused_detail and "cancelled" in refused_detail
    assert time.monotonic() - began < QUICK, answer.text

    # The client leaving cancels it: the daemon takes the next call within moments.
    async with httpx.AsyncClient(timeout=2.0) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await impatient.post(daemon.url + "/seed_weights", json=seed_body())
    await until_started(http, daemon, time.monotonic() + QUICK)

    # Close cancels it and leaves the group at once (it used to wait 15 s, then answer 409).
    seed = asyncio.ensure_future(http.post(daemon.url + "/seed_weights", json=seed_body()))
    await seed_pending(http, daemon, time.monotonic() + QUICK)
    began = time.monotonic()
    close = await http.post(daemon.url + "/close_weight_transfer_engine")
    assert close.status_code == 200, close.text
    assert (await seed).status_code == 409 and time.monotonic() - began < QUICK
    # The weights it would have seeded are still served, unchanged.
    assert (await state(http, daemon))[0] == named_checksum(weights(1))
    sender.close()


# -- item 3: tokens ------------------------------------------------------------------------------
TOKEN = "0123456789abcdefghijklmnopqrstuv"


def authorized(url: str, token: str) -> int:
    return httpx.post(url + "/pause?mode=keep", headers={"Authorization": f"Bearer {token}"}).status_code


def test_a_token_ending_in_a_newline_works_from_the_variable_and_the_file(daemon_process, tmp_path):
    from_env = daemon_process(env={"WEIGHTSYNC_AUTH_TOKEN": TOKEN + "\n"})
    assert from_env.url is not None, from_env.output()
    assert authorized(from_env.url, TOKEN) == 200 and authorized(from_env.url, TOKEN + "x") == 401
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    from_file = daemon_process("--token-file", str(token_file))
    assert authorized(from_file.url, TOKEN) == 200
    assert "readable by every user" not in from_file.output()


def test_a_token_that_cannot_work_is_refused_at_start(daemon_process, tmp_path):
    for value in ("t\u00f6ken-with-umlaut-0123456789", " \n", "two words in one token 0123456"):
        refused = daemon_process(env={"WEIGHTSYNC_AUTH_TOKEN": value})
        assert refused.exit_code() == 2 and refused.url is None
        assert "WEIGHTSYNC_AUTH_TOKEN" in refused.output(), refused.output()
    open_file = tmp_path / "open-token"
    open_file.write_text(TOKEN)
    open_file.chmod(0o644)
    warned = daemon_process("--token-file", str(open_file))
    assert authorized(warned.url, TOKEN) == 200
    assert f"token file {open_file} is readable by every user" in warned.output()


def test_the_charts_secret_reaches_the_daemon_as_the_token(daemon_process, tmp_path):
    """The chart's path end to end: a Secret made with `kubectl create secret --from-file` (the
    file ends in a newline), the daemon Deployment's env and command as the chart renders them,
    the Secret's value as the kubelet would put it in the variable."""
    from helpers.chart import render

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    made = subprocess.run(["kubectl", "create", "secret", "generic", "ws-auth", f"--from-file=token={token_file}",
                           "--dry-run=client", "-o", "json"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    secret = json.loads(made.stdout)
    docs = render({"daemon": {"enabled": True, "syncName": "policy", "backend": "cpu"},
                   "auth": {"existingSecret": "ws-auth"}})
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("daemon"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {}
    for entry in container["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref["name"] == secret["metadata"]["name"]
            env[entry["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    assert env["WEIGHTSYNC_AUTH_TOKEN"].endswith("\n")  # what --from-file puts in the Secret
    assert container["command"] == ["weightsync", "daemon"]
    overrides = {"--host": "127.0.0.1", "--port": "0", "--device": "cpu"}
    args = [f"{arg.split('=')[0]}={overrides.get(arg.split('=')[0], arg.split('=', 1)[-1])}"
            for arg in container["args"]]
    daemon = daemon_process(*args, env=env)
    assert daemon.url is not None, daemon.output()
    assert authorized(daemon.url, TOKEN) == 200


# -- item 4: input rules that hold whatever the JSON type -----------------------------------------
async def test_every_caller_error_gets_422_naming_the_field_and_changes_nothing(spawn, http):
    daemon = await spawn("daemon")
    sender = await joined(http, [daemon], 2)
    await full_round(http, [daemon], sender, weights(1), "v1")
    before = await state(http, daemon)
    good = init_info(free_port(), 2, rank_offset=1)
    unique_id = base64.b64encode(bytes(128)).decode()
    init = "/init_weight_transfer_engine"
    cases = [
        (init, {"init_info": {**good, "world_size": "2"}}, "init_info.world_size"),
        (init, {"init_info": {**good, "master_port": True}}, "init_info.master_port"),
        (init, {"init_info": {**good, "rank_offset": 1.0}}, "init_info.rank_offset"),
        (init, {"init_info": {**good, "timeout_seconds": "5"}}, "init_info.timeout_seconds"),
        (init, {"init_info": {**good, "verify": "yes"}}, "init_info.verify"),
        (init, {"init_info": {**good, "group_name": "g\r\nX-Forged: 1"}}, "init_info.group_name"),
        (init, {"init_info": {**good, "nccl_unique_id_b64": unique_id}}, "init_info.nccl_unique_id_b64"),
        (init, {"init_info": {**good, "nccl_unique_id_b64": "not base64!"}}, "init_info.nccl_unique_id_b64"),
        ("/finish_weight_update", {"weight_version": "v2\x00"}, "weight_version"),
        ("/finish_weight_update", {"weight_version": "v2\r\nforged log line"}, "weight_version"),
        ("/finish_weight_update", {"weight_version": "v2\u202e1v"}, "weight_version"),
        ("/finish_weight_update", {"weight_version": "9" * 4300}, "weight_version"),
        ("/finish_weight_update", b'{"weight_version": ' + b"9" * 4000 + b"}", "weight_version"),
        ("/finish_weight_update", {"weight_version": True}, "weight_version"),
        ("/start_weight_update", {"is_checkpoint_format": 1}, "is_checkpoint_format"),
        ("/abort_weight_update?reason=one%0Atwo", None, "reason"),
    ]
    for path, body, field in cases:
        if isinstance(body, bytes):
            answer = await http.post(daemon.url + path, content=body, headers={"content-type": "application/json"})
        else:
            answer = await http.post(daemon.url + path, json=body)
        assert answer.status_code == 422 and answer.json()["field"] == field, (path, body, answer.text)
        assert await state(http, daemon) == before, (path, body)
    sender.close()


# -- item 5: what an unauthenticated caller sees ----------------------------------------------------
async def test_only_an_authenticated_caller_reads_how_a_round_failed(spawn, http):
    token = {"Authorization": f"Bearer {TOKEN}"}
    daemon = await spawn("daemon", env={"WEIGHTSYNC_AUTH_TOKEN": TOKEN})
    sender = await joined(http, [daemon], 2, headers=token)
    await full_round(http, [daemon], sender, weights(1), 1, headers=token)
    named = weights(2)
    body = {"update_info": {**manifest(named), "names": ["secret.layer.name"] + manifest(named)["names"][1:]}}
    body["update_info"]["names"][1] = "secret.layer.name"  # listed twice: refused
    refused, _ = await refused_round(http, daemon, lambda: sender.send_weights(named), body, headers=token)
    assert refused.status_code == 422
    anyone = (await http.get(daemon.url + "/healthz")).json()
    insider = (await http.get(daemon.url + "/healthz", headers=token)).json()
    assert insider["last_failure"].startswith("refused: update_info") and "duplicate" in insider["last_failure"]
    assert "update_info" not in anyone["last_failure"] and anyone["last_failure"].startswith("hidden")
    assert (anyone["phase"], anyone["weights_intact"], anyone["weight_version"]) == ("ready", True, "1")
    sender.close()


def test_a_token_in_a_query_string_never_reaches_the_access_log(daemon_process):
    daemon = daemon_process("--log-level", "info", env={"WEIGHTSYNC_AUTH_TOKEN": TOKEN})
    httpx.get(daemon.url + f"/healthz?token={TOKEN}&x=1")
    httpx.post(daemon.url + f"/pause?mode=keep&access_token={TOKEN}")
    assert authorized(daemon.url, TOKEN) == 200
    deadline = time.monotonic() + QUICK
    while "/pause?mode=keep&access_token=REDACTED" not in daemon.output():  # access lines are written after the answer
        assert time.monotonic() < deadline, daemon.output()
        time.sleep(0.05)
    log = daemon.output()
    assert TOKEN not in log and "/healthz?token=REDACTED&x=REDACTED" in log, log


# -- item 6: the event loop stays free --------------------------------------------------------------
def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_large_bodies_leave_healthz_answering_at_once(daemon_process, http):
    """Ten authorized 6 MB bodies at once: /healthz keeps answering within 100 ms (on main it
    stalled 3.4 s). The daemon's RSS before, at the peak and after is printed."""
    daemon = daemon_process(env={"WEIGHTSYNC_AUTH_TOKEN": TOKEN})
    token = {"Authorization": f"Bearer {TOKEN}"}
    count = 110_000
    expert_names = [f"model.layers.{i // 1000}.experts.{i % 1000}.w" for i in range(count)]
    body = json.dumps({"update_info": {"names": expert_names,
                                       "dtype_names": ["bfloat16"] * count, "shapes": [[16, 16]] * count}}).encode()
    assert 5 << 20 < len(body) < 8 << 20
    started = rss_mib(daemon.process.pid)
    latencies: list[float] = []
    peak = started

    async def probe(stop: asyncio.Event) -> None:
        nonlocal peak
        while not stop.is_set():
            began = time.perf_counter()
            assert (await http.get(daemon.url + "/healthz")).status_code == 200
            latencies.append(time.perf_counter() - began)
            peak = max(peak, rss_mib(daemon.process.pid))
            await asyncio.sleep(0.02)

    for _burst in range(2):
        stop = asyncio.Event()
        probing = asyncio.ensure_future(probe(stop))
        answers = await asyncio.gather(*(http.post(daemon.url + "/update_weights", content=body,
                                                   headers={**token, "content-type": "application/json"})
                                         for _ in range(10)))
        stop.set()
        await probing
        # No round is in progress: each body is validated, then refused by the phase (409).
        assert {a.status_code for a in answers} == {409}, {a.text[:200] for a in answers}
    settled = time.monotonic() + 10
    after = rss_mib(daemon.process.pid)
    while after > started + 96 and time.monotonic() < settled:  # freed pages go back ~2 s after
        await asyncio.sleep(0.2)
        after = rss_mib(daemon.process.pid)
    latencies.sort()
    print(f"/healthz during 2 x 10 bodies of {len(body) / 2**20:.1f} MiB: {len(latencies)} probes, median "
          f"{statistics.median(latencies) * 1e3:.1f} ms, p90 {latencies[int(len(latencies) * 0.9)] * 1e3:.1f} ms, "
          f"max {latencies[-1] * 1e3:.1f} ms; RSS {started:.0f} MiB at start, {peak:.0f} at the peak, "
          f"{after:.0f} after")
    # The median within 100 ms (on main a single such body held /healthz 1-1.5 s); the tail is
    # left some room for whatever else shares the machine's two cores.
    assert statistics.median(latencies) < 0.1 and latencies[int(len(latencies) * 0.9)] < 0.3, latencies[-5:]
    # On main the RSS settled 170 MiB above its start after such bursts; here it is what Python's
    # partly used pools keep (47 MiB measured), with headroom for another allocator's habits.
    assert after < started + 128, f"RSS {after:.0f} MiB after the bursts, {started:.0f} at start"


# -- item 7: small ones -------------------------------------------------------------------------------
def test_python_m_weightsync_cli_main_runs_the_command():
    ran = subprocess.run([sys.executable, "-m", "weightsync_cli.main", "daemon", "--help"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert ran.returncode == 0 and ran.stdout.startswith("usage: weightsync daemon"), (ran.stdout, ran.stderr)
