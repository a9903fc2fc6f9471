"""Issue 13 item 1: the long-running commands run without a terminal, as containers run them.

Docker without `-i`, Kubernetes, systemd and nohup start a process with stdin at /dev/null and
no controlling terminal, and stop it with SIGTERM. Each long-running command — the receiver
daemon, the trainer's agent (the demo's trainer worker), the operator — is started here exactly
so (stdin /dev/null, its own session, the argv its Deployment / Dockerfile / example ships with;
only the port is moved to a free one and, without CUDA, nccl/cuda:0 to cpu): it must still be up
and serving 10 s later, complete a real round over gloo, and exit 0 on SIGTERM within a bound.
A round in flight at SIGTERM gets the grace period to finish; one that cannot is abandoned
within the bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch
import yaml
from dockerfile_parse import DockerfileParser

from weightsync import WeightSender
from weightsync.store import named_checksum
from weightsync.tokens import TOKEN_ENV
from weightsync_operator.client import Endpoint
from weightsync_operator.coordinator import Coordinator, SyncSpec, Timeouts
from weightsync_operator.local import free_port

pytestmark = pytest.mark.integration  # daemons, trainer agents and the operator as processes
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOKEN = "long-running-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALIVE_SECONDS = 10.0  # "still up after 10 s"
STOP_SECONDS = 30.0  # SIGTERM to exit, idle (the daemon's own bound is 2 x 5 s past the grace)
NAMED = [("w", torch.arange(64, dtype=torch.float32).reshape(8, 8)), ("b", torch.ones(8).bfloat16())]


# -- the argv each deployment ships with ---------------------------------------------------------

def dockerfile_cmd(name: str) -> list[str]:
    (cmd,) = [json.loads(i["value"]) for i in DockerfileParser(path=str(ROOT / "docker" / name)).structure
              if i["instruction"] == "CMD"]
    return cmd


def chart_container(values: dict, deployment: str) -> list[str]:
    from helpers.chart import FULL, pod_spec, render

    container = pod_spec(render(values), f"{FULL}-{deployment}")["containers"][0]
    return container["command"] + container["args"]


def sidecar_example() -> list[str]:
    docs = yaml.safe_load_all((ROOT / "charts" / "weightsync" / "examples" / "inference-sidecar.yaml").read_text())
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (sidecar,) = deployment["spec"]["template"]["spec"]["initContainers"]
    return sidecar["command"] + sidecar["args"]


def runnable_here(argv: list[str], port: int, option: str = "--port") -> list[str]:
    """`argv` as shipped, with its port (`--port`, or the port of the `--liveness` URL) moved to
    `port` and, without CUDA, the GPU transport and device moved to the cpu ones; the executable
    resolved in this environment. Both `--name=value` and `--name value` forms are kept as they are."""
    cuda = torch.cuda.is_available()

    def adjusted(name: str, value: str) -> str:
        if name == option == "--port":
            return str(port)
        if name == option:
            url = urlsplit(value)
            return url._replace(netloc=f"{url.hostname}:{port}").geturl()
        if name == "--backend" and not cuda and value in ("nccl", "ipc", "p2p"):
            return "cpu"
        if name == "--device" and not cuda and value.startswith("cuda"):
            return "cpu"
        return value

    out, rest = [str(BIN / argv[0])], argv[1:]
    while rest:
        arg = rest.pop(0)
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
            out.append(f"{name}={adjusted(name, value)}")
        elif arg.startswith("--") and rest and not rest[0].startswith("-"):
            out += [arg, adjusted(arg, rest.pop(0))]
        else:
            out.append(arg)
    assert any(a == option or a.startswith(option + "=") for a in argv), f"{argv} names no {option}"
    return out


# -- processes started as a container runtime starts them ---------------------------------------

class Detached:
    """A command with stdin at /dev/null and no controlling terminal (its own session)."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path):
        self.name, self.process, self.log, self.started = name, process, log, time.monotonic()
        self.url = ""

    @classmethod
    async def start(cls, name: str, argv: list[str], log_dir: Path, env: dict | None = None,
                    url_line: bool = True, stdin_open: bool = False) -> "Detached":
        """`stdin_open`: a pipe nobody writes or closes instead of /dev/null, for tests of the
        SIGTERM path alone (before the fix, /dev/null alone made the daemon stop)."""
        log = log_dir / f"{name}.log"
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE if stdin_open else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if url_line else sink,
                stderr=sink, start_new_session=True, env={**os.environ, TOKEN_ENV: TOKEN, **(env or {})})
        started = cls(name, process, log)
        if url_line:
            try:
                line = await asyncio.wait_for(process.stdout.readline(), 90)
                started.url = json.loads(line)["url"]
            except (TimeoutError, ValueError, KeyError):
                started.kill()
                raise AssertionError(f"{name} printed no URL line: {log.read_text()[-3000:]}") from None
        return started

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self.url)

    async def stays_up(self, probe, seconds: float = ALIVE_SECONDS) -> None:
        """Poll, until `seconds` after its start, that it runs and `probe` answers."""
        while True:
            assert self.process.returncode is None, (
                f"{self.name} exited ({self.process.returncode}) {time.monotonic() - self.started:.1f}s "
                f"after it started: {self.log.read_text()[-3000:]}")
            assert await probe(), f"{self.name} stopped answering"
            if time.monotonic() - self.started >= seconds:
                return
            await asyncio.sleep(0.5)

    async def terminate(self, within: float = STOP_SECONDS) -> tuple[int, float]:
        """SIGTERM; its exit status and how long it took."""
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            self.kill()
            raise AssertionError(f"{self.name} was still running {within:g}s after SIGTERM: "
                                 f"{self.log.read_text()[-3000:]}") from None
        return code, time.monotonic() - began

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def healthy(http: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await http.get(url + "/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


async def checksum(http: httpx.AsyncClient, url: str) -> str:
    answer = await http.post(url + "/weight_checker", json={"action": "checksum"}, headers=AUTH)
    answer.raise_for_status()
    return answer.json()["checksum"]


# -- daemons and the trainer's agent ------------------------------------------------------------

def test_runnable_here_moves_only_the_port_and_the_gpu():
    cpu = not torch.cuda.is_available()
    assert runnable_here(["weightsync", "daemon", "--host=0.0.0.0", "--port=8200", "--backend=nccl",
                          "--device=cuda:0"], 4711)[1:] == [
        "daemon", "--host=0.0.0.0", "--port=4711", f"--backend={'cpu' if cpu else 'nccl'}",
        f"--device={'cpu' if cpu else 'cuda:0'}"]
    assert runnable_here(["weightsync", "daemon", "--host", "0.0.0.0", "--port", "8200", "--backend", "cpu",
                          "--exit-on-stdin-eof"], 4711)[1:] == [
        "daemon", "--host", "0.0.0.0", "--port", "4711", "--backend", "cpu", "--exit-on-stdin-eof"]
    assert runnable_here(["weightsync", "operator", "--all-namespaces", "--standalone",
                          "--liveness=http://0.0.0.0:8080/healthz"], 4711, "--liveness")[1:] == [
        "operator", "--all-namespaces", "--standalone", "--liveness=http://0.0.0.0:4711/healthz"]


async def test_daemons_and_trainer_agent_run_without_a_terminal_sync_and_stop_on_sigterm(tmp_path):
    shipped = {
        "chart-daemon": chart_container({"daemon": {"enabled": True, "syncName": "policy", "backend": "nccl"}},
                                        "daemon"),
        "dockerfile-daemon": dockerfile_cmd("daemon.Dockerfile"),
        "sidecar-daemon": sidecar_example(),
    }
    # The trainer's agent, as `weightsync demo` starts it, minus the flag that ties it to its parent.
    trainer_argv = [sys.executable, "-m", "weightsync_operator.demo.worker", "--role", "trainer", "--backend", "cpu"]
    started = await asyncio.gather(
        Detached.start("trainer", trainer_argv, tmp_path),
        *(Detached.start(name, runnable_here(argv, free_port()), tmp_path) for name, argv in shipped.items()),
        return_exceptions=True)
    parties = [p for p in started if isinstance(p, Detached)]
    try:
        failures = [p for p in started if isinstance(p, BaseException)]
        if failures:
            raise failures[0]
        trainer, *daemons = parties
        async with httpx.AsyncClient(timeout=30) as http:
            await asyncio.gather(*(p.stays_up(lambda p=p: healthy(http, p.url)) for p in parties))

            spec = SyncSpec(master_port=free_port(), packed_buffer_size_bytes=1 << 18, transfer_timeout=20,
                            timeouts=Timeouts(request=10, init=60, start=10, update=60, finish=10))
            async with Coordinator(trainer.endpoint, [d.endpoint for d in daemons], spec, http, TOKEN) as coordinator:
                await coordinator.init()
                result = await coordinator.sync(7)
            assert result.ok, result.reason
            assert [t.weight_version for t in result.targets] == ["7"] * len(daemons)
            sums = [await checksum(http, p.url) for p in parties]
            assert len(set(sums)) == 1, sums

        stopped = await asyncio.gather(*(p.terminate() for p in parties))
        assert [code for code, _ in stopped] == [0] * len(parties), [p.log.read_text()[-2000:] for p in parties]
    finally:
        for p in parties:
            p.kill()


async def _daemon_in_a_round(tmp_path: Path, http: httpx.AsyncClient, *extra: str):
    """A daemon started with the image's argv, joined to a WeightSender's group, with a round
    started and its /update_weights waiting for the trainer's bytes. Its stdin stays open: these
    tests are about SIGTERM alone (the test above covers /dev/null)."""
    argv = runnable_here(dockerfile_cmd("daemon.Dockerfile"), free_port()) + list(extra)
    daemon = await Detached.start("daemon", argv, tmp_path, stdin_open=True)
    group = {"master_address": "127.0.0.1", "master_port": free_port(), "world_size": 2, "timeout_seconds": 30}
    sender, joined = await asyncio.gather(
        asyncio.to_thread(WeightSender.init, group),
        http.post(daemon.url + "/init_weight_transfer_engine", headers=AUTH,
                  json={"init_info": {**group, "rank_offset": 1}}))
    assert joined.status_code == 200, joined.text
    assert (await http.post(daemon.url + "/start_weight_update", headers=AUTH)).status_code == 200
    update = asyncio.create_task(http.post(daemon.url + "/update_weights", headers=AUTH, json={"update_info": {}}))
    return daemon, sender, update


async def test_sigterm_lets_the_round_in_flight_finish_then_exits_0(tmp_path):
    async with httpx.AsyncClient(timeout=60) as http:
        daemon, sender, update = await _daemon_in_a_round(tmp_path, http)
        try:
            assert (await http.get(daemon.url + "/healthz")).json()["phase"] == "updating"
            daemon.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # During its grace period it keeps serving (a round ends on its own terms)...
            while time.monotonic() - signalled < 2.0:
                assert daemon.process.returncode is None, "the daemon left during its grace period"
                health = await http.get(daemon.url + "/healthz")
                assert health.json()["phase"] == "updating", health.text
                await asyncio.sleep(0.1)
            # ...so the trainer's bytes land and the coordinator's finish gets through.
            await asyncio.to_thread(sender.send_weights, NAMED)
            answer = await asyncio.wait_for(update, 30)
            assert answer.status_code == 200, answer.text
            assert daemon.process.returncode is None, "the daemon left during its grace period"
            finish = await http.post(daemon.url + "/finish_weight_update", headers=AUTH,
                                     json={"weight_version": "after-sigterm"})
            assert finish.status_code == 200 and finish.json()["weight_version"] == "after-sigterm", finish.text
            assert await checksum(http, daemon.url) == named_checksum(NAMED)
            # The round over, it exits at once, cleanly.
            assert await asyncio.wait_for(daemon.process.wait(), 15) == 0, daemon.log.read_text()[-3000:]
        finally:
            daemon.kill()
            sender.close()


async def test_a_round_that_cannot_finish_is_abandoned_within_the_grace_period(tmp_path):
    grace = 2.0
    async with httpx.AsyncClient(timeout=60) as http:
        daemon, sender, update = await _daemon_in_a_round(tmp_path, http, f"--shutdown-grace={grace}")
        try:
            # The trainer never sends: the round cannot finish, and stopping may not wait for
            # the collective's own 30 s timeout.
            code, took = await daemon.terminate(within=grace + 15)
            assert code == 0, daemon.log.read_text()[-3000:]
            assert grace <= took, f"left after {took:.1f}s, before its {grace}s grace period"
            assert "abandoning it" in daemon.log.read_text()
            update.cancel()
        finally:
            daemon.kill()
            sender.close()


async def test_a_started_round_that_nothing_drives_is_not_waited_for(tmp_path):
    """start with no update for longer than STARTED_ROUND_WAIT_SECONDS: no coordinator is driving
    the round, so SIGTERM stops at once instead of waiting out a long grace period."""
    from weightsync_daemon.lifecycle import STARTED_ROUND_WAIT_SECONDS

    grace = 120.0
    argv = runnable_here(dockerfile_cmd("daemon.Dockerfile"), free_port()) + [f"--shutdown-grace={grace}"]
    async with httpx.AsyncClient(timeout=60) as http:
        daemon = await Detached.start("daemon", argv, tmp_path, stdin_open=True)
        group = {"master_address": "127.0.0.1", "master_port": free_port(), "world_size": 2}
        sender, joined = await asyncio.gather(
            asyncio.to_thread(WeightSender.init, group),
            http.post(daemon.url + "/init_weight_transfer_engine", headers=AUTH,
                      json={"init_info": {**group, "rank_offset": 1}}))
        try:
            assert joined.status_code == 200, joined.text
            assert (await http.post(daemon.url + "/start_weight_update", headers=AUTH)).status_code == 200
            started = time.monotonic()
            while time.monotonic() - started <= STARTED_ROUND_WAIT_SECONDS:  # the round goes stale
                assert (await http.get(daemon.url + "/healthz")).json()["phase"] == "updating"
                await asyncio.sleep(0.2)
            code, took = await daemon.terminate(within=STOP_SECONDS)
            assert code == 0, daemon.log.read_text()[-3000:]
            assert took < grace / 4, f"waited {took:.1f}s for a round nobody drives"
        finally:
            daemon.kill()
            sender.close()


# -- the operator --------------------------------------------------------------------------------

@pytest.mark.k8s
async def test_operator_runs_without_a_terminal_syncs_and_stops_on_sigterm(tmp_path):
    from helpers.k8s_harness import NAME, NS, Trainer, cluster, spec, start_daemons

    argv = runnable_here(chart_container({}, "operator"), free_port(), "--liveness")
    liveness = next(a.partition("=")[2] for a in argv if a.startswith("--liveness="))
    liveness = liveness.replace("0.0.0.0", "127.0.0.1")
    async with cluster(tmp_path) as c:
        operator = await Detached.start("operator", argv, tmp_path, env={"KUBECONFIG": str(c.kubeconfig)},
                                        url_line=False)
        daemons, trainer = [], None
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                async def live() -> bool:
                    try:
                        return (await http.get(liveness)).status_code == 200
                    except httpx.HTTPError:
                        return False
                deadline = time.monotonic() + 60
                while not await live():
                    assert operator.process.returncode is None, operator.log.read_text()[-3000:]
                    assert time.monotonic() < deadline, "the operator's liveness endpoint never answered"
                    await asyncio.sleep(0.2)
                await operator.stays_up(live)

            await c.create_weightsync(NS, NAME, spec(free_port()))
            daemons, trainer = await asyncio.gather(start_daemons(1), Trainer.start(c, NS, NAME, "trainer-0"))
            await c.create_pod(NS, "trainer-0", "trainer", NAME, trainer.url)
            await c.create_pod(NS, daemons[0].name, "inference", NAME, daemons[0].url, rendezvous_port=free_port())
            assert (await trainer.wait_ready())["ok"]
            pushed = await trainer.push(1)
            assert pushed["ok"], pushed

            code, _ = await operator.terminate()
            assert code == 0, operator.log.read_text()[-3000:]
        finally:
            operator.kill()
            if trainer is not None:
                await trainer.stop()
            for d in daemons:
                await d.stop()


async def test_the_daemons_body_limit_is_set_on_its_command_line(tmp_path):
    """--max-body-bytes reaches the running server: a body over it gets 413 naming the limit."""
    argv = runnable_here(dockerfile_cmd("daemon.Dockerfile"), free_port()) + ["--max-body-bytes", "2KiB"]
    daemon = await Detached.start("daemon", argv, tmp_path, stdin_open=True)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            small = await http.post(daemon.url + "/finish_weight_update", headers=AUTH, json={"weight_version": "x"})
            assert small.status_code == 409, small.text  # read and refused for its phase, not its size
            big = await http.post(daemon.url + "/finish_weight_update", headers=AUTH,
                                  json={"weight_version": "x" * 4096})
            assert big.status_code == 413, big.text
            assert "2048" in big.json()["detail"], big.text
        code, _ = await daemon.terminate()
        assert code == 0
    finally:
        daemon.kill()
