"""The weightsync metric families, one definition for every kind of party.

A weightsync daemon and the weightsync backend inside a vLLM worker export the same families
with the same names, types and labels, so the chart's Grafana dashboard and PrometheusRule read
either unchanged. Each party keeps them in a registry of its own, so that several can live in
one process (tests, a trainer that also serves). prometheus_client only: no HTTP server here;
each party serves its registry its own way.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from weightsync.errors import IntegrityError, ManifestMismatch, PhaseError, ProtocolError, TransferError

PHASES = ("init", "start", "update", "finish")
FAILURE_REASONS = ("manifest_mismatch", "integrity", "transfer_error", "bad_request", "conflict", "internal")
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MAX_GAUGE_DIGITS = 15  # a float gauge holds integers this long exactly


def failure_reason(error: BaseException, bad_request: tuple[type[BaseException], ...] = (ProtocolError,)) -> str:
    """The bounded `reason` label of an error: that of the first error in its `raise ... from`
    chain that says more than "internal" (an engine may re-raise a round's error as the message
    its host answers with, caused by the transport's). `bad_request`: the error types that mean
    the caller's input was wrong."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        match current:
            case IntegrityError():
                return "integrity"
            case ManifestMismatch():
                return "manifest_mismatch"
            case TransferError():
                return "transfer_error"
            case PhaseError():
                return "conflict"
        if isinstance(current, bad_request):
            return "bad_request"
        current = current.__cause__
    return "internal"


def trailing_number(label: str | None) -> int | None:
    """The number a version label ends in ("step-42" → 42, "7" → 7), or None (none, or too long
    for the gauge). One backwards scan over ASCII digits: linear in the label."""
    label = label or ""
    start = len(label)
    while start > 0 and "0" <= label[start - 1] <= "9":
        start -= 1
    digits = label[start:]
    if not digits or len(digits.lstrip("0")) > MAX_GAUGE_DIGITS:
        return None
    return int(digits)


def numeric_version(label: str | None, fallback: int) -> int:
    """`trailing_number(label)`, or `fallback` where the label has none."""
    number = trailing_number(label)
    return fallback if number is None else number


class WeightsyncMetrics:
    """Every weightsync metric family, in a registry of its own, with every label value
    pre-created (a series that exists at 0 lets `increase()` see its first event)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
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
        self.updates = Counter("weightsync_updates", "Weight updates by outcome.", ["outcome"], registry=r)
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
        for phase in PHASES:
            self.phase_seconds.labels(phase=phase)
        for outcome in ("success", "failure"):
            self.updates.labels(outcome=outcome)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason=reason)

    def set_info(self, role: str, backend: str) -> None:
        self.info.clear()
        self.info.labels(role=role, backend=backend).set(1)
