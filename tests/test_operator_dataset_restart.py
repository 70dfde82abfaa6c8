"""A DPDataset's ledger survives operator restarts (SIGTERM and SIGKILL), over HTTP.

All jobs here run the same mechanism (σ and the batch are pinned), so the dataset's composed ε
is a function of the total committed steps: ``E(n)``. The budget sits between ``E(30)`` and
``E(34)``. Before the first restart the dataset holds a deleted job's final charge of 4 steps
(``a``), a running job's reservation of 10 with 6 already charged (``b``) and an admitted job's
reservation of 10 (``c``): 24 committed steps. A 10-step job (``d``) waits (34 > budget).

The operator is stopped with SIGTERM while ``b`` keeps reporting and a second 10-step job (``e``)
is created; after the restart the dataset's charges, spent and reserved ε must be what they were
(plus ``b``'s report) and ``d`` and ``e`` still refused. Then SIGKILL, right after a 5-step job
``f`` (29 committed steps: fits) is created, mid-admission: after the restart ``f`` holds exactly
one reservation. Finally ``c`` (never ran) is deleted: its reservation frees and the restarted
operator wakes the waiting jobs; exactly one of ``d`` and ``e`` fits and starts, the other stays
refused. An operator that rebuilt the ledger from the live jobs (losing ``a``'s 4 steps) would
admit ``d`` at the first restart; one that lost reservations would admit ``d`` and ``e``; one
that double-counted would refuse ``f``.

ε values are compared with ``rel=1e-9``: the operator and this test compose the same events with
the same deterministic dp-accounting code, so they agree to float round-off.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kube_ledger import JOBS, report, status_of
from kube_samples import BASE_SPEC, job_manifest
from kube_waiting import wait_for

from dptrain.api import DPTrainingJobSpec
from dptrain.operator._dataset_budget import composed_epsilon
from dptrain.operator._tools import OperatorTools

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DATASETS = "dptrain.io/v1alpha1/dpdatasets"
DELTA = 1e-5
BIG, SMALL = 10, 5


def manifest(name: str, iterations: int) -> dict[str, Any]:
    return job_manifest(name, data={"datasetRef": "shared"},
                        training={"iterations": iterations})


def mechanism(cache_dir, iterations: int) -> tuple:
    spec = DPTrainingJobSpec.model_validate(manifest("x", iterations)["spec"])
    tools = OperatorTools(cache_dir=cache_dir)
    plan = tools.enforce(tools.plan(spec, 2000), spec.privacy.epsilon, spec.privacy.delta)
    assert plan.max_steps == iterations
    return (plan.sampling_rate, plan.noise_multiplier, plan.dataset_size,
            plan.physical_batch_size)


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return {c["type"]: c for c in status.get("conditions", [])}.get(type_)


def test_dataset_ledger_survives_sigterm_and_sigkill_restarts(kube, start_operator,
                                                              planner_cache_dir):
    group = mechanism(planner_cache_dir, BIG)
    assert mechanism(planner_cache_dir, SMALL) == group  # same mechanism, fewer steps

    def eps(steps: int) -> float:
        return composed_epsilon([(group, steps)], DELTA, "rdp")

    budget = (eps(30) + eps(34)) / 2
    assert eps(24 + SMALL) < eps(30) <= budget < eps(24 + BIG)
    operator = start_operator()
    data = dict(BASE_SPEC["data"])
    kube.create(DATASETS, "default", {
        "apiVersion": "dptrain.io/v1alpha1", "kind": "DPDataset", "metadata": {"name": "shared"},
        "spec": {"privacy": {"epsilon": budget, "delta": DELTA, "accountant": "rdp"},
                 "data": data}})

    def dataset() -> dict[str, Any]:
        return dict((kube.get(DATASETS, "default", "shared") or {}).get("status") or {})

    def charges() -> dict[str, tuple[str, int, int]]:
        return {c["job"]: (c["state"], c["reservedSteps"], c["stepsCharged"])
                for c in dataset().get("charges") or []}

    def phase(name: str) -> str | None:
        return status_of(kube, name).get("phase")

    def workloads() -> list[str]:
        return sorted(j["metadata"]["name"] for j in kube.list("batch/v1/jobs", "default"))

    def describe() -> str:
        jobs = {j["metadata"]["name"]: (j.get("status") or {}).get("phase")
                for j in kube.list(JOBS, "default")}
        return json.dumps({"jobs": jobs, "dataset": dataset()})[-3000:] + operator.tail(30)

    def refused(name: str) -> bool:
        held = condition(status_of(kube, name), "DatasetBudget")
        return (phase(name) == "Pending" and held is not None and held["status"] == "False"
                and held["reason"] == "InsufficientBudget")

    def settled(want: dict[str, tuple[str, int, int]], spent: int, committed: int) -> bool:
        """The dataset shows exactly ``want`` and the ε of these step totals."""
        status = dataset()
        return (charges() == want and status.get("jobs") == len(want)
                and status.get("epsilonSpent") == pytest.approx(eps(spent), rel=1e-9)
                and status.get("epsilonReserved") == pytest.approx(
                    eps(committed) - eps(spent), rel=1e-9, abs=1e-12)
                and status.get("epsilonRemaining") == pytest.approx(
                    budget - eps(committed), rel=1e-9))

    # Before any restart: a (ran 4, deleted), b (running, 6 of 10), c (admitted), d refused.
    for name in "abc":
        kube.create_job(manifest(name, BIG))
        wait_for(lambda n=name: phase(n) == "Running", timeout=60, what=f"{name} running",
                 describe=describe)
    kube.create_job(manifest("d", BIG))
    wait_for(lambda: refused("d"), timeout=60, what="d refused", describe=describe)
    report(kube, "a", stepsCharged=4, step=4)
    report(kube, "b", stepsCharged=6, step=6)
    wait_for(lambda: charges().get("a", (0, 0, 0))[2] == 4, timeout=60, what="a charged 4",
             describe=describe)
    kube.delete(JOBS, "default", "a")
    before = {"a": ("Charged", BIG, 4), "b": ("Running", BIG, 6), "c": ("Reserved", BIG, 0)}
    wait_for(lambda: settled(before, spent=10, committed=24), timeout=60,
             what="the ledger before the restart", describe=describe)
    snapshot = dataset()

    # 1. SIGTERM. While the operator is down, b keeps reporting and e is created.
    operator.stop()
    assert operator.process is not None and operator.process.returncode is not None
    report(kube, "b", stepsCharged=8, step=8)
    kube.create_job(manifest("e", BIG))
    operator = start_operator()
    after = {**before, "b": ("Running", BIG, 8)}
    wait_for(lambda: settled(after, spent=12, committed=24), timeout=60,
             what="the ledger after the SIGTERM restart", describe=describe)
    wait_for(lambda: refused("e"), timeout=60, what="e refused", describe=describe)
    assert refused("d"), describe()
    # Only b's report changed anything: every other charge and the committed ε are as they were.
    assert dataset()["epsilonRemaining"] == pytest.approx(snapshot["epsilonRemaining"],
                                                         rel=1e-9)
    assert {c["job"]: c for c in dataset()["charges"] if c["job"] != "b"} == {
        c["job"]: c for c in snapshot["charges"] if c["job"] != "b"}

    # 2. SIGKILL right after f (5 steps, 29 committed: fits) is created, mid-admission.
    kube.create_job(manifest("f", SMALL))
    operator.kill()
    operator = start_operator()
    wait_for(lambda: phase("f") == "Running", timeout=60, what="f (5 steps) admitted",
             describe=describe)
    with_f = {**after, "f": ("Reserved", SMALL, 0)}
    wait_for(lambda: settled(with_f, spent=12, committed=24 + SMALL), timeout=60,
             what="f's one reservation after the SIGKILL restart", describe=describe)
    assert refused("d") and refused("e"), describe()

    # 3. The restarted operator still wakes waiting jobs: c (never ran) is deleted, its
    # reservation frees (19 committed) and exactly one of d and e fits (29).
    kube.delete(JOBS, "default", "c")
    wait_for(lambda: "c" not in charges() and sum(phase(n) == "Running" for n in "de") == 1,
             timeout=60, what="c released and one of d, e admitted", describe=describe)
    started = next(n for n in "de" if phase(n) == "Running")
    waiting = "e" if started == "d" else "d"
    final = {"a": before["a"], "b": after["b"], "f": with_f["f"],
             started: ("Reserved", BIG, 0)}
    wait_for(lambda: settled(final, spent=12, committed=29), timeout=60,
             what="the final ledger", describe=describe)
    assert refused(waiting), describe()
    assert f"{waiting}-train" not in workloads()
    assert {"b-train", "f-train", f"{started}-train"} <= set(workloads())
    assert dataset()["epsilonRemaining"] >= 0
