"""A trainer that lies or errs: the operator's ledger and halts do not depend on its honesty.

The "trainer" here is plain HTTP: merge-patches of ``status.progress`` as ``dptrain train``
sends them (no JAX). It reports fewer steps than before (ignored: the ledger only grows), steps
beyond the plan (the job is halted and never restarted; the ledger records what was reported —
it never undercounts), or nothing at all (the job is marked Stalled after the stall timeout).
"""

from __future__ import annotations

import json
import math
import random

import pytest
from kube_client import ApiError
from kube_ledger import JOBS, TERMINAL, LedgerWatch, privacy_of, report, status_of
from kube_samples import job_manifest
from kube_waiting import wait_for

from dptrain.privacy import DpSgdMechanism, epsilon

pytestmark = pytest.mark.e2e

SEED = 1234


def wait_phase(kube, name, *phases, timeout=30.0):
    return wait_for(lambda: (s := status_of(kube, name)).get("phase") in phases and s,
                    timeout=timeout, what=f"{name} in {phases}",
                    describe=lambda: json.dumps(status_of(kube, name)))


def exact_epsilon(plan, delta, steps):
    mechanism = DpSgdMechanism(
        sampling_rate=plan["samplingRate"], noise_multiplier=plan["noiseMultiplier"],
        delta=delta, accountant=plan["accountant"], dataset_size=plan["datasetSize"],
        physical_batch_size=plan["physicalBatchSize"])
    return epsilon(mechanism, steps)


def condition(status, type_):
    return {c["type"]: c for c in status.get("conditions", [])}.get(type_)


def test_reports_lower_than_the_ledger_are_ignored_and_the_ledger_only_grows(kube,
                                                                             start_operator):
    start_operator()
    kube.create_job(job_manifest("liar"))
    status = wait_phase(kube, "liar", "Running")
    plan, budget = status["plan"], status["privacy"]["epsilonBudget"]
    rng = random.Random(SEED)
    high = 0
    with LedgerWatch(kube, ["liar"]) as watch:
        for _ in range(12):
            # Mostly lies: lower than the ledger, equal, negative, or a small honest step.
            value = rng.choice([high - rng.randint(1, 5), high, -rng.randint(1, 100),
                                high + rng.randint(1, 3)])
            report(kube, "liar", stepsCharged=value, step=max(0, value), loss=3.0)
            high = max(high, value)
            want = high
            privacy = wait_for(lambda w=want, v=value: (
                p := privacy_of(kube, "liar")).get("stepsCharged") == w and (
                    status_of(kube, "liar").get("progress") or {}).get("stepsCharged") == v and p,
                               what=f"the ledger at {want} after a report of {value}",
                               describe=lambda: json.dumps(status_of(kube, "liar")))
            # ε is the operator's, from the plan and the ledger (never below the exact value).
            exact = exact_epsilon(plan, privacy["delta"], want)
            assert exact - 1e-9 <= privacy["epsilonSpent"] <= budget
    assert high < plan["maxSteps"] and high > 0
    assert not watch.decreases(), watch.seen
    final = status_of(kube, "liar")
    assert final["phase"] == "Running"
    assert condition(final, "ProgressReport")["reason"] in ("Regressed", "Charged")
    assert any(e["reason"] == "Regressed" and e["type"] == "Warning"
               for e in kube.events_for("liar"))


def test_reports_that_are_not_numbers_are_refused_by_the_schema(kube, start_operator):
    start_operator()
    kube.create_job(job_manifest("garbage"))
    wait_phase(kube, "garbage", "Running")
    report(kube, "garbage", stepsCharged=5, step=5)
    wait_for(lambda: privacy_of(kube, "garbage").get("stepsCharged") == 5, what="5 charged")
    for bad in ("1e9", 2.5, None, [7], {"n": 7}, True):
        if bad is None:
            continue  # null deletes the field in a merge patch: not a lie, nothing to refuse
        with pytest.raises(ApiError) as refused:
            report(kube, "garbage", stepsCharged=bad, step=5)
        assert refused.value.status == 422, bad
        assert "status.progress.stepsCharged" in str(refused.value), str(refused.value)
    assert privacy_of(kube, "garbage")["stepsCharged"] == 5
    assert status_of(kube, "garbage")["phase"] == "Running"


