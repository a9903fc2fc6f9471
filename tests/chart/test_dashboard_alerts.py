"""The alerts' behaviour, evaluated by Prometheus' own rule engine: `promtool check rules` on the
rendered PrometheusRule (expressions and annotation templates), then `promtool test rules` with
series shaped like the daemons' metrics: each alert fires when it should, after its `for`, and
stays quiet otherwise."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import helm_python
import pytest
import yaml

pytestmark = [pytest.mark.chart,
              pytest.mark.skipif(shutil.which("promtool") is None,
                                 reason="promtool is not installed (Debian: apt-get install prometheus)")]

CHART = Path(__file__).resolve().parents[2] / "charts" / "weightsync"
SERIES = 'job="weightsync", namespace="ml", weightsync_dev_sync="policy"'


def rule_groups() -> list[dict]:
    files = helm_python.Chart.load(CHART).render({"metrics": {"prometheusRule": {"enabled": True}}},
                                                 name="ws", namespace="ml")
    return yaml.safe_load(files["weightsync/templates/prometheusrule.yaml"])["spec"]["groups"]


def promtool(*args: str, cwd: Path) -> None:
    done = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def expect(name: str, at: str, *labels: dict) -> dict:
    """The alert `name` firing at `at` for each label set (none: it must not fire)."""
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": dict(label_set)} for label_set in labels]}


def test_rules_pass_promtool_check(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    promtool("check", "rules", "rules.yaml", cwd=tmp_path)


def test_alerts_fire_when_they_should_and_only_then(tmp_path):
    groups = rule_groups()
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations")  # promtool would compare them verbatim; check_rules covers their templates
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    d0, d1 = ({"job": "weightsync", "namespace": "ml", "weightsync_dev_sync": "policy", "pod": p} for p in ("d0", "d1"))
    tests = [
        {  # a failed round at minute 3: alert while it is within the 10m window, quiet after
            "interval": "1m",
            "input_series": [
                {"series": f'weightsync_updates_total{{{SERIES}, pod="d0", outcome="failure"}}',
                 "values": "0 0 0 1 1x20"},
                {"series": f'weightsync_updates_total{{{SERIES}, pod="d1", outcome="failure"}}', "values": "0x24"}],
            "alert_rule_test": [
                expect("WeightSyncSyncsFailing", "2m"),
                expect("WeightSyncSyncsFailing", "5m",
                       {"namespace": "ml", "weightsync_dev_sync": "policy", "pod": "d0", "severity": "warning"}),
                expect("WeightSyncSyncsFailing", "20m")],
        },
        {  # d1 stays two versions behind: pending for 10m, then firing; back in step, quiet
            "interval": "1m",
            "input_series": [
                {"series": f'weightsync_weight_version{{{SERIES}, pod="trainer"}}', "values": "5x30"},
                {"series": f'weightsync_weight_version{{{SERIES}, pod="d0"}}', "values": "5x30"},
                {"series": f'weightsync_weight_version{{{SERIES}, pod="d1"}}', "values": "3x15 5x15"}],
            "alert_rule_test": [
                expect("WeightSyncVersionSkew", "5m"),
                expect("WeightSyncVersionSkew", "12m",
                       {"namespace": "ml", "weightsync_dev_sync": "policy", "severity": "warning"}),
                expect("WeightSyncVersionSkew", "28m")],
        },
        {  # d1 stays behind (left out of the rounds) from minute 2 to 24, d0 only for 5 minutes
            # (a wave that took a while); the trainer is never a stale target: firing for d1 alone
            "interval": "1m",
            "input_series": [
                {"series": f'weightsync_weight_version{{{SERIES}, pod="trainer", weightsync_dev_role="trainer"}}',
                 "values": "5 5 6x30"},
                {"series": f'weightsync_weight_version{{{SERIES}, pod="d0", weightsync_dev_role="inference"}}',
                 "values": "5 5 5x5 6x25"},
                {"series": f'weightsync_weight_version{{{SERIES}, pod="d1", weightsync_dev_role="inference"}}',
                 "values": "5 5 5x22 6x10"}],
            "alert_rule_test": [
                expect("WeightSyncTargetStale", "10m"),
                expect("WeightSyncTargetStale", "20m",
                       {**d1, "weightsync_dev_role": "inference", "severity": "warning"}),
                expect("WeightSyncTargetStale", "30m")],
        },
        {  # the last success at t=60s; nothing after: firing once 30 minutes (+ for 2m) have passed.
            # A party that never synced (timestamp 0) is no reason by itself.
            "interval": "1m",
            "input_series": [
                {"series": f'weightsync_last_success_timestamp_seconds{{{SERIES}, pod="d0"}}', "values": "0 60x45"},
                {"series": 'weightsync_last_success_timestamp_seconds{job="weightsync", namespace="ml", '
                           'weightsync_dev_sync="fresh", pod="x"}', "values": "0x45"}],
            "alert_rule_test": [
                expect("WeightSyncNoRecentSuccess", "20m"),
                expect("WeightSyncNoRecentSuccess", "32m"),
                expect("WeightSyncNoRecentSuccess", "35m",
                       {"namespace": "ml", "weightsync_dev_sync": "policy", "severity": "warning"})],
        },
        {  # d1 stops answering scrapes at minute 2: firing after 5 minutes down
            "interval": "1m",
            "input_series": [
                {"series": f'up{{{SERIES}, pod="d0"}}', "values": "1x12"},
                {"series": f'up{{{SERIES}, pod="d1"}}', "values": "1 1 0x10"}],
            "alert_rule_test": [
                expect("WeightSyncDaemonDown", "4m"),
                expect("WeightSyncDaemonDown", "8m", {**d1, "severity": "critical"})],
        },
        {  # d0's round failed part-way at minute 1 and the next one succeeded at minute 9
            "interval": "1m",
            "input_series": [
                {"series": f'weightsync_weights_intact{{{SERIES}, pod="d0"}}', "values": "1 0x8 1x5"},
                {"series": f'weightsync_weights_intact{{{SERIES}, pod="trainer"}}', "values": "1x14"}],
            "alert_rule_test": [
                expect("WeightSyncPartialWeights", "3m"),
                expect("WeightSyncPartialWeights", "7m", {**d0, "severity": "critical"}),
                expect("WeightSyncPartialWeights", "12m")],
        },
    ]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                         "tests": tests}))
    promtool("test", "rules", "tests.yaml", cwd=tmp_path)
