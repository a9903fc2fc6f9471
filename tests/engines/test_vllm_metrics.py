"""The weightsync backend inside vLLM is observable like a daemon (issue 16 item 7).

Without vLLM: the backend's metric families are the daemon's (names, types, help, labels), so
the chart's dashboard and alerts read vLLM targets unchanged; failure reasons and the version
gauge follow the daemon's rules; the port is `$WEIGHTSYNC_METRICS_PORT + local rank`.

With a real vLLM server (marker vllm; one server of tensor parallel 2, the tiny model of
test_vllm_e2e): each worker's own metrics port (base, base + 1) is scraped before and after a
round and after a refused round, and the counters and gauges moved as the round did.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from weightsync.errors import IntegrityError, ManifestMismatch, ProtocolError, TransferError
from weightsync.metrics import PHASES
from weightsync_daemon.metrics import DaemonMetrics, numeric_version
from weightsync_operator.local import free_port
from weightsync_vllm import metrics as vm  # imports no vLLM

SCRAPE_DEADLINE_S = 30.0
TP = 2  # two workers: two metrics ports


def _two_free_ports() -> int:
    """A base port whose successor is free too (bounded tries)."""
    import socket

    for _ in range(50):
        base = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", base + 1))
            except OSError:
                continue
        return base
    raise AssertionError("no two consecutive free ports found")
API_KEY = "test-api-key"


def families(text: str) -> dict[str, dict]:
    """name → {type, help, samples: {(sample name, sorted labels): value}}."""
    out = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = {"type": family.type, "help": family.documentation,
                            "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}}
    return out


def test_the_backend_exports_the_daemons_families():
    """Same names, types, help and label sets as a receiver daemon's, series for series (the
    values of time- and vLLM-dependent ones aside)."""
    daemon = families(generate_latest(DaemonMetrics("receiver", "cpu").registry).decode())
    worker = vm.WorkerMetrics(vllm_url="http://127.0.0.1:9")  # nothing listens: version from the count
    worker.joined("cpu")
    backend = families(generate_latest(worker.registry).decode())
    assert backend.keys() == daemon.keys()
    for name in daemon:
        assert backend[name]["type"] == daemon[name]["type"], name
        assert backend[name]["help"] == daemon[name]["help"], name
        assert backend[name]["samples"].keys() == daemon[name]["samples"].keys(), name
    assert backend["weightsync_weights_intact"]["samples"][("weightsync_weights_intact", ())] == 1
    assert backend["weightsync_weight_version"]["samples"][("weightsync_weight_version", ())] == 0


@pytest.mark.parametrize("error, reason", [
    (ManifestMismatch("model.x: not served here"), "manifest_mismatch"),
    (IntegrityError("checksum"), "integrity"),
    (TransferError("trainer gone"), "transfer_error"),
    (ProtocolError("update_info.names", "bad"), "bad_request"),
    (KeyError("?"), "internal"),
])
def test_failure_reasons_follow_the_cause_chain(error, reason):
    """The engine answers vLLM with a RuntimeError caused by the transport's error: the label
    is the cause's."""
    assert vm.failure_reason(error) == reason
    try:
        try:
            raise error
        except BaseException as cause:
            raise RuntimeError("weightsync update failed: ...") from cause
    except RuntimeError as wrapped:
        assert vm.failure_reason(wrapped) == reason
    assert reason in vm.FAILURE_REASONS


@pytest.mark.parametrize("label", ["step-42", "7", "v0010", "no-number", "", None, "x" + "9" * 16])
def test_the_version_number_is_the_daemons(label):
    number = vm.trailing_number(label)
    assert (number if number is not None else -1) == numeric_version(label, -1)


def test_the_port_is_the_base_plus_the_local_rank(monkeypatch):
    monkeypatch.delenv(vm.PORT_ENV, raising=False)
    assert vm.metrics_port(1) is None
    monkeypatch.setenv(vm.PORT_ENV, "8200")
    assert [vm.metrics_port(r) for r in range(4)] == [8200, 8201, 8202, 8203]
    monkeypatch.setenv(vm.PORT_ENV, "eighty")
    with pytest.raises(ValueError, match=vm.PORT_ENV):
        vm.metrics_port(0)
    monkeypatch.setenv(vm.PORT_ENV, "65535")
    with pytest.raises(ValueError, match="worker 1 would listen on 65536"):
        vm.metrics_port(1)


@pytest.mark.integration  # serves the metrics over HTTP
def test_a_taken_port_fails_the_workers_start_naming_it(monkeypatch):
    port = free_port()
    monkeypatch.setenv(vm.PORT_ENV, str(port))
    assert vm.serve(vm.WorkerMetrics(), 0) == port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert "weightsync_weights_intact 1.0" in text
    with pytest.raises(OSError, match=f"cannot listen on port {port}"):
        vm.serve(vm.WorkerMetrics(), 0)


# -- against a real vLLM server ------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory, vllm_python):
    """A trainer (tests/helpers/vllm_trainer.py) and one TP-2 vLLM server whose workers serve
    their metrics on ports of their own (base + local rank), not yet joined."""
    from helpers.vllm_server import Trainer
    from weightsync_operator.demo.vllm_server import VllmServer

    tmp = tmp_path_factory.mktemp("vllm-metrics")
    vllm_port = free_port()
    metrics_port = _two_free_ports()
    trainer = Trainer(vllm_python, tmp, tied=False)
    loop = asyncio.new_event_loop()
    server = None
    try:
        with pytest.MonkeyPatch.context() as patch:  # the server's environment: os.environ + vLLM's
            patch.setenv(vm.PORT_ENV, str(metrics_port))
            patch.setenv(vm.VLLM_URL_ENV, f"http://127.0.0.1:{vllm_port}")
            patch.setenv("VLLM_API_KEY", API_KEY)  # vLLM's --api-key, to see what it guards
            server = loop.run_until_complete(VllmServer.start(
                trainer.model_dir, vllm_port, tmp / "server", tensor_parallel=TP, python=vllm_python,
                timeout=300))
        yield {"trainer": trainer, "server": server,
               "scrape_urls": [f"http://127.0.0.1:{metrics_port + rank}/metrics" for rank in range(TP)]}
    finally:
        trainer.stop()
        if server is not None:
            loop.run_until_complete(server.stop())
        loop.close()


