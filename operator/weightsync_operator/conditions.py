"""metav1.Condition bookkeeping: one condition per type, its transition time kept while its status
holds, so `kubectl describe` shows since when a WeightSync has been Ready or Degraded."""

from __future__ import annotations

from typing import Literal

from datetime import datetime, timezone

from weightsync_operator.resource import Condition, ConditionType

MAX_MESSAGE = 32768


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[Condition] | None, type: ConditionType, status: bool, reason: str,
                  message: str, generation: int | None) -> list[Condition]:
    """`conditions` with `type` set; lastTransitionTime changes only when the status does."""
    value: Literal["True", "False"] = "True" if status else "False"
    current = {c.type: c for c in conditions or []}
    previous = current.get(type)
    since = previous.last_transition_time if previous is not None and previous.status == value else now()
    current[type] = Condition(type=type, status=value, reason=reason, message=message[:MAX_MESSAGE],
                              observed_generation=generation, last_transition_time=since)
    order = ("Ready", "Progressing", "Degraded")
    return [current[t] for t in order if t in current]


def get_condition(conditions: list[Condition] | None, type: ConditionType) -> Condition | None:
    return next((c for c in conditions or [] if c.type == type), None)
