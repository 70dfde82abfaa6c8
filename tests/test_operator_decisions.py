"""The operator's pure decisions: phases, conditions, the ledger and the budget (fast)."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest
from kube_samples import job_manifest

from dptrain.api import PlanStatus, PodsStatus
from dptrain.operator import ChildState, Observed, Settings, decide
from dptrain.operator._conditions import set_condition
from dptrain.operator._spec_changes import ANNOTATION_APPLIED_SPEC, spec_json
from dptrain.operator._verification import expected_fingerprint

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
EPS_PER_STEP = 0.1  # the fake accountant: ε(t) = 0.1·t


class FakeTools:
    def __init__(self) -> None:
        self.plans = 0

    def plan(self, spec, dataset_size):
        self.plans += 1
        if spec.privacy.epsilon < EPS_PER_STEP:
            raise ValueError("spec.privacy.epsilon: infeasible privacy budget")
        return PlanStatus(
            model_preset="tiny", model_params=1000, batch_size=64,
            iterations=spec.training.iterations or 100, noise_multiplier=1.0,
            noise_batch_ratio=1 / 64, sampling_rate=64 / dataset_size, physical_batch_size=128,
            dataset_size=dataset_size, sequence_length=64, clip_norm=1.0, learning_rate=1e-3,
            compute_flops=1.0, max_steps=spec.training.iterations or 100, epsilon_planned=0.0,
            accountant=spec.privacy.accountant, pods=PodsStatus())

    def enforce(self, plan, budget, delta, *, iterations=None):
        iterations = plan.iterations if iterations is None else iterations
        max_steps = min(iterations, math.floor(budget / EPS_PER_STEP + 1e-9))
        return plan.model_copy(update={"iterations": iterations, "max_steps": max_steps,
                                       "epsilon_planned": max_steps * EPS_PER_STEP})

    def epsilon_spent(self, plan, delta, steps):
        return steps * EPS_PER_STEP

    def epsilon_exact(self, plan, delta, steps):
        return steps * EPS_PER_STEP


def body(name="job", *, generation=1, status=None, applied=None, **overrides):
    manifest = job_manifest(name, **overrides)
    manifest["metadata"].update(uid="uid-1", generation=generation)
    if applied is not None:
        manifest["metadata"]["annotations"] = {
            ANNOTATION_APPLIED_SPEC: json.dumps(applied)}
    if status is not None:
        manifest["status"] = status
    return manifest


def merged(old_status, decision):
    status = dict(old_status or {})
    status.update(decision.status)
    return status


NOTHING = Observed()
DEFAULTS = Settings()


def run(b, observed=NOTHING, now=NOW, tools=None, settings=DEFAULTS):
    return decide(b, observed, now, tools=tools or FakeTools(), settings=settings)


def running_status(steps=0, budget=2.0, iterations=1000):
    """Status of a job that planned 20 of ``iterations`` steps and charged ``steps``."""
    b = body(training={"iterations": iterations}, privacy={"epsilon": budget})
    first = run(b)
    status = merged({}, first)
    status["privacy"]["stepsCharged"] = steps
    status["privacy"]["epsilonSpent"] = steps * EPS_PER_STEP
    return status, first.applied_spec


def honest(status, checksum="sha256:docs"):
    """The mechanism fingerprint an honest trainer of the status's plan reports."""
    plan = PlanStatus.model_validate(status["plan"])
    return expected_fingerprint(plan, status["privacy"]["delta"], checksum).model_dump(
        mode="json", by_alias=True, exclude_none=True)


def conditions(status):
    return {c["type"]: c for c in status["conditions"]}


def test_new_job_is_planned_and_asks_for_its_whole_workload():
    decision = run(body(privacy={"epsilon": 2.0}))
    assert decision.phase == "Running"
    assert decision.status["plan"]["maxSteps"] == 20
    assert decision.status["privacy"] == {"stepsCharged": 0, "epsilonSpent": 0.0,
                                          "epsilonBudget": 2.0, "delta": 1e-5,
                                          "accountant": "rdp"}
    assert set(decision.create) == {"config", "rbac", "service", "workload"}
    assert decision.applied_spec is not None and decision.update_config
    assert {e.reason for e in decision.events} >= {"Planned", "Running"}


