"""Two operator replicas with kopf peering against the emulator: one acts, the other takes over."""

from __future__ import annotations

import time

import kube_ledger
import pytest
from kube_samples import job_manifest
from kube_waiting import wait_for

pytestmark = pytest.mark.e2e

PEERING = "kopf.dev/v1/clusterkopfpeerings"
CHILD_RESOURCES = ("v1/configmaps", "v1/serviceaccounts", "rbac.authorization.k8s.io/v1/roles",
                   "rbac.authorization.k8s.io/v1/rolebindings", "v1/services", "batch/v1/jobs",
                   "v1/secrets")


def child_kinds(kube, name):
    return sorted(o["kind"] for resource in CHILD_RESOURCES for o in kube.list(resource, "default")
                  if (o["metadata"].get("labels") or {}).get("dptrain.io/job") == name)


def steps_charged(kube, name):
    job = kube.get_job(name) or {}
    return ((job.get("status") or {}).get("privacy") or {}).get("stepsCharged")


def phase_of(kube, name):
    return ((kube.get_job(name) or {}).get("status") or {}).get("phase")


@pytest.mark.slow  # waits out a dead replica's keep-alive lifetime (≤ 15 s)
def test_two_replicas_one_acts_and_the_standby_takes_over_when_it_dies(kube, start_operator):
    assert kube.get(PEERING, None, "dptrain") is None  # the operator creates it
    active = start_operator("--peering", "dptrain")
    standby = start_operator("--peering", "dptrain")  # started later: lower priority
    peers = wait_for(lambda: len(s := (kube.get(PEERING, None, "dptrain") or {})
                                 .get("status") or {}) == 2 and s,
                     what="both replicas' keep-alives in the peering object")
    assert all(p["lifetime"] == 15 for p in peers.values())
    assert len({p["priority"] for p in peers.values()}) == 2  # equal priorities would all pause

    kube.create_job(job_manifest("ha"))
    running = 'dptrain_job_phase{name="ha",namespace="default",phase="Running"} 1.0'
    wait_for(lambda: running in active.metrics(), what="the active replica running the job",
             describe=active.tail)
    kube_ledger.report(kube, "ha", stepsCharged=3, step=3)
    wait_for(lambda: steps_charged(kube, "ha") == 3, what="3 steps charged")
    assert 'name="ha"' not in standby.metrics(), "the standby reconciled the job"
    kinds = child_kinds(kube, "ha")
    assert kinds.count("Job") == 1 and kinds.count("Secret") == 1, kinds

    active.kill()  # as a crashing pod dies: no goodbye in the peering object
    killed = time.monotonic()
    kube_ledger.report(kube, "ha", stepsCharged=5, step=5)
    wait_for(lambda: steps_charged(kube, "ha") == 5, timeout=30,
             what="the standby charging the progress made after the active replica died",
             describe=standby.tail)
    took = time.monotonic() - killed
    assert took < 30, f"the standby took over after {took:.1f} s"
    print(f"takeover after SIGKILL: {took:.1f} s")
    assert 'dptrain_job_steps_charged{name="ha",namespace="default"} 5.0' in standby.metrics()
    assert "Resuming operations" in standby.tail(400)  # kopf's pause lifted by peering
    assert phase_of(kube, "ha") == "Running"
    assert child_kinds(kube, "ha") == kinds  # nothing duplicated, nothing lost

    # A rolling update: a new replica starts as a standby (younger), the old one exits cleanly
    # (SIGTERM removes its keep-alive) and the new one takes over without waiting out a lifetime.
    newcomer = start_operator("--peering", "dptrain")
    wait_for(lambda: len((kube.get(PEERING, None, "dptrain") or {}).get("status") or {}) == 2,
             what="the newcomer's keep-alive")
    kube_ledger.report(kube, "ha", stepsCharged=6, step=6)
    wait_for(lambda: steps_charged(kube, "ha") == 6, what="6 steps charged by the active one")
    assert 'name="ha"' not in newcomer.metrics(), "a younger replica took over a live one"
    standby.stop()
    stopped = time.monotonic()
    kube_ledger.report(kube, "ha", stepsCharged=7, step=7)
    wait_for(lambda: steps_charged(kube, "ha") == 7, timeout=10,
             what="the newcomer taking over after a clean exit", describe=newcomer.tail)
    print(f"takeover after a clean exit: {time.monotonic() - stopped:.1f} s")
    assert child_kinds(kube, "ha") == kinds


def test_a_namespaced_replica_peers_in_its_namespace_and_works_alone(kube, start_operator):
    namespaced = "kopf.dev/v1/kopfpeerings"
    # A namespaced kopf serves the listed namespaces that exist (the emulator starts with none).
    kube.create("v1/namespaces", None, {"apiVersion": "v1", "kind": "Namespace",
                                         "metadata": {"name": "default"}})
    operator = start_operator("--namespace", "default", "--peering", "team")
    peering = wait_for(lambda: (kube.get(namespaced, "default", "team") or {}).get("status"),
                       what="its keep-alive in the KopfPeering it created",
                       describe=lambda: operator.tail() + repr(kube.list(namespaced, "default")))
    assert len(peering) == 1 and kube.get(PEERING, None, "team") is None
    kube.create_job(job_manifest("solo"))
    wait_for(lambda: phase_of(kube, "solo") == "Running", what="the job running",
             describe=operator.tail)
