"""High availability: several operator replicas, one active, through kopf peering.

kopf's peering is a priority protocol, not leader election: every replica writes a keep-alive
(``priority``, ``lifetime``, ``lastseen``) under its identity in the ``status`` of a
``ClusterKopfPeering`` (or, for namespaced operators, a ``KopfPeering`` in each namespace); a
replica that sees a live peer with a higher priority pauses its watches, and replicas with the
*same* priority all pause (kopf cannot tell which should win). So replicas must not share a
priority. By default a replica's priority is derived from its start time, older first
(:func:`start_time_priority`): the running replica stays active when another starts (a rolling
update or a replacement pod never steals the work), and the oldest survivor takes over when the
active one goes.

Takeover: a replica that exits cleanly removes its keep-alive at once; one that dies (SIGKILL,
node loss) is considered gone when its ``lastseen + lifetime`` passes. With the default lifetime
of 15 s (keep-alives every 5-10 s) a standby takes over at most ~15 s after the active replica's
last keep-alive, plus one watch event.

kopf pauses its own watches and timers but not work an operator schedules itself (our requeues).
:func:`standing_by` states kopf's rule on the peering object so the reconciler can check it
before acting on a self-scheduled requeue.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import secrets
import socket
import time
from collections.abc import Mapping
from typing import Any

PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"
DEFAULT_LIFETIME = 15
"""Seconds a keep-alive stays valid (kopf's default, 60 s, would exceed our 30 s takeover)."""


def start_time_priority(now_ns: int | None = None) -> int:
    """A priority that ranks earlier-started replicas higher (microseconds before 2100)."""
    epoch_2100_us = 4_102_444_800_000_000
    started_us = (time.time_ns() if now_ns is None else now_ns) // 1000
    return epoch_2100_us - started_us


def own_identity() -> str:
    """This replica's peering identity: the pod name (``POD_ID``, as kopf reads it) or host/pid."""
    pod = os.environ.get("POD_ID")
    if pod:
        return pod
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


def peering_path(name: str, namespace: str | None) -> str:
    """API path of the peering object: cluster-wide, or the one in ``namespace``."""
    base = f"/apis/{PEERING_GROUP}/{PEERING_VERSION}"
    if namespace is None:
        return f"{base}/clusterkopfpeerings/{name}"
    return f"{base}/namespaces/{namespace}/kopfpeerings/{name}"


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def standing_by(peering: Mapping[str, Any] | None, identity: str, priority: int,
                now: dt.datetime) -> bool:
    """Whether kopf keeps this replica paused: a live peer with a priority ≥ ours exists.

    A peer is live until ``lastseen + lifetime``; a missing or unreadable peering object means
    no peers (kopf then pauses only when peering is mandatory and the resource is not served,
    which the caller sees as an API error instead).
    """
    for peer_id, info in ((peering or {}).get("status") or {}).items():
        if peer_id == identity or not isinstance(info, Mapping):
            continue
        lastseen = _parse_time(info.get("lastseen"))
        try:
            lifetime = int(info.get("lifetime", 60))
            peer_priority = int(info.get("priority", 0))
        except (TypeError, ValueError):
            continue
        if lastseen is None or lastseen + dt.timedelta(seconds=lifetime) <= now:
            continue  # dead: kopf ignores it (and cleans it up)
        if peer_priority >= priority:
            return True
    return False


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeeringIdentity:
    """How this replica takes part in peering.

    Attributes:
        name: the peering object's name (``--peering``).
        identity: this replica's key in the peering object's status.
        priority: this replica's priority (higher wins).
        clusterwide: the operator serves all namespaces (ClusterKopfPeering) or some
            (a KopfPeering in each).
        lifetime: seconds a keep-alive stays valid.
    """

    name: str
    identity: str
    priority: int
    clusterwide: bool
    lifetime: int = DEFAULT_LIFETIME

    def path(self, namespace: str) -> str:
        """The peering object that governs work in ``namespace``."""
        return peering_path(self.name, None if self.clusterwide else namespace)


def peering_object(name: str, namespace: str | None) -> dict[str, Any]:
    """The (empty) peering object the replicas share; the operator creates it if missing."""
    if namespace is None:
        return {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": "ClusterKopfPeering",
                "metadata": {"name": name}}
    return {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": "KopfPeering",
            "metadata": {"name": name, "namespace": namespace}}


def collection_path(namespace: str | None) -> str:
    """Where peering objects are created."""
    base = f"/apis/{PEERING_GROUP}/{PEERING_VERSION}"
    if namespace is None:
        return f"{base}/clusterkopfpeerings"
    return f"{base}/namespaces/{namespace}/kopfpeerings"
