"""The API server misbehaves: errors, slow answers, dropped watch streams. The operator converges.

The emulator (``kube_faults.FaultyEmulatorServer``) injects faults into the operator's requests
only (its REST client and kopf; the test's and trainers' requests pass): 500s on creating
children, a 409 and a 422 on status writes, 500s on reads, 500s on every event, slow answers
for the workload Jobs, failing watch requests and watch streams that end (cleanly or with a
410 Gone) every few seconds. Each rule counts its hits, so the test checks that the faults it
planned really happened. Nothing may be lost: each job converges to exactly one child of each
kind, every progress report is charged, the ledger never goes down, a budget still halts its
job, and a report sent while the watches are down is still charged.
"""

from __future__ import annotations

import json
import re

import pytest
from kube_faults import Fault, FaultyEmulatorServer
from kube_ledger import TERMINAL, LedgerWatch, charged, children, report, status_of
from kube_samples import job_manifest
from kube_waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 4242
KINDS = ["ConfigMap", "Job", "Role", "RoleBinding", "Service", "ServiceAccount"]


def planned_faults() -> dict[str, Fault]:
    return {
        "configmap 500": Fault(method="POST", resource="configmaps", status=500, times=2),
        "role 500": Fault(method="POST", resource="roles", status=500, times=1),
        "job 503 slow": Fault(method="POST", resource="jobs", status=503, delay=0.5, times=1),
        "status 409": Fault(method="PATCH", resource="dptrainingjobs", subresource="status",
                            status=409, times=1),
        "status 422": Fault(method="PATCH", resource="dptrainingjobs", subresource="status",
                            status=422, skip=1, times=1),
        # The operator's own annotation writes (applied spec, the authoritative ledger); kopf
        # no longer patches jobs (no finalizer, no handler state).
        "job patch 500": Fault(method="PATCH", resource="dptrainingjobs", subresource=None,
                               status=500, times=1),
        "get 500": Fault(method="GET", resource="dptrainingjobs", watch=False, status=500,
                         probability=0.3, times=6),
        "events 500": Fault(method="POST", resource="events", status=500),
        "jobs slow": Fault(method="GET", resource="jobs", watch=False, delay=0.4, times=10),
        "watch 500": Fault(resource="dptrainingjobs", watch=True, status=500, times=2),
        "watch eof": Fault(resource="dptrainingjobs", watch=True, drop_after=2.0, times=3),
        "jobs watch gone": Fault(resource="jobs", watch=True, drop_after=3.0, drop_mode="gone",
                                 times=2),
    }


FAULTS = planned_faults()


@pytest.fixture()
def kube_api():
    server = FaultyEmulatorServer(seed=SEED, faults=list(FAULTS.values())).start()
    try:
        yield server
    finally:
        server.stop()


def converged(kube, name: str) -> dict | None:
    job = kube.get_job(name)
    if job is None or (job.get("status") or {}).get("phase") != "Running":
        return None
    objs = children(kube, name)
    if sorted(o["kind"] for o in objs) != KINDS:
        return None
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
               for o in objs)
    return dict(job["status"])


def reconcile_errors(metrics: str) -> float:
    return sum(float(m) for m in re.findall(
        r"^dptrain_reconcile_errors_total\{[^}]*\} (\S+)$", metrics, flags=re.M))


def test_operator_converges_through_api_errors_slowness_and_dropped_watches(
        kube, kube_api, start_operator):
    for fault in FAULTS.values():
        fault.hits = fault.seen = 0  # the module-level rules are shared by reruns
    operator = start_operator("--restart-backoff", "0.2")
    names = ["one", "two"]

    def describe() -> str:
        hits = {k: (f.hits, f.seen) for k, f in FAULTS.items()}
        return (json.dumps({n: status_of(kube, n) for n in names})[-2500:] + f"\n{hits}\n"
                + operator.tail(25))

    with LedgerWatch(kube, names) as watch:
        for name in names:
            kube.create_job(job_manifest(name))
        for name in names:
            wait_for(lambda n=name: converged(kube, n), timeout=90, what=f"{name} converged",
                     describe=describe)
        for step in (3, 5):
            for name in names:
                report(kube, name, stepsCharged=step, step=step)
            for name in names:
                wait_for(lambda n=name, s=step: charged(kube, n) == s, timeout=60,
                         what=f"{name} charged {step}", describe=describe)
        # A report sent while every watch stream is down is charged after the re-watch.
        assert kube_api.drop_watches("eof") >= 1
        report(kube, "one", stepsCharged=7, step=7)
        wait_for(lambda: charged(kube, "one") == 7, timeout=60, what="one charged 7",
                 describe=describe)
        assert kube_api.drop_watches("gone") >= 1
        max_steps = status_of(kube, "two")["plan"]["maxSteps"]
        report(kube, "two", stepsCharged=max_steps, step=max_steps)
        final = wait_for(lambda: (s := status_of(kube, "two")).get("phase") in TERMINAL and s,
                         timeout=60, what="two halted", describe=describe)
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "two-train") is None,
                 timeout=60, what="two's workload deleted", describe=describe)
        status_one = wait_for(lambda: converged(kube, "one"), timeout=60, what="one running",
                              describe=describe)

    # Every planned fault happened (as often as planned, where limited).
    for key, fault in FAULTS.items():
        assert fault.hits >= 1, (key, describe())
        if fault.times is not None and key not in ("get 500",):
            assert fault.hits == fault.times, (key, fault.hits, describe())
    # ... and the operator noticed and retried rather than giving up.
    assert reconcile_errors(operator.metrics()) >= 3, operator.metrics()
    assert final["phase"] == "BudgetExhausted"
    assert final["privacy"]["stepsCharged"] == max_steps
    assert final["privacy"]["epsilonSpent"] <= final["privacy"]["epsilonBudget"] == 2.0
    assert status_one["privacy"]["stepsCharged"] == 7 and status_one["restarts"] == 0
    assert not watch.decreases(), watch.seen
    # Nothing was created twice, nothing extra exists.
    journal = kube_api.journal()
    posts = [(res, outcome) for method, res, _, _, _, agent, outcome in journal
             if method == "POST" and agent.startswith("dptrain-operator")]
    accepted = {res: sum(1 for r, o in posts if r == res and o.endswith(" 201"))
                for res in ("jobs", "configmaps", "serviceaccounts", "roles", "rolebindings",
                            "services")}
    assert accepted == dict.fromkeys(accepted, 2), accepted
    assert sorted(o["metadata"]["name"] for o in kube.list("batch/v1/jobs", "default")) == [
        "one-train"]
