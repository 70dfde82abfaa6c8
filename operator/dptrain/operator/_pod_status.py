"""What the trainer pods say that their Job does not: scheduling, disruption, last words.

A Job reports ``Failed`` or ``Complete``; why its pods never started, whether a failure came
from a preemption or a node drain, and what the trainer printed last are on the pods. The
reconciler lists the job's trainer pods (by label, server-side) and :func:`pods_view` reads them:

- ``PodScheduled=False`` with reason ``Unschedulable`` carries the scheduler's message
  ("0/3 nodes are available: 3 Insufficient google.com/tpu ..."): the job reports it in its
  ``PodsScheduled`` condition rather than looking ``Running`` and later ``Stalled``;
- ``DisruptionTarget=True`` (preemption, eviction, node drain, taint manager): a restart that
  follows is not the trainer's fault and does not count against ``spec.maxRestarts``;
- a terminated trainer container's ``message`` (with ``FallbackToLogsOnError``, its last log
  lines when it wrote none) goes into the failure condition, shortened.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

MESSAGE_LIMIT = 1024
"""Characters of a container's termination message copied into a condition."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PodsView:
    """The trainer pods of the current workload, as the decision needs them.

    Attributes:
        total: pods listed.
        scheduled: pods bound to a node.
        unschedulable: ``(pod, scheduler message)`` of pods the scheduler cannot place.
        disrupted: pods with ``DisruptionTarget=True``.
        termination: the first failed trainer container's exit (code, reason, message).
    """

    total: int = 0
    scheduled: int = 0
    unschedulable: tuple[tuple[str, str], ...] = ()
    disrupted: tuple[str, ...] = ()
    termination: str | None = None


def _conditions(pod: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in (pod.get("status") or {}).get("conditions") or []}


def _termination(pod: Mapping[str, Any]) -> str | None:
    """``exit N (Reason): message`` of a container that terminated with a failure."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = (status.get("state") or {}).get("terminated") or (
            status.get("lastState") or {}).get("terminated")
        if not state or int(state.get("exitCode") or 0) == 0:
            continue
        head = f"exit {state.get('exitCode')}"
        if state.get("reason"):
            head += f" ({state['reason']})"
        message = " ".join(str(state.get("message") or "").split())
        if len(message) > MESSAGE_LIMIT:
            message = "…" + message[-MESSAGE_LIMIT:]  # the end says why it stopped
        return f"{head}: {message}" if message else head
    return None


def pods_view(pods: Iterable[Mapping[str, Any]]) -> PodsView:
    """Read the trainer pods (a list response's ``items``) into a :class:`PodsView`."""
    total = scheduled = 0
    unschedulable: list[tuple[str, str]] = []
    disrupted: list[str] = []
    termination: str | None = None
    for pod in sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("name", ""))):
        if (pod.get("metadata") or {}).get("deletionTimestamp") and (
                pod.get("status") or {}).get("phase") not in ("Failed", "Succeeded"):
            continue  # going away: neither placed nor failed
        name = str((pod.get("metadata") or {}).get("name", ""))
        total += 1
        conditions = _conditions(pod)
        placed = conditions.get("PodScheduled")
        if (placed is not None and placed.get("status") == "True") or (
                pod.get("spec") or {}).get("nodeName"):
            scheduled += 1
        elif placed is not None and placed.get("reason") == "Unschedulable":
            unschedulable.append((name, " ".join(str(placed.get("message") or "").split())))
        target = conditions.get("DisruptionTarget")
        if target is not None and target.get("status") == "True":
            disrupted.append(name)
        if termination is None:
            termination = _termination(pod)
    return PodsView(total=total, scheduled=scheduled, unschedulable=tuple(unschedulable),
                    disrupted=tuple(disrupted), termination=termination)
