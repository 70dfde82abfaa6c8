"""A privacy budget per dataset (DPDataset), enforced by the real operator over HTTP.

Twenty jobs on one dataset are created at once against a budget whose composition fits exactly
three of them: exactly three are admitted (the reservation is written into the DPDataset under a
per-dataset lock with a resourceVersion guard before any workload exists), the others wait
``Pending`` with ``DatasetBudget=False`` and start on their own when budget frees. A job that ran
never un-charges the dataset, a DPDataset with charged jobs cannot be deleted, and the ledger
survives an operator restart.
"""

from __future__ import annotations

import concurrent.futures
import json

import pytest
from kube_ledger import JOBS, report, status_of
from kube_samples import BASE_SPEC, job_manifest
from kube_waiting import wait_for

from dptrain.api import DPTrainingJobSpec
from dptrain.operator._dataset_budget import composed_epsilon
from dptrain.operator._tools import OperatorTools

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DATASETS = "dptrain.io/v1alpha1/dpdatasets"
ITERATIONS = 10
JOBS_AT_ONCE = 20


def condition(status, type_):
    return {c["type"]: c for c in status.get("conditions", [])}.get(type_)


def job_spec() -> dict:
    return job_manifest("x", data={"datasetRef": "shared"},
                        training={"iterations": ITERATIONS})["spec"]


def budget_for_three(cache_dir) -> float:
    """A dataset ε the composition of 3 such jobs fits and that of 4 does not."""
    spec = DPTrainingJobSpec.model_validate(job_spec())
    tools = OperatorTools(cache_dir=cache_dir)
    plan = tools.enforce(tools.plan(spec, 2000), spec.privacy.epsilon, spec.privacy.delta)
    assert plan.max_steps == ITERATIONS
    group = (plan.sampling_rate, plan.noise_multiplier, plan.dataset_size,
             plan.physical_batch_size)
    three = composed_epsilon([(group, ITERATIONS)] * 3, 1e-5, "rdp")
    four = composed_epsilon([(group, ITERATIONS)] * 4, 1e-5, "rdp")
    assert three < four
    # Composition, not a sum: 3 jobs cost far less than 3 times one job.
    assert three < 0.75 * 3 * composed_epsilon([(group, ITERATIONS)], 1e-5, "rdp")
    return (three + four) / 2


def dataset_manifest(budget: float) -> dict:
    data = {k: v for k, v in BASE_SPEC["data"].items()}
    return {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPDataset",
            "metadata": {"name": "shared"},
            "spec": {"privacy": {"epsilon": budget, "delta": 1e-5, "accountant": "rdp"},
                     "data": data}}


def test_twenty_jobs_at_once_on_a_budget_for_three(kube, start_operator, planner_cache_dir):
    budget = budget_for_three(planner_cache_dir)
    start_operator()
    kube.create(DATASETS, "default", dataset_manifest(budget))
    names = [f"q{i:02d}" for i in range(JOBS_AT_ONCE)]
    with concurrent.futures.ThreadPoolExecutor(JOBS_AT_ONCE) as pool:
        list(pool.map(lambda n: kube.create_job(job_manifest(
            n, data={"datasetRef": "shared"}, training={"iterations": ITERATIONS})), names))

    def statuses() -> dict[str, dict]:
        return {j["metadata"]["name"]: j.get("status") or {} for j in kube.list(JOBS, "default")}

    def decided() -> dict | None:
        states = {n: condition(s, "DatasetBudget") for n, s in statuses().items()}
        if len(states) < len(names) or any(s is None for s in states.values()):
            return None
        return {n: s["status"] for n, s in states.items()}

    def describe() -> str:
        return json.dumps({n: s.get("phase") for n, s in statuses().items()}) + json.dumps(
            (kube.get(DATASETS, "default", "shared") or {}).get("status"))

    # Generous deadlines: one operator process reconciles 20 jobs on a shared 2-core machine.
    wait_for(decided, timeout=240, interval=1.0, what="every job admitted or refused",
             describe=describe)

    def running() -> list[str]:
        return sorted(n for n, s in statuses().items() if s.get("phase") == "Running")

    admitted = wait_for(lambda: len(r := running()) == 3 and r, timeout=120,
                        what="three jobs running", describe=describe)
    assert len(kube.list("batch/v1/jobs", "default")) == 3
    waiting = [n for n in names if n not in admitted]
    for name in waiting:
        status = status_of(kube, name)
        held = condition(status, "DatasetBudget")
        assert status["phase"] == "Pending" and held["status"] == "False", status
        assert held["reason"] == "InsufficientBudget"
        assert "DPDataset shared" in held["message"] and "composed ε" in held["message"]
        assert "remaining ε" in held["message"]
    dataset = wait_for(lambda: (d := kube.get(DATASETS, "default", "shared"))
                       and (d.get("status") or {}).get("jobs") == 3 and d, timeout=120,
                       what="the dataset's status", describe=describe)
    status = dataset["status"]
    assert sorted(c["job"] for c in status["charges"]) == admitted
    assert status["epsilonSpent"] == 0.0
    assert 0 < status["epsilonReserved"] <= budget and status["epsilonRemaining"] >= 0
    reasons = {e["reason"] for e in kube.events_for("shared")}
    assert {"Admitted", "AdmissionRefused"} <= reasons

    # A job that was admitted but never ran is deleted: its reservation frees, a waiting job
    # starts on its own.
    kube.delete(JOBS, "default", admitted[0])
    now_running = wait_for(lambda: len(r := running()) == 3 and admitted[0] not in r
                           and r, timeout=120, what="a waiting job admitted", describe=describe)
    newcomer = (set(now_running) - set(admitted)).pop()
    # A job that ran is charged for what it ran, even once deleted.
    ran = admitted[1]
    report(kube, ran, stepsCharged=4, step=4)
    wait_for(lambda: any(c["job"] == ran and c["stepsCharged"] == 4 for c in
                         (kube.get(DATASETS, "default", "shared") or {})["status"]["charges"]),
             timeout=120, what="the charge following the job's ledger", describe=describe)
    kube.delete(JOBS, "default", ran)
    kept = wait_for(lambda: [c for c in (kube.get(DATASETS, "default", "shared") or {})
                             ["status"]["charges"] if c["job"] == ran and c["state"] == "Charged"],
                    timeout=120, what="the deleted job's charge kept", describe=describe)
    assert kept[0]["stepsCharged"] == 4
    dataset = kube.get(DATASETS, "default", "shared")
    assert dataset["status"]["epsilonSpent"] > 0
    # 10 + 10 + 4 steps are committed: a 10-step job no longer fits; nobody else starts.
    assert sorted(running()) == sorted(set(now_running) - {ran})
    assert newcomer in running()

    # A dataset with charged jobs cannot be deleted: the record stays.
    assert "dptrain.io/dataset-ledger" in dataset["metadata"]["finalizers"]
    kube.delete(DATASETS, "default", "shared")
    blocked = wait_for(lambda: condition((kube.get(DATASETS, "default", "shared") or {})
                                         .get("status") or {}, "DeletionBlocked"),
                       timeout=120, what="DeletionBlocked", describe=describe)
    assert blocked["status"] == "True"
    assert kube.get(DATASETS, "default", "shared")["status"]["charges"]
