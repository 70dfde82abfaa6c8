"""The real operator process against the API emulator, driven over HTTP as kubectl would."""

from __future__ import annotations

import kube_ledger
import kubernetes_validate
import pytest
from kube_client import ApiError
from kube_samples import job_manifest
from kube_waiting import wait_for

pytestmark = pytest.mark.e2e

JOBS = "dptrain.io/v1alpha1/dptrainingjobs"
CHILD_RESOURCES = ("v1/configmaps", "v1/serviceaccounts", "rbac.authorization.k8s.io/v1/roles",
                   "rbac.authorization.k8s.io/v1/rolebindings", "v1/services", "batch/v1/jobs")


def phase_of(kube, name):
    job = kube.get_job(name)
    return (job or {}).get("status", {}).get("phase")


def wait_phase(kube, name, phase, timeout=30.0):
    return wait_for(lambda: kube.get_job(name) if phase_of(kube, name) == phase else None,
                    timeout=timeout, what=f"{name} in phase {phase}",
                    describe=lambda: repr((kube.get_job(name) or {}).get("status")))


def children(kube, name):
    out = []
    for resource in CHILD_RESOURCES:
        out += [o for o in kube.list(resource, "default")
                if (o["metadata"].get("labels") or {}).get("dptrain.io/job") == name]
    return out


def report(kube, name, **progress):
    """What the trainer does: merge-patch status.progress of its job (with its fingerprint)."""
    kube_ledger.report(kube, name, **progress)


def ledger(kube, name):
    return (kube.get_job(name) or {}).get("status", {}).get("privacy") or {}