def test_invalid_spec_fails_with_field_and_rule_and_creates_nothing():
    decision = run(body(data={"builtin": None}))  # neither path nor builtin
    assert decision.phase == "Failed"
    cond = conditions(decision.status)["SpecValid"]
    assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec")
    assert "spec.data" in cond["message"]
    assert "exactly one of path, builtin and uri" in cond["message"]
    assert decision.create == [] and decision.delete == []
    assert any(e.type == "Warning" and "spec.data" in e.message for e in decision.events)


def test_infeasible_budget_fails_naming_the_budget():
    decision = run(body(privacy={"epsilon": 0.05}))
    assert decision.phase == "Failed"
    assert "spec.privacy.epsilon" in conditions(decision.status)["Failed"]["message"]
    assert decision.create == []


def test_reports_charge_the_ledger_with_the_operators_epsilon_not_the_trainers():
    status, applied = running_status()
    status["progress"] = {"stepsCharged": 7, "step": 7, "loss": 3.0, "mechanism": honest(status)}
    decision = run(body(status=status, applied=applied, privacy={"epsilon": 2.0}),
                   Observed(workload=ChildState(name="job-train", created=NOW)))
    assert decision.status["privacy"]["stepsCharged"] == 7
    assert decision.status["privacy"]["epsilonSpent"] == pytest.approx(0.7, abs=1e-12)
    assert decision.create == [] and decision.delete == []


def test_a_lower_report_is_ignored_and_flagged():
    status, applied = running_status(steps=9)
    status["progress"] = {"stepsCharged": 4, "mechanism": honest(status)}
    decision = run(body(status=status, applied=applied, privacy={"epsilon": 2.0}),
                   Observed(workload=ChildState(name="job-train", created=NOW)))
    new = merged(status, decision)
    assert new["privacy"]["stepsCharged"] == 9
    assert new["privacy"]["epsilonSpent"] == pytest.approx(0.9)
    cond = conditions(new)["ProgressReport"]
    assert (cond["status"], cond["reason"]) == ("False", "Regressed")
    assert decision.warnings and "ignored" in decision.warnings[0]


def test_reaching_the_budget_halts_and_deletes_the_workload():
    status, applied = running_status(steps=19)
    status["progress"] = {"stepsCharged": 20, "mechanism": honest(status)}
    work = Observed(workload=ChildState(name="job-train", created=NOW))
    decision = run(body(status=status, applied=applied, privacy={"epsilon": 2.0}), work)
    assert decision.phase == "BudgetExhausted"
    assert decision.delete == ["workload"] and decision.create == []
    new = merged(status, decision)
    assert new["privacy"]["epsilonSpent"] <= new["privacy"]["epsilonBudget"]
    reason = conditions(new)["BudgetExhausted"]["reason"]
    assert reason in ("MaxStepsReached", "EpsilonBudgetReached") and decision.halted == reason
    # ... and a halted job never gets a workload again, not even on the next reconcile.
    again = run(body(status=new, applied=applied, privacy={"epsilon": 2.0}))
    assert again.create == [] and again.phase == "BudgetExhausted" and again.status == {}


def test_more_iterations_than_the_budget_allows_is_refused_after_start():
    status, applied = running_status(steps=5, iterations=15)
    decision = run(body(status=status, applied=applied, generation=2,
                        privacy={"epsilon": 2.0}, training={"iterations": 50}),
                   Observed(workload=ChildState(name="job-train", created=NOW)))
    cond = conditions(merged(status, decision))["SpecAccepted"]
    assert (cond["status"], cond["reason"]) == ("False", "SpecChangeRefused")
    assert "spec.training.iterations" in cond["message"] and "budget" in cond["message"]
    assert "plan" not in decision.status  # the running plan is kept
    assert decision.delete == [] and decision.create == []


