"""The peering rule the reconciler applies to its own requeues (pure parts, no cluster)."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from dptrain.operator._peering import (
    PeeringIdentity,
    peering_path,
    standing_by,
    start_time_priority,
)
from dptrain.operator._reconciler import Reconciler, ReconcilerConfig

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def peer(priority, seconds_ago, lifetime=15):
    seen = (NOW - dt.timedelta(seconds=seconds_ago)).isoformat()
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen}


def test_a_live_peer_with_higher_or_equal_priority_keeps_us_standing_by():
    body = {"status": {"me": peer(10, 0), "other": peer(20, 5)}}
    assert standing_by(body, "me", 10, NOW)
    body["status"]["other"] = peer(10, 5)  # equal: kopf pauses both
    assert standing_by(body, "me", 10, NOW)
    body["status"]["other"] = peer(5, 5)  # lower: we are active
    assert not standing_by(body, "me", 10, NOW)


def test_a_dead_peer_is_ignored_from_the_end_of_its_lifetime():
    assert standing_by({"status": {"other": peer(20, 14.9)}}, "me", 10, NOW)
    assert not standing_by({"status": {"other": peer(20, 15)}}, "me", 10, NOW)
    assert not standing_by({"status": {"other": {"priority": "x"}}}, "me", 10, NOW)
    assert not standing_by(None, "me", 10, NOW)


def test_older_replicas_have_higher_priorities():
    first, later = start_time_priority(10**18), start_time_priority(10**18 + 1000)
    assert first - later == 1  # one microsecond apart is enough to differ
    assert start_time_priority() > 0


def test_paths_follow_the_operator_scope():
    assert peering_path("p", None) == "/apis/kopf.dev/v1/clusterkopfpeerings/p"
    assert peering_path("p", "ns") == "/apis/kopf.dev/v1/namespaces/ns/kopfpeerings/p"
    ident = PeeringIdentity(name="p", identity="me", priority=1, clusterwide=False)
    assert ident.path("team") == "/apis/kopf.dev/v1/namespaces/team/kopfpeerings/p"


class _Client:
    def __init__(self, peering):
        self.peering = peering
        self.paths: list[str] = []

    async def get(self, path):
        self.paths.append(path)
        return self.peering if "kopfpeerings" in path else None

    async def close(self):
        pass


def test_a_standing_by_replica_drops_its_own_requeues_but_not_kopf_triggers():
    now = dt.datetime.now(dt.UTC)
    active = {"priority": 99, "lifetime": 15, "lastseen": now.isoformat()}
    client = _Client({"status": {"other": active}})
    ident = PeeringIdentity(name="p", identity="me", priority=1, clusterwide=True)
    reconciler = Reconciler(client, tools=None, config=ReconcilerConfig(peering=ident))

    asyncio.run(reconciler.poke("default", "job", "requeue"))
    assert client.paths == ["/apis/kopf.dev/v1/clusterkopfpeerings/p"]  # and nothing else
    asyncio.run(reconciler.poke("default", "job", "event"))  # kopf only calls us when active
    assert client.paths[1] == "/apis/dptrain.io/v1alpha1/namespaces/default/dptrainingjobs/job"


@pytest.mark.parametrize(("args", "message"), [
    (["--peering", "Bad_Name"], "--peering must be a lowercase DNS name"),
    (["--peering", "a" * 254], "--peering must be a lowercase DNS name"),
    (["--peering", "ok", "--peering-lifetime", "5"], "--peering-lifetime must be in 10..300"),
])
def test_cli_refuses_bad_peering_flags_with_one_line(args, message, capsys):
    from dptrain.cli import main

    assert main(["operator", "--metrics-port", "0", *args]) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
