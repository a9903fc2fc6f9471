"""The daemon's Prometheus metrics, each in its own registry so that several apps can live in
one process (tests, or a trainer that also serves)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PHASES = ("init", "start", "update", "finish")
FAILURE_REASONS = ("manifest_mismatch", "integrity", "transfer_error", "bad_request", "conflict", "internal")
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class DaemonMetrics:
    def __init__(self, role: str, backend: str):
        self.registry = CollectorRegistry()
        r = self.registry
        self.phase_seconds = Histogram(
            "weightsync_update_duration_seconds", "Time spent in each protocol phase.",
            ["phase"], buckets=DURATION_BUCKETS, registry=r)
        self.received_bytes = Counter(
            "weightsync_received_bytes", "Payload bytes received from the trainer.", registry=r)
        self.sent_bytes = Counter(
            "weightsync_sent_bytes", "Payload bytes sent to receivers (trainer role).", registry=r)
        self.weight_version = Gauge(
            "weightsync_weight_version", "Numeric weight version now live (the label's trailing number).",
            registry=r)
        self.updates = Counter(
            "weightsync_updates", "Weight updates by outcome.", ["outcome"], registry=r)
        self.failures = Counter(
            "weightsync_update_failures", "Failed protocol calls by reason.", ["reason"], registry=r)
        self.last_success = Gauge(
            "weightsync_last_success_timestamp_seconds", "Unix time of the last applied update.", registry=r)
        self.paused = Gauge("weightsync_paused", "1 while generation is paused for a sync.", registry=r)
        self.weights_bytes = Gauge("weightsync_weights_bytes", "Bytes of weights held.", registry=r)
        self.weights_intact = Gauge(
            "weightsync_weights_intact",
            "0 while the weights hold part of a failed round (non-atomic receive), else 1.", registry=r)
        self.weights_intact.set(1)
        self.info = Gauge("weightsync_info", "Constant 1, labelled with the daemon's role and backend.",
                          ["role", "backend"], registry=r)
        self.info.labels(role=role, backend=backend).set(1)
        for phase in PHASES:
            self.phase_seconds.labels(phase=phase)
        for outcome in ("success", "failure"):
            self.updates.labels(outcome=outcome)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason=reason)


MAX_GAUGE_DIGITS = 15  # a float gauge holds integers this long exactly


def numeric_version(label: str | None, fallback: int) -> int:
    """The number a version label ends in ("step-42" → 42, "7" → 7), else `fallback`.

    One backwards scan over ASCII digits, so linear in the label (labels are at most
    models.MAX_VERSION_LENGTH long anyway); a number too long for the gauge is `fallback` too."""
    label = label or ""
    start = len(label)
    while start > 0 and "0" <= label[start - 1] <= "9":
        start -= 1
    digits = label[start:].lstrip("0") or label[start:][-1:]
    if not digits or len(digits) > MAX_GAUGE_DIGITS:
        return fallback
    return int(digits)