def test_a_report_beyond_the_plan_halts_the_job_and_is_charged_in_full(kube, start_operator):
    start_operator()
    # The plan binds (20 iterations well within ε = 8): 25 steps still fit the budget.
    kube.create_job(job_manifest("over", privacy={"epsilon": 8.0},
                                 training={"iterations": 20}))
    status = wait_phase(kube, "over", "Running")
    plan = status["plan"]
    assert plan["maxSteps"] == plan["iterations"] == 20
    report(kube, "over", stepsCharged=25, step=25)
    final = wait_phase(kube, "over", *TERMINAL)
    privacy = final["privacy"]
    assert final["phase"] != "Failed"
    assert privacy["stepsCharged"] == 25  # what the trainer says it ran, never less
    exact = exact_epsilon(plan, privacy["delta"], 25)
    assert abs(privacy["epsilonSpent"] - exact) <= 1e-9 * max(1.0, exact)
    assert privacy["epsilonSpent"] <= privacy["epsilonBudget"] == 8.0
    assert condition(final, "ProgressReport")["reason"] == "BeyondPlan"
    wait_for(lambda: kube.get("batch/v1/jobs", "default", "over-train") is None,
             what="the workload deleted")
    assert any(e["reason"] == "BeyondPlan" for e in kube.events_for("over"))


# A count far beyond the plan once broke the operator: exact ε of 1e10 steps was inf under RDP
# (written to the status as the non-JSON token Infinity) and a MemoryError under PLD (reconcile
# failed forever, the job never halted). Fixed in dptrain.privacy (RDP bound above ε = 100) and
# the operator's accountant (finite ε in the status).
@pytest.mark.parametrize(("accountant", "factor"), [
    ("rdp", 2),
    ("rdp", 10**10),
    ("pld", 10**10),
], ids=["rdp-double", "rdp-absurd", "pld-absurd"])
def test_a_report_far_beyond_the_budget_halts_the_job_and_the_operator_keeps_serving(
        kube, start_operator, accountant, factor):
    operator = start_operator()
    name = f"beyond-{accountant}"
    kube.create_job(job_manifest(name, privacy={"accountant": accountant}))
    status = wait_phase(kube, name, "Running", timeout=60)
    plan = status["plan"]
    assert plan["maxSteps"] < plan["iterations"]  # the budget binds
    steps = plan["maxSteps"] * factor
    report(kube, name, stepsCharged=steps, step=steps)
    final = wait_phase(kube, name, *TERMINAL, timeout=15)
    assert final["phase"] == "BudgetExhausted"
    privacy = final["privacy"]
    assert privacy["stepsCharged"] == steps  # charged in full: the ledger never undercounts
    # ε is a real number (the API server accepts JSON only) and not below what the plan spent.
    assert math.isfinite(privacy["epsilonSpent"]), privacy
    assert privacy["epsilonSpent"] > privacy["epsilonBudget"] >= plan["epsilonPlanned"]
    wait_for(lambda: kube.get("batch/v1/jobs", "default", f"{name}-train") is None,
             what="the workload deleted")
    # The operator still serves: a new job is planned and gets its workload.
    kube.create_job(job_manifest(f"after-{accountant}"))
    wait_phase(kube, f"after-{accountant}", "Running")
    series = f'dptrain_job_phase{{name="{name}",namespace="default",phase="BudgetExhausted"}} 1.0'
    assert series in operator.metrics()


def test_a_trainer_that_never_reports_is_marked_stalled(kube, start_operator):
    start_operator("--stall-timeout", "2", "--timer-interval", "1")
    kube.create_job(job_manifest("silent"))
    wait_phase(kube, "silent", "Running")
    stalled = wait_for(lambda: (c := condition(status_of(kube, "silent"), "Stalled"))
                       and c["status"] == "True" and c, timeout=20, what="Stalled=True",
                       describe=lambda: json.dumps(status_of(kube, "silent")))
    assert stalled["reason"] == "NoProgress" and "timeout 2s" in stalled["message"]
    assert any(e["reason"] == "NoProgress" and e["type"] == "Warning"
               for e in kube.events_for("silent"))
    # The workload is left alone (a stall is reported, not punished) and nothing was charged.
    assert kube.get("batch/v1/jobs", "default", "silent-train") is not None
    assert privacy_of(kube, "silent")["stepsCharged"] == 0
    # A report clears it.
    report(kube, "silent", stepsCharged=2, step=2)
    wait_for(lambda: (c := condition(status_of(kube, "silent"), "Stalled"))
             and c["status"] == "False", timeout=20, what="Stalled=False")
    assert privacy_of(kube, "silent")["stepsCharged"] == 2
    # A merge patch may not touch the spec through /status.
    kube.merge_patch(JOBS, "default", "silent", {"spec": {"privacy": {"epsilon": 99.0}}},
                     "status")
    assert kube.get_job("silent")["spec"]["privacy"]["epsilon"] == 2.0