def test_job_is_planned_and_gets_owned_valid_children(kube, start_operator):
    operator = start_operator()
    created = kube.create_job(job_manifest("planned"))
    job = wait_phase(kube, "planned", "Running")
    plan, privacy = job["status"]["plan"], job["status"]["privacy"]
    assert plan["maxSteps"] == 31 and plan["iterations"] == 1000  # rdp, σ = 1, ε = 2
    assert privacy["epsilonBudget"] == 2.0 and privacy["stepsCharged"] == 0
    objs = children(kube, "planned")
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "Job", "Role", "RoleBinding",
                                              "Service", "ServiceAccount"]
    for obj in objs:
        assert obj["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        clean = {k: v for k, v in obj.items() if k != "status"}
        meta = clean["metadata"]
        clean["metadata"] = {k: meta[k] for k in ("name", "namespace", "labels", "annotations",
                                                   "ownerReferences") if k in meta}
        kubernetes_validate.validate(clean, "1.32", strict=True)
    assert job["status"]["workload"] == {"apiVersion": "batch/v1", "kind": "Job",
                                         "name": "planned-train"}
    reasons = {e["reason"] for e in kube.events_for("planned")}
    assert {"Planned", "Running"} <= reasons
    metrics = operator.metrics()
    assert 'dptrain_job_epsilon_budget{name="planned",namespace="default"} 2.0' in metrics
    assert 'dptrain_job_phase{name="planned",namespace="default",phase="Running"} 1.0' in metrics


def test_bad_spec_fails_with_condition_and_event_and_nothing_else(kube, start_operator):
    start_operator()
    with pytest.raises(ApiError) as rejected:  # the schema is the API server's first line
        kube.create_job(job_manifest("rejected", privacy={"epsilon": -1}))
    assert rejected.value.status == 422 and "spec.privacy.epsilon" in str(rejected.value)
    kube.create_job(job_manifest("bad", privacy={"delta": 1e-3}))  # δ ≥ 1/N: semantics
    job = wait_phase(kube, "bad", "Failed")
    cond = {c["type"]: c for c in job["status"]["conditions"]}["SpecValid"]
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
    assert "spec.privacy.delta" in cond["message"] and "below 1/N" in cond["message"]
    wait_for(lambda: [e for e in kube.events_for("bad") if e["type"] == "Warning"
                      and "spec.privacy.delta" in e["message"]], what="a Warning event")
    assert children(kube, "bad") == []
    assert "plan" not in job["status"]


def test_progress_is_charged_and_a_regressing_report_is_ignored(kube, start_operator):
    start_operator()
    kube.create_job(job_manifest("ledger"))
    wait_phase(kube, "ledger", "Running")
    report(kube, "ledger", stepsCharged=8, step=8, loss=4.1)
    wait_for(lambda: ledger(kube, "ledger").get("stepsCharged") == 8, what="8 steps charged")
    spent = ledger(kube, "ledger")["epsilonSpent"]
    assert 0 < spent < 2.0
    report(kube, "ledger", stepsCharged=3, step=3, loss=4.5)
    job = wait_for(lambda: (j := kube.get_job("ledger")) and any(
        c["reason"] == "Regressed" for c in j["status"]["conditions"]) and j,
        what="the Regressed condition")
    assert job["status"]["privacy"]["stepsCharged"] == 8
    assert job["status"]["privacy"]["epsilonSpent"] == spent
    assert any(e["reason"] == "Regressed" for e in kube.events_for("ledger"))


def test_reports_up_to_the_budget_halt_the_job_and_delete_the_workload(kube, start_operator):
    operator = start_operator()
    kube.create_job(job_manifest("halt"))
    job = wait_phase(kube, "halt", "Running")
    max_steps = job["status"]["plan"]["maxSteps"]
    report(kube, "halt", stepsCharged=max_steps, step=max_steps)
    job = wait_phase(kube, "halt", "BudgetExhausted")
    privacy = job["status"]["privacy"]
    assert privacy["stepsCharged"] == max_steps
    assert privacy["epsilonSpent"] <= privacy["epsilonBudget"] == 2.0
    wait_for(lambda: kube.list("batch/v1/jobs", "default") == [], what="the workload gone")
    assert 'dptrain_jobs_halted_total{reason="EpsilonBudgetReached"}' in operator.metrics() or \
        'dptrain_jobs_halted_total{reason="MaxStepsReached"}' in operator.metrics()
    # A spec edit cannot bring the workload back (more iterations, same budget).
    kube.merge_patch(JOBS, "default", "halt", {"spec": {"training": {"iterations": 2000}}})
    report(kube, "halt", stepsCharged=max_steps, step=max_steps, loss=1.0)
    wait_for(lambda: (kube.get_job("halt") or {}).get("metadata", {}).get("generation") == 2,
             what="the edit")
    assert phase_of(kube, "halt") == "BudgetExhausted"
    assert kube.list("batch/v1/jobs", "default") == []


def test_suspend_deletes_the_workload_and_resume_recreates_it(kube, start_operator):
    start_operator()
    kube.create_job(job_manifest("pause"))
    wait_phase(kube, "pause", "Running")
    report(kube, "pause", stepsCharged=5, step=5)
    wait_for(lambda: ledger(kube, "pause").get("stepsCharged") == 5, what="5 steps charged")
    kube.merge_patch(JOBS, "default", "pause", {"spec": {"suspend": True}})
    wait_phase(kube, "pause", "Suspended")
    wait_for(lambda: kube.list("batch/v1/jobs", "default") == [], what="the workload gone")
    assert ledger(kube, "pause")["stepsCharged"] == 5
    kube.merge_patch(JOBS, "default", "pause", {"spec": {"suspend": False}})
    wait_phase(kube, "pause", "Running")
    wait_for(lambda: len(kube.list("batch/v1/jobs", "default")) == 1, what="a new workload")
    assert ledger(kube, "pause")["stepsCharged"] == 5


def test_operator_restart_keeps_the_ledger_and_never_duplicates(kube, start_operator):
    first = start_operator()
    kube.create_job(job_manifest("survivor"))
    wait_phase(kube, "survivor", "Running")
    report(kube, "survivor", stepsCharged=4, step=4)
    wait_for(lambda: ledger(kube, "survivor").get("stepsCharged") == 4, what="4 steps")
    first.kill()
    report(kube, "survivor", stepsCharged=6, step=6)  # progress while the operator is down
    start_operator()
    wait_for(lambda: ledger(kube, "survivor").get("stepsCharged") == 6, what="6 steps charged")
    kinds = sorted(o["kind"] for o in children(kube, "survivor"))
    assert kinds == ["ConfigMap", "Job", "Role", "RoleBinding", "Service", "ServiceAccount"]
    assert phase_of(kube, "survivor") == "Running"


def test_failed_trainer_is_restarted_from_the_ledger(kube, start_operator):
    start_operator("--restart-backoff", "0.2")
    kube.create_job(job_manifest("flaky"))
    wait_phase(kube, "flaky", "Running")
    report(kube, "flaky", stepsCharged=3, step=3)
    wait_for(lambda: ledger(kube, "flaky").get("stepsCharged") == 3, what="3 steps")
    # Play the Job controller: the pod failed.
    kube.merge_patch("batch/v1/jobs", "default", "flaky-train", {"status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "pod exited with 1"}]}}, "status")
    job = wait_for(lambda: (j := kube.get_job("flaky")) and j["status"].get("restarts") == 1
                   and (w := kube.get("batch/v1/jobs", "default", "flaky-train"))
                   and not (w.get("status") or {}).get("conditions") and w,
                   what="a fresh workload after one restart", timeout=30)
    assert job["metadata"]["annotations"]["dptrain.io/restart"] == "1"
    assert ledger(kube, "flaky")["stepsCharged"] == 3


def test_deleted_job_takes_its_children_and_metric_series(kube, start_operator):
    operator = start_operator()
    kube.create_job(job_manifest("doomed"))
    wait_phase(kube, "doomed", "Running")
    # The series appear after the reconcile's status write and events: poll, don't race.
    wait_for(lambda: 'name="doomed"' in operator.metrics(), what="the series")
    kube.delete(JOBS, "default", "doomed")
    wait_for(lambda: kube.get_job("doomed") is None, what="the job gone")
    wait_for(lambda: children(kube, "doomed") == [], what="the children gone",
             describe=lambda: repr([(o["kind"], o["metadata"]["name"],
                                     o["metadata"].get("creationTimestamp"))
                                    for o in children(kube, "doomed")]))
    wait_for(lambda: 'name="doomed"' not in operator.metrics(), what="the series gone")


def test_budget_series_exist_from_acceptance_before_any_plan(kube, start_operator):
    operator = start_operator()
    kube.create_job(job_manifest("early", data={"numSequences": None}))  # N unknown: prepare
    job = wait_phase(kube, "early", "Preparing")
    assert "plan" not in job["status"] and "privacy" not in job["status"]
    series = {
        'dptrain_job_epsilon_budget{name="early",namespace="default"} 2.0',
        'dptrain_job_epsilon_spent{name="early",namespace="default"} 0.0',
        'dptrain_job_steps_charged{name="early",namespace="default"} 0.0',
        'dptrain_job_phase{name="early",namespace="default",phase="Preparing"} 1.0',
    }
    wait_for(lambda: series <= set(operator.metrics().splitlines()),
             what="the budget series of a job in Preparing",
             describe=lambda: "\n".join(line for line in operator.metrics().splitlines()
                                        if 'name="early"' in line))
