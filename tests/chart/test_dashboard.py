"""The Grafana dashboard and the PrometheusRule: their PromQL parses, and every metric, label and
label value they select is one a live daemon really exports. A trainer agent and a standalone
daemon run as real processes, a coordinator drives a real round through them, and both are
scraped."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import helm_python
import httpx
import promql_parser
import pytest
import pytest_asyncio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from weightsync_operator.coordinator import Coordinator, SyncSpec, Timeouts

pytestmark = pytest.mark.chart

CHART = Path(__file__).resolve().parents[2] / "charts" / "weightsync"
DASHBOARD = json.loads((CHART / "dashboards" / "weightsync.json").read_text())
TOKEN = "dashboard-test-token"
# Grafana's built-in variables, as Grafana substitutes them before the query reaches Prometheus.
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__range": "3h", "$__interval": "15s"}
# Labels Prometheus adds to every series it scrapes through the chart's ServiceMonitor
# (Kubernetes service discovery), besides the pod labels it copies (podTargetLabels).
DISCOVERY_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
# Series Prometheus itself writes for each target.
SYNTHETIC_SERIES = {"up"}


def render_rules(values: dict | None = None) -> tuple[list[dict], dict]:
    """The PrometheusRule's rules and the ServiceMonitor, rendered by Helm."""
    rule = {"enabled": True, **(values or {})}
    files = helm_python.Chart.load(CHART).render(
        {"metrics": {"prometheusRule": rule, "serviceMonitor": {"enabled": True}}}, name="ws", namespace="ml")
    docs = [yaml.safe_load(files[f"weightsync/templates/{name}.yaml"]) for name in ("prometheusrule", "servicemonitor")]
    return [r for g in docs[0]["spec"]["groups"] for r in g["rules"]], docs[1]


def target_labels(monitor: dict) -> set[str]:
    """Label names on every scraped series: discovery's plus the pod labels the ServiceMonitor
    copies, sanitised the way Prometheus does (weightsync.dev/sync -> weightsync_dev_sync)."""
    return DISCOVERY_LABELS | {re.sub(r"[^a-zA-Z0-9_]", "_", label) for label in monitor["spec"]["podTargetLabels"]}


def panel_queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in DASHBOARD["panels"] for target in panel["targets"]]


def variable_queries() -> list[tuple[str, str]]:
    """The series selector inside each `label_values(selector, label)` variable query."""
    found = []
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert match, f"variable {var['name']}: unexpected query {var['query']['query']}"
            found.append((f"variable {var['name']}", match.group(1)))
    return found


def all_queries() -> list[tuple[str, str]]:
    rules, _ = render_rules()
    return panel_queries() + variable_queries() + [(r["alert"], r["expr"]) for r in rules]


def parse(expr: str):
    for name, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(name, value)
    return promql_parser.parse(expr)


OPERATORS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}


def selected(expr: str) -> tuple[list[tuple[str, list[tuple[str, str, str]]]], set[str]]:
    """(metric name, matchers) of every series selector, and every label named in a by/on clause."""
    selectors, grouping = [], set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append((node.name, [(m.name, OPERATORS[str(m.op)], m.value) for m in node.matchers.matchers]))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                grouping.update(node.modifier.matching.labels)
            grouping.update(node.modifier.group_labels or [])

    promql_parser.walk(parse(expr), visit)
    return selectors, grouping


# -- the dashboard's shape ----------------------------------------------------------------

def test_every_query_is_valid_promql():
    queries = all_queries()
    assert len(queries) >= 20
    for where, expr in queries:
        try:
            parse(expr)
        except Exception as error:  # the parser's own error type is not exported
            pytest.fail(f"{where}: {error}\n{expr}")