def test_changing_accounting_fields_after_start_is_refused():
    status, applied = running_status(steps=5)
    decision = run(body(status=status, applied=applied, generation=2,
                        privacy={"epsilon": 2.0, "delta": 1e-6}),
                   Observed(workload=ChildState(name="job-train", created=NOW)))
    message = conditions(merged(status, decision))["SpecAccepted"]["message"]
    assert "spec.privacy.delta" in message


def test_the_ttl_of_finished_workloads_may_change_after_start():
    status, applied = running_status(steps=5)
    decision = run(body(status=status, applied=applied, generation=2,
                        privacy={"epsilon": 2.0}, ttlSecondsAfterFinished=60),
                   Observed(workload=ChildState(name="job-train", created=NOW)))
    cond = conditions(merged(status, decision))["SpecAccepted"]
    assert (cond["status"], cond["reason"]) == ("True", "Accepted")
    assert decision.applied_spec["ttlSecondsAfterFinished"] == 60
    assert decision.delete == []  # the running trainer is not restarted for it


def test_raising_the_budget_reopens_an_exhausted_job_with_an_event():
    status, applied = running_status(steps=20)
    halted = merged(status, run(body(status=status, applied=applied, privacy={"epsilon": 2.0})))
    assert halted["phase"] == "BudgetExhausted"
    decision = run(body(status=halted, applied=applied, generation=2, privacy={"epsilon": 3.0}))
    assert any(e.reason == "BudgetRaised" for e in decision.events)
    new = merged(halted, decision)
    assert new["privacy"]["epsilonBudget"] == 3.0 and new["plan"]["maxSteps"] == 30
    assert new["privacy"]["stepsCharged"] == 20  # the ledger is kept
    assert decision.phase == "Running" and "workload" in decision.create


def test_suspend_deletes_the_workload_and_keeps_the_ledger_resume_recreates():
    status, applied = running_status(steps=6)
    work = Observed(workload=ChildState(name="job-train", created=NOW))
    decision = run(body(status=status, applied=applied, generation=2, suspend=True,
                        privacy={"epsilon": 2.0}), work)
    assert decision.phase == "Suspended" and decision.delete == ["workload"]
    suspended = merged(status, decision)
    assert suspended["privacy"]["stepsCharged"] == 6
    resumed = run(body(status=suspended, applied=applied, generation=3,
                       privacy={"epsilon": 2.0}))
    assert resumed.phase == "Running" and "workload" in resumed.create
    assert conditions(merged(suspended, resumed))["Suspended"]["status"] == "False"


def test_trainer_failure_restarts_with_backoff_then_fails_at_the_limit():
    settings = Settings(restart_backoff=10.0)
    status, applied = running_status(steps=3)
    failed = Observed(workload=ChildState(name="job-train", failed=True, message="OOMKilled"))
    decision = run(body(status=status, applied=applied, privacy={"epsilon": 2.0}), failed,
                   settings=settings)
    assert decision.delete == ["workload"] and decision.requeue_after == 10.0
    status = merged(status, decision)
    assert status["restarts"] == 1
    # Too early: wait. After the backoff: recreate (same ledger).
    early = run(body(status=status, applied=applied, privacy={"epsilon": 2.0}),
                now=NOW + dt.timedelta(seconds=4), settings=settings)
    assert early.create == [] and early.requeue_after == pytest.approx(6.0, abs=1.0)
    later = run(body(status=status, applied=applied, privacy={"epsilon": 2.0}),
                now=NOW + dt.timedelta(seconds=11), settings=settings)
    assert "workload" in later.create and later.restart == 1
    status = merged(status, later)
    for _ in range(2):  # maxRestarts = 2 in the samples
        status = merged(status, run(body(status=status, applied=applied,
                                         privacy={"epsilon": 2.0}), failed, settings=settings))
    assert status["phase"] == "Failed"
    assert conditions(status)["Failed"]["reason"] == "BackoffLimitExceeded"


