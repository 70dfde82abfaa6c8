"""The operator is killed with SIGKILL and restarted again and again while jobs run.

Three jobs run with fake trainers (plain HTTP progress reports, as ``dptrain train`` sends them).
A seeded RNG decides when the operator dies: right after a job is created (its children half
made), between progress reports, while reports keep arriving with the operator down, and right
after the report that exhausts a budget. After each restart the jobs must converge: every job has
exactly one child of each kind, owned by it; each workload Job was created exactly once (the
emulator's request journal counts the accepted POSTs); the ledger was never seen going down;
and a job whose budget ran out ends BudgetExhausted with its workload gone.
"""

from __future__ import annotations

import json
import random
import time

import pytest
from kube_faults import FaultyEmulatorServer
from kube_ledger import TERMINAL, LedgerWatch, charged, children, report, status_of
from kube_samples import job_manifest
from kube_waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 99
KINDS = ["ConfigMap", "Job", "Role", "RoleBinding", "Service", "ServiceAccount"]


@pytest.fixture()
def kube_api():
    """The emulator with a request journal (no faults): counts what the operator created."""
    server = FaultyEmulatorServer(seed=SEED).start()
    try:
        yield server
    finally:
        server.stop()


def accepted_posts(kube_api, plural: str) -> int:
    return sum(1 for method, res, _, _, _, _, outcome in kube_api.journal()
               if method == "POST" and res == plural and outcome.endswith(" 201"))


def converged(kube, name: str) -> dict | None:
    """The job's status once it runs with exactly one child of each kind, all owned by it."""
    job = kube.get_job(name)
    if job is None or (job.get("status") or {}).get("phase") != "Running":
        return None
    objs = children(kube, name)
    if sorted(o["kind"] for o in objs) != KINDS:
        return None
    uid = job["metadata"]["uid"]
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == uid for o in objs)
    return dict(job["status"])


def test_operator_killed_and_restarted_never_duplicates_or_loses_the_ledger(kube, kube_api,
                                                                            start_operator):
    rng = random.Random(SEED)
    names = ["alpha", "bravo", "charlie"]
    operator = start_operator()
    progress = dict.fromkeys(names, 0)
    restarts = 0

    def describe() -> str:
        return json.dumps({n: status_of(kube, n) for n in names})[-3000:] + operator.tail(30)

    def restart(down_reports: int = 0) -> None:
        """SIGKILL the operator, let the trainers report meanwhile, start a new one."""
        nonlocal operator, restarts
        operator.kill()
        restarts += 1
        for _ in range(down_reports):
            advance(rng.choice(names[:2]))
        operator = start_operator()

    def advance(name: str) -> None:
        progress[name] += rng.randint(1, 3)
        report(kube, name, stepsCharged=progress[name], step=progress[name], loss=3.0)

    with LedgerWatch(kube, names) as watch:
        # 1. Killed right after a job is created, at a random moment of its first reconcile.
        kube.create_job(job_manifest("alpha"))
        time.sleep(rng.uniform(0.0, 0.3))  # the kill point itself, not a wait for a state
        restart()
        wait_for(lambda: converged(kube, "alpha"), timeout=60, what="alpha converged",
                 describe=describe)
        # 2. Two more jobs, then kills between reports and while reports arrive.
        kube.create_job(job_manifest("bravo"))
        kube.create_job(job_manifest("charlie", privacy={"epsilon": 1.5}))
        time.sleep(rng.uniform(0.0, 0.2))
        restart(down_reports=2)
        for name in names:
            wait_for(lambda n=name: converged(kube, n), timeout=60, what=f"{name} converged",
                     describe=describe)
        for _ in range(2):
            for _ in range(rng.randint(2, 4)):
                advance(rng.choice(names[:2]))
            restart(down_reports=rng.randint(1, 3))
        for name in names[:2]:
            want = progress[name]
            wait_for(lambda n=name, w=want: charged(kube, n) == w, timeout=30,
                     what=f"{name} charged {want}", describe=describe)
        # 3. Killed right after the report that exhausts charlie's budget.
        max_steps = status_of(kube, "charlie")["plan"]["maxSteps"]
        report(kube, "charlie", stepsCharged=max_steps, step=max_steps)
        restart()
        final = wait_for(lambda: (s := status_of(kube, "charlie")).get("phase") in TERMINAL
                         and s, timeout=30, what="charlie halted", describe=describe)
        wait_for(lambda: kube.get("batch/v1/jobs", "default", "charlie-train") is None,
                 timeout=30, what="charlie's workload deleted", describe=describe)
        # One more restart: a halted job never gets a workload again.
        restart()
        for name in names[:2]:
            wait_for(lambda n=name: converged(kube, n), timeout=60, what=f"{name} converged",
                     describe=describe)
        assert kube.get("batch/v1/jobs", "default", "charlie-train") is None

    assert restarts == 6
    assert final["phase"] == "BudgetExhausted"
    assert final["privacy"]["stepsCharged"] == max_steps
    assert final["privacy"]["epsilonSpent"] <= final["privacy"]["epsilonBudget"] == 1.5
    for name in names[:2]:
        status = converged(kube, name)
        assert status is not None, describe()
        assert status["privacy"]["stepsCharged"] == progress[name]
        assert status["restarts"] == 0  # operator restarts are not trainer restarts
    assert not watch.decreases(), watch.seen
    for name in names:
        assert watch.seen[name], f"{name}'s ledger was never observed"
    # Each workload Job was created exactly once, whatever the restarts (no restart of a trainer
    # happened), and each other child exactly once per job.
    assert accepted_posts(kube_api, "jobs") == 3
    for plural in ("configmaps", "serviceaccounts", "roles", "rolebindings", "services"):
        assert accepted_posts(kube_api, plural) == 3, plural
    # Nothing else lies around: only the jobs' children (a halted job keeps no workload).
    for resource in ("v1/configmaps", "v1/services", "batch/v1/jobs"):
        owners = [(o["metadata"].get("labels") or {}).get("dptrain.io/job")
                  for o in kube.list(resource, "default")]
        running = [n for n in names if resource == "v1/configmaps" or n != "charlie"]
        assert sorted(owners) == running, (resource, owners)