def test_dashboard_has_a_datasource_variable_used_by_every_panel():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    for name in ("job", "namespace", "sync"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_has_a_unit_and_a_description():
    for panel in DASHBOARD["panels"]:
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"
        assert panel.get("description"), f"{panel['title']} has no description"


def test_every_query_honours_the_dashboard_filters():
    for title, expr in panel_queries():
        selectors, _ = selected(expr)
        for name, matchers in selectors:
            if name == "weightsync_info" and ("role", "=", "trainer") in matchers:
                continue  # the join that counts each round once; filtered on the left side
            assert {m[0] for m in matchers} >= {"job", "namespace", "weightsync_dev_sync"}, f"{title}: {name}"


def _panel(title: str) -> dict:
    (panel,) = [p for p in DASHBOARD["panels"] if p["title"] == title]
    return panel


def test_dashboard_answers_the_questions_it_is_for():
    duration = [t["expr"] for t in _panel("Sync duration by phase (p50, p95)")["targets"]]
    quantiles = zip(duration, ("0.5", "0.95"), strict=False)
    assert [e.startswith(f"histogram_quantile({q},") for e, q in quantiles] == [True, True]
    assert all(selected(e)[1] == {"le", "phase"} for e in duration)
    assert _panel("Sync duration by phase (p50, p95)")["fieldConfig"]["defaults"]["unit"] == "s"
    throughput = _panel("Transfer throughput")
    assert throughput["fieldConfig"]["defaults"]["unit"] == "Bps"
    assert {s[0] for t in throughput["targets"] for s in selected(t["expr"])[0]} >= {
        "weightsync_received_bytes_total", "weightsync_sent_bytes_total"}
    skew = _panel("Versions behind the newest, per party")
    assert skew["type"] == "bargauge" and skew["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"] == 1
    assert "weightsync_weight_version" in _panel("Weight version per party")["targets"][0]["expr"]
    failures = _panel("Failures by reason")["targets"][0]["expr"]
    assert selected(failures)[1] == {"reason"} and "weightsync_update_failures_total" in failures
    fleet = [t["expr"] for t in _panel("Targets synced and stale, per WeightSync")["targets"]]
    assert [" == on (" in fleet[0], " < on (" in fleet[1]] == [True, True]
    assert all(e.startswith("count by (namespace, weightsync_dev_sync) (") and 'role!="trainer"' in e for e in fleet)
    since = _panel("Since last successful sync")
    assert since["fieldConfig"]["defaults"]["unit"] == "s"
    assert "weightsync_last_success_timestamp_seconds" in since["targets"][0]["expr"]


# -- alerts -------------------------------------------------------------------------------

def test_alerts_cover_failures_skew_staleness_down_daemons_and_partial_weights():
    rules, _ = render_rules()
    by_name = {r["alert"]: r for r in rules}
    assert set(by_name) == {"WeightSyncSyncsFailing", "WeightSyncVersionSkew", "WeightSyncNoRecentSuccess",
                            "WeightSyncDaemonDown", "WeightSyncPartialWeights", "WeightSyncTargetStale"}
    assert 'weightsync_dev_role!="trainer"' in by_name["WeightSyncTargetStale"]["expr"]
    assert by_name["WeightSyncTargetStale"]["for"] == "15m"
    for rule in rules:
        assert rule["labels"]["severity"] and rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert 'outcome="failure"' in by_name["WeightSyncSyncsFailing"]["expr"]
    assert "[10m]" in by_name["WeightSyncSyncsFailing"]["expr"]
    assert by_name["WeightSyncNoRecentSuccess"]["expr"].endswith("> 1800")
    assert by_name["WeightSyncDaemonDown"]["expr"] == 'up{job="weightsync"} == 0'
    assert by_name["WeightSyncDaemonDown"]["labels"]["severity"] == "critical"


def test_alert_thresholds_and_labels_come_from_values():
    rules, _ = render_rules({
        "alertLabels": {"team": "rl"},
        "syncsFailing": {"window": "30m", "severity": "critical"},
        "versionSkew": {"maxVersions": 2, "for": "15m", "severity": "info"},
        "noRecentSuccess": {"minutes": 45, "severity": "critical"},
        "daemonDown": {"for": "1m", "severity": "warning"},
        "partialWeights": {"for": "2m", "severity": "warning"},
        "targetStale": {"for": "30m", "severity": "critical"}})
    by_name = {r["alert"]: r for r in rules}
    assert "[30m]" in by_name["WeightSyncSyncsFailing"]["expr"]
    assert by_name["WeightSyncSyncsFailing"]["labels"] == {"severity": "critical", "team": "rl"}
    assert by_name["WeightSyncVersionSkew"]["expr"].endswith("> 2") and by_name["WeightSyncVersionSkew"]["for"] == "15m"
    assert by_name["WeightSyncNoRecentSuccess"]["expr"].endswith("> 2700")
    assert by_name["WeightSyncDaemonDown"]["for"] == "1m"
    assert by_name["WeightSyncPartialWeights"]["for"] == "2m"
    assert by_name["WeightSyncPartialWeights"]["labels"]["severity"] == "warning"
    assert by_name["WeightSyncTargetStale"]["for"] == "30m"
    assert by_name["WeightSyncTargetStale"]["labels"]["severity"] == "critical"
    assert all(r["labels"]["team"] == "rl" for r in rules)
    assert all("{{ $labels." in r["annotations"]["description"] for r in rules)  # Prometheus templates survive Helm


# -- against a live daemon ----------------------------------------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(module_spawn, rendezvous_port) -> dict[str, list[tuple[dict, float]]]:
    """Run a real round (trainer agent + standalone daemon), then scrape both: {sample name:
    [(labels, value) per party and label set]}."""
    env = {**os.environ, "WEIGHTSYNC_AUTH_TOKEN": TOKEN}
    trainer, daemon = await asyncio.gather(
        module_spawn("trainer", "--role", "trainer", module="weightsync_operator.demo.worker", env=env),
        module_spawn("daemon", "--port", "0", "--backend", "cpu", env=env))
    spec = SyncSpec(master_port=rendezvous_port, packed_buffer_size_bytes=1 << 20, transfer_timeout=20,
                    timeouts=Timeouts(request=5, init=30, start=10, update=30, finish=10))
    async with httpx.AsyncClient(timeout=30) as http:
        async with Coordinator(trainer.endpoint, [daemon.endpoint], spec, http, token=TOKEN) as coordinator:
            await coordinator.init()
            result = await coordinator.sync("step-7")
            assert result.ok, result.reason
        samples: dict[str, list[tuple[dict, float]]] = {}
        for party in (trainer, daemon):
            text = (await http.get(party.url + "/metrics")).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


@pytest.fixture(scope="module")
def scraped(live) -> dict[str, dict[str, set[str]]]:
    """{sample name: {label name: values seen}} over both parties."""
    series: dict[str, dict[str, set[str]]] = {}
    for name, samples in live.items():
        labels = series.setdefault(name, {})
        for sample_labels, _ in samples:
            for key, value in sample_labels.items():
                labels.setdefault(key, set()).add(value)
    return series


def test_the_live_round_shows_in_the_metrics(live, scraped):
    assert [value for _, value in live["weightsync_weight_version"]] == [7, 7]  # "step-7" on both parties
    assert [v for labels, v in live["weightsync_updates_total"] if labels["outcome"] == "success"] == [1, 1]
    (received,) = [v for _, v in live["weightsync_received_bytes_total"] if v]
    (sent,) = [v for _, v in live["weightsync_sent_bytes_total"] if v]
    assert received == sent > 0
    assert scraped["weightsync_info"]["role"] == {"trainer", "receiver"}
    assert scraped["weightsync_update_duration_seconds_bucket"]["phase"] >= {"init", "start", "update", "finish"}


def test_queries_select_only_what_a_live_daemon_exports(scraped):
    _, monitor = render_rules()
    added = target_labels(monitor)
    for where, expr in all_queries():
        selectors, grouping = selected(expr)
        for name, matchers in selectors:
            if name in SYNTHETIC_SERIES:
                assert {m[0] for m in matchers} <= added, f"{where}: {name} selects a label Prometheus never adds"
                continue
            assert name in scraped, f"{where}: {name} is not exported by the daemon or the trainer agent"
            exported = scraped[name]
            for label, op, value in matchers:
                if label in added:
                    continue
                assert label in exported, f"{where}: {name} has no label {label}"
                if op == "=":
                    assert value in exported[label], f"{where}: {name}{{{label}={value!r}}} never occurs"
        exported_labels = {label for series in scraped.values() for label in series} | {"le"}
        assert grouping <= exported_labels | added, \
            f"{where}: groups by unknown labels {grouping - exported_labels - added}"