def test_unknown_dataset_size_runs_data_preparation_first():
    decision = run(body(data={"numSequences": None}))
    assert decision.phase == "Preparing"
    assert set(decision.create) == {"config", "rbac", "prepare"}
    assert "plan" not in decision.status
    reported = merged({}, decision)
    reported["dataset"] = {"numSequences": 5000, "location": "/checkpoints/prepared"}
    planned = run(body(data={"numSequences": None}, status=reported),
                  Observed(prepare=ChildState(name="job-prepare", complete=True)))
    assert planned.status["plan"]["datasetSize"] == 5000
    # The finished data-preparation Job stays for its ttlSecondsAfterFinished (its logs).
    assert "prepare" not in planned.delete and "workload" in planned.create


def test_stalled_trainer_is_marked_after_the_timeout():
    settings = Settings(stall_timeout=60.0)
    status, applied = running_status(steps=2)
    status["progress"] = {"stepsCharged": 2, "lastUpdate": "2026-01-01T12:00:00Z",
                          "mechanism": honest(status)}
    work = Observed(workload=ChildState(name="job-train", created=NOW))
    stalled = run(body(status=status, applied=applied, privacy={"epsilon": 2.0}), work,
                  now=NOW + dt.timedelta(seconds=120), settings=settings)
    cond = conditions(merged(status, stalled))["Stalled"]
    assert (cond["status"], cond["reason"]) == ("True", "NoProgress")


def test_condition_transition_time_is_kept_while_status_holds():
    first, _ = set_condition([], type_="Running", status="True", reason="A", message="",
                             now=NOW)
    later = NOW + dt.timedelta(hours=1)
    second, changed = set_condition(first, type_="Running", status="True", reason="B",
                                    message="m", now=later)
    assert changed and second[0].last_transition_time == first[0].last_transition_time
    third, _ = set_condition(second, type_="Running", status="False", reason="C", message="",
                             now=later)
    assert third[0].last_transition_time == "2026-01-01T13:00:00Z"
    assert len(third) == 1


def test_decide_is_idempotent():
    b = body(privacy={"epsilon": 2.0})
    first = run(b)
    b["status"] = merged({}, first)
    b["metadata"]["annotations"] = {ANNOTATION_APPLIED_SPEC: json.dumps(first.applied_spec)}
    second = run(b, Observed(workload=ChildState(name="job-train", created=NOW)))
    assert second.status == {} and second.create == [] and second.events == []
    assert spec_json is not None


@pytest.mark.parametrize(("trained", "phase"), [(10, "Succeeded"), (7, "BudgetExhausted")])
def test_a_ledger_at_the_iterations_is_success_only_if_the_model_trained_them(trained, phase):
    # Restarts charge repeated steps again, so the ledger can reach the plan's iterations
    # before the model has done them: that job may not run more, but it did not finish.
    status, applied = running_status(steps=9, budget=5.0, iterations=10)
    status["progress"] = {"stepsCharged": 10, "step": trained, "mechanism": honest(status)}
    work = Observed(workload=ChildState(name="job-train", created=NOW))
    decision = run(body(status=status, applied=applied, privacy={"epsilon": 5.0},
                        training={"iterations": 10}), work)
    assert decision.phase == phase
    assert decision.delete == ["workload"]
    if phase == "BudgetExhausted":
        assert conditions(merged(status, decision))["BudgetExhausted"]["reason"] == \
            "MaxStepsReached"


def test_a_workload_failing_after_the_deadline_ends_the_job_whatever_its_reason():
    deadline = (NOW - dt.timedelta(seconds=1)).isoformat()
    status, applied = running_status(steps=3)
    spec_applied = dict(applied, compute=dict(applied.get("compute") or {}, deadline=deadline))
    decision = run(body(status=status, applied=spec_applied, privacy={"epsilon": 2.0},
                        compute={"deadline": deadline}),
                   Observed(workload=ChildState(name="job-train", failed=True,
                                                message="FailedJobs: jobset failed")))
    assert decision.phase == "Failed" and decision.create == []
    failed = conditions(merged(status, decision))["Failed"]
    assert failed["reason"] == "DeadlineExceeded"
    assert decision.status.get("restarts", 0) == 0
