"""Kubernetes-style conditions: one per type, ``lastTransitionTime`` kept while status holds."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from dptrain.api import Condition


def timestamp(now: dt.datetime) -> str:
    """RFC 3339 in UTC with second precision, as the API server writes times."""
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> dt.datetime | None:
    """Parse an RFC 3339 timestamp (None if absent or unreadable)."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def find(conditions: Sequence[Condition], type_: str) -> Condition | None:
    """The condition of a type, if present."""
    return next((c for c in conditions if c.type == type_), None)


def set_condition(conditions: Sequence[Condition], *, type_: str, status: str, reason: str,
                  message: str, now: dt.datetime, generation: int | None = None
                  ) -> tuple[list[Condition], bool]:
    """Set one condition; returns the new list and whether (status, reason, message) changed.

    The ``lastTransitionTime`` moves only when ``status`` changes, as Kubernetes prescribes.
    """
    old = find(conditions, type_)
    if (old is not None and old.status == status and old.reason == reason
            and old.message == message and old.observed_generation == generation):
        return list(conditions), False
    changed = old is None or (old.status, old.reason, old.message) != (status, reason, message)
    transition = (old.last_transition_time if old is not None and old.status == status
                  and old.last_transition_time else timestamp(now))
    new = Condition.model_validate({
        "type": type_, "status": status, "reason": reason, "message": message,
        "lastTransitionTime": transition, "observedGeneration": generation})
    if old is None:
        return [*conditions, new], changed
    return [new if c.type == type_ else c for c in conditions], changed