def scrape(url: str) -> dict[str, dict]:
    """One scrape of the worker's port, retried until it answers (bounded)."""
    end = time.monotonic() + SCRAPE_DEADLINE_S
    while True:
        try:
            answer = httpx.get(url, timeout=5)
            answer.raise_for_status()
            return families(answer.text)
        except httpx.HTTPError as error:
            if time.monotonic() > end:
                raise AssertionError(f"no scrape of {url} within {SCRAPE_DEADLINE_S}s: {error}") from error
            time.sleep(0.2)


def value(scraped: dict, family: str, sample: str | None = None, **labels) -> float:
    return scraped[family]["samples"][(sample or family, tuple(sorted(labels.items())))]


@pytest.mark.vllm
def test_vllms_api_key_guards_v1_only_and_its_metrics_lack_the_workers(served):
    """What the README says of vLLM 0.32: --api-key (here VLLM_API_KEY) guards /v1 but not the
    weight-transfer routes, /health or /metrics (the round in the next test is posted without
    a key); vLLM's own /metrics does not carry the workers' weightsync series, which is why the
    backend serves them on a port of its own."""
    url = served["server"].url
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).status_code == 200
    for route in ("/get_world_size", "/weight_info", "/is_paused", "/health", "/metrics"):
        assert httpx.get(f"{url}{route}", timeout=10).status_code == 200, route
    for route in ("/pause", "/resume"):  # a write, unauthenticated, accepted
        assert httpx.post(f"{url}{route}", timeout=30).status_code == 200, route
    assert "weightsync_" not in httpx.get(f"{url}/metrics", timeout=10).text


@pytest.mark.vllm
def test_a_vllm_workers_scrape_moves_with_the_rounds(served):
    """Every worker counts what it received and applied (each TP rank receives the whole
    stream, as a daemon per GPU would), so each is a receiver in the dashboard."""
    trainer, urls = served["trainer"], served["scrape_urls"]
    for before in map(scrape, urls):
        assert value(before, "weightsync_weights_intact") == 1
        assert value(before, "weightsync_info", role="receiver", backend="none") == 1
        assert value(before, "weightsync_weights_bytes") > 0
        for phase in PHASES:
            assert value(before, "weightsync_update_duration_seconds", "weightsync_update_duration_seconds_count",
                         phase=phase) == 0

    from helpers.vllm_server import INIT_FIELDS
    joined = trainer.ask(cmd="init", url=served["server"].url, master_port=free_port(), fields=INIT_FIELDS)
    assert joined["world_size"] == 1 + TP
    pushed = trainer.ask(cmd="round", seed=7, version="step-7")
    for after in map(scrape, urls):
        assert value(after, "weightsync_info", role="receiver", backend="cpu") == 1
        assert value(after, "weightsync_received_bytes", "weightsync_received_bytes_total") == pushed["bytes"] > 0
        assert value(after, "weightsync_updates", "weightsync_updates_total", outcome="success") == 1
        assert value(after, "weightsync_weight_version") == 7  # vLLM's /weight_info says "step-7"
        assert value(after, "weightsync_last_success_timestamp_seconds") > 0
        assert value(after, "weightsync_paused") == 0
        for phase in PHASES:
            assert value(after, "weightsync_update_duration_seconds", "weightsync_update_duration_seconds_count",
                         phase=phase) >= 1, phase

    refused = trainer.ask(cmd="bad_round", kind="unknown_name")
    assert refused["refused"] is not None
    for failed in map(scrape, urls):  # every worker checked the manifest and refused it
        assert value(failed, "weightsync_update_failures", "weightsync_update_failures_total",
                     reason="manifest_mismatch") == 1
        assert value(failed, "weightsync_updates", "weightsync_updates_total", outcome="failure") == 1
        assert value(failed, "weightsync_weights_intact") == 1  # refused before any byte loaded
        assert value(failed, "weightsync_weight_version") == 7
        assert value(failed, "weightsync_received_bytes", "weightsync_received_bytes_total") == pushed["bytes"]

def test_every_series_the_dashboard_and_alerts_read_is_exported_by_a_vllm_worker():
    """The names the Grafana dashboard and the PrometheusRule query (weightsync_*), each one a
    sample name of a vLLM worker's scrape: a vLLM target fills the same panels and alerts."""
    import json
    import re

    from helpers.chart import find, render

    root = Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "charts" / "weightsync" / "dashboards" / "weightsync.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    rule = find(render({"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    exprs += [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    queried = {name for expr in exprs for name in re.findall(r"\bweightsync_[a-z_]+", expr)
               if not name.startswith("weightsync_dev_")}  # the pods' labels, by the ServiceMonitor
    assert {"weightsync_weights_intact", "weightsync_update_failures_total", "weightsync_weight_version"} <= queried
    worker = vm.WorkerMetrics(vllm_url="http://127.0.0.1:9")
    exported = {s.name for family in text_string_to_metric_families(generate_latest(worker.registry).decode())
                for s in family.samples}
    assert queried <= exported, f"not exported by a vLLM worker: {sorted(queried - exported)}"
