"""Lifecycle hygiene, with the real operator over HTTP against the emulator.

No finalizer on DPTrainingJobs (a job deleted while the operator is down is gone); finished and
failed workloads kept for ``spec.ttlSecondsAfterFinished`` with the trainer's last words in the
failure condition; disruptions not counted against ``maxRestarts``; ``compute.deadline`` as the
Job's ``activeDeadlineSeconds``.
"""

from __future__ import annotations

import datetime as dt
import re

import kubernetes_validate
import pytest
from kube_samples import job_manifest
from kube_waiting import wait_for

from dptrain.api import PlanStatus, parse_job
from dptrain.operator import (
    JobRef,
    PodSizing,
    build_jobset,
    build_prepare_job,
    build_trainer_job,
)
from dptrain.operator._pod_status import MESSAGE_LIMIT, pods_view
from dptrain.operator._workloads import Lifecycle

pytestmark = pytest.mark.e2e

JOBS = "dptrain.io/v1alpha1/dptrainingjobs"


def _status(kube, name):
    return (kube.get_job(name) or {}).get("status") or {}


def _condition(kube, name, type_):
    return next((c for c in _status(kube, name).get("conditions", []) if c["type"] == type_),
                None)


def _sweeps(operator) -> float:
    """How many sweep passes (trigger ``timer``) the operator has made."""
    found = re.search(r'dptrain_reconcile_duration_seconds_count\{handler="timer"\} (\S+)',
                      operator.metrics())
    return float(found.group(1)) if found else 0.0


def _after_two_sweeps(operator):
    """Wait until the operator has looked at every job twice more (a decision has been made)."""
    start = _sweeps(operator)
    wait_for(lambda: _sweeps(operator) >= start + 2, what="two more sweeps")


def _fail_workload(kube, job, *, reason="BackoffLimitExceeded", message="pod exited with 1"):
    """Play the Job controller: the trainer Job failed."""
    kube.merge_patch("batch/v1/jobs", "default", f"{job}-train", {"status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": reason, "message": message}]}},
        "status")


def _pod(kube, job, name, *, status, attempt="0"):
    """Play the Job controller and the kubelet: a trainer pod of ``job``'s current workload."""
    workload = kube.get("batch/v1/jobs", "default", f"{job}-train")
    template = workload["spec"]["template"]
    kube.create("v1/pods", "default", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"]["labels"],
                     "annotations": {"dptrain.io/restart": attempt},
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                          "name": workload["metadata"]["name"],
                                          "uid": workload["metadata"]["uid"],
                                          "controller": True}]},
        "spec": template["spec"]})
    kube.merge_patch("v1/pods", "default", name, {"status": status}, "status")


def test_no_finalizer_so_a_job_deleted_while_the_operator_is_down_is_gone(kube, start_operator):
    operator = start_operator()
    kube.create_job(job_manifest("orphan"))
    # A job left with the finalizer of an earlier operator version: it is taken off.
    legacy = job_manifest("legacy")
    legacy["metadata"]["finalizers"] = ["dptrain.io/operator"]
    kube.create_job(legacy)
    wait_for(lambda: kube.get("batch/v1/jobs", "default", "orphan-train"), what="a workload")
    wait_for(lambda: not (kube.get_job("legacy") or {}).get("metadata", {}).get("finalizers"),
             what="the legacy finalizer removed",
             describe=lambda: repr(kube.get_job("legacy")["metadata"]))
    assert not kube.get_job("orphan")["metadata"].get("finalizers")
    operator.stop()
    kube.delete(JOBS, "default", "orphan")
    assert kube.get_job("orphan") is None  # at once: nothing waits for the operator
    wait_for(lambda: kube.get("batch/v1/jobs", "default", "orphan-train") is None,
             what="the workload collected with its owner")


def test_finished_workload_is_kept_for_its_ttl(kube, start_operator):
    operator = start_operator("--timer-interval", "0.3")
    kube.create_job(job_manifest("done", ttlSecondsAfterFinished=600))
    workload = wait_for(lambda: kube.get("batch/v1/jobs", "default", "done-train"),
                        what="the workload")
    assert workload["spec"]["ttlSecondsAfterFinished"] == 600
    assert workload["spec"]["template"]["spec"]["containers"][0][
        "terminationMessagePolicy"] == "FallbackToLogsOnError"
    kube.merge_patch("batch/v1/jobs", "default", "done-train", {"status": {"conditions": [
        {"type": "Complete", "status": "True"}]}}, "status")
    wait_for(lambda: _status(kube, "done").get("phase") == "Succeeded", what="Succeeded")
    _after_two_sweeps(operator)
    kept = kube.get("batch/v1/jobs", "default", "done-train")
    assert kept is not None and kept["metadata"]["uid"] == workload["metadata"]["uid"]
    # Kubernetes' TTL controller deletes it after 600 s; the default is an hour.
    kube.create_job(job_manifest("plain"))
    plain = wait_for(lambda: kube.get("batch/v1/jobs", "default", "plain-train"),
                     what="the second workload")
    assert plain["spec"]["ttlSecondsAfterFinished"] == 3600


def test_failure_message_of_the_trainer_is_in_the_failed_condition(kube, start_operator):
    start_operator("--timer-interval", "0.3")
    kube.create_job(job_manifest("crash", maxRestarts=0))
    wait_for(lambda: kube.get("batch/v1/jobs", "default", "crash-train"), what="the workload")
    last_words = "Traceback (most recent call last): ... ValueError: shard 7 is truncated"
    _pod(kube, "crash", "crash-train-0", status={"phase": "Failed", "containerStatuses": [{
        "name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
        "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": last_words}}}]})
    _fail_workload(kube, "crash")
    failed = wait_for(lambda: (c := _condition(kube, "crash", "Failed"))
                      and c["status"] == "True" and c, what="Failed",
                      describe=lambda: repr(_status(kube, "crash")))
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"] == (
        "the trainer failed 1 times (BackoffLimitExceeded: pod exited with 1; exit 1 (Error): "
        f"{last_words}); spec.maxRestarts is 0")
    # The failed workload and its pod stay for the TTL, so `kubectl logs` still works.
    assert kube.get("batch/v1/jobs", "default", "crash-train") is not None
    assert kube.get("v1/pods", "default", "crash-train-0") is not None


def test_failed_data_preparation_reports_its_last_words_and_stays(kube, start_operator):
    start_operator("--timer-interval", "0.3")
    kube.create_job(job_manifest("prep", data={"numSequences": None}))
    prepare = wait_for(lambda: kube.get("batch/v1/jobs", "default", "prep-prepare"),
                       what="the data-preparation Job")
    assert prepare["spec"]["ttlSecondsAfterFinished"] == 3600
    template = prepare["spec"]["template"]
    kube.create("v1/pods", "default", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "prep-prepare-x7k2p", "labels": template["metadata"]["labels"]},
        "spec": template["spec"]})
    kube.merge_patch("v1/pods", "default", "prep-prepare-x7k2p", {"status": {
        "phase": "Failed", "containerStatuses": [{"name": "prepare", "state": {"terminated": {
            "exitCode": 2, "reason": "Error",
            "message": "FileNotFoundError: /data/corpus.jsonl"}}}]}}, "status")
    kube.merge_patch("batch/v1/jobs", "default", "prep-prepare", {"status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]}}, "status")
    failed = wait_for(lambda: (c := _condition(kube, "prep", "DataPrepared"))
                      and c["status"] == "False" and c["reason"] == "DataPreparationFailed"
                      and c, what="DataPrepared=False",
                      describe=lambda: repr(_status(kube, "prep")))
    assert failed["message"] == (
        "BackoffLimitExceeded: Job has reached the specified backoff limit; exit 2 (Error): "
        "FileNotFoundError: /data/corpus.jsonl")
    assert kube.get("batch/v1/jobs", "default", "prep-prepare") is not None  # kept: logs


def test_disruption_restarts_do_not_use_up_max_restarts(kube, start_operator):
    start_operator("--restart-backoff", "0.2", "--timer-interval", "0.3")
    kube.create_job(job_manifest("preempted", maxRestarts=0))
    first = wait_for(lambda: kube.get("batch/v1/jobs", "default", "preempted-train"),
                     what="the workload")
    _pod(kube, "preempted", "preempted-train-0", status={"phase": "Failed", "conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
         "message": "Kueue: preempted to accommodate a higher priority workload"}]})
    _fail_workload(kube, "preempted")
    second = wait_for(lambda: (w := kube.get("batch/v1/jobs", "default", "preempted-train"))
                      and w["metadata"]["uid"] != first["metadata"]["uid"] and w,
                      what="a new workload after the disruption",
                      describe=lambda: repr(_status(kube, "preempted")))
    status = _status(kube, "preempted")
    assert status.get("restarts", 0) == 0 and status["disruptions"] == 1
    assert status["phase"] == "Running"
    assert second["metadata"]["annotations"]["dptrain.io/restart"] == "1"  # attempt 2
    restarted = _condition(kube, "preempted", "Restarting")
    assert restarted["message"] == "restart 0 of 0, after 1 disruptions (not counted)"
    disrupted = [e for e in kube.events_for("preempted") if e["reason"] == "Disrupted"]
    assert "pods preempted-train-0 were disrupted" in disrupted[0]["message"]
    assert "not counted against spec.maxRestarts" in disrupted[0]["message"]
    # A real failure of the new attempt is counted: maxRestarts 0 fails the job.
    _fail_workload(kube, "preempted")
    wait_for(lambda: _status(kube, "preempted").get("phase") == "Failed", what="Failed")


def test_deadline_becomes_active_deadline_seconds_and_ends_the_job(kube, start_operator):
    start_operator("--restart-backoff", "0.2", "--timer-interval", "0.3")
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    kube.create_job(job_manifest("due", compute={"deadline": deadline.isoformat()}))
    workload = wait_for(lambda: kube.get("batch/v1/jobs", "default", "due-train"),
                        what="the workload")
    left = (deadline - dt.datetime.now(dt.UTC)).total_seconds()
    assert left - 60 <= workload["spec"]["activeDeadlineSeconds"] <= left + 1
    _fail_workload(kube, "due", reason="DeadlineExceeded",
                   message="Job was active longer than specified deadline")
    failed = wait_for(lambda: (c := _condition(kube, "due", "Failed"))
                      and c["status"] == "True" and c, what="Failed")
    assert failed["reason"] == "DeadlineExceeded"  # final: not restarted
    assert _status(kube, "due").get("restarts", 0) == 0


# ------------------------------------------------------------------------------ pure parts


def test_rendered_workloads_with_lifecycle_fields_are_valid_kubernetes():
    spec = parse_job(job_manifest("v", namespace="ns")).spec
    job = JobRef(name="v", namespace="ns", uid="0b6c3c1e-0000-4000-8000-000000000001")
    plan = PlanStatus(
        model_preset="tiny", model_params=1, batch_size=1, iterations=1, noise_multiplier=1,
        noise_batch_ratio=1, sampling_rate=0.1, physical_batch_size=1, dataset_size=10,
        sequence_length=16, clip_norm=1, learning_rate=1e-3, compute_flops=1, max_steps=1,
        epsilon_planned=1)
    trainer = build_trainer_job(spec, job, plan, PodSizing(), lifecycle=Lifecycle(
        ttl_seconds_after_finished=3600, active_deadline_seconds=7200))
    prepare = build_prepare_job(spec, job, ttl_seconds_after_finished=60)
    for obj in (trainer, prepare):
        kubernetes_validate.validate(obj, "1.32", strict=True)
    assert (trainer["spec"]["ttlSecondsAfterFinished"],
            trainer["spec"]["activeDeadlineSeconds"]) == (3600, 7200)
    assert prepare["spec"]["ttlSecondsAfterFinished"] == 60
    jobset = build_jobset(spec, job, plan, PodSizing(), lifecycle=Lifecycle(
        ttl_seconds_after_finished=3600, active_deadline_seconds=7200))
    inner = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert jobset["spec"]["ttlSecondsAfterFinished"] == 3600  # the JobSet deletes its Jobs
    assert inner["activeDeadlineSeconds"] == 7200 and "ttlSecondsAfterFinished" not in inner
    assert inner["template"]["spec"]["containers"][0][
        "terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_pods_view_reads_scheduling_disruption_and_last_words():
    long = "x" * (MESSAGE_LIMIT + 500) + " the end"
    view = pods_view([
        {"metadata": {"name": "b"}, "status": {"conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/1 nodes are available:\n 1 Insufficient cpu."}]}},
        {"metadata": {"name": "a"}, "spec": {"nodeName": "n1"}, "status": {
            "conditions": [{"type": "DisruptionTarget", "status": "True"}],
            "containerStatuses": [{"state": {"terminated": {
                "exitCode": 137, "reason": "OOMKilled", "message": long}}}]}},
    ])
    assert (view.total, view.scheduled) == (2, 1)
    assert view.unschedulable == (("b", "0/1 nodes are available: 1 Insufficient cpu."),)
    assert view.disrupted == ("a",)
    assert view.termination is not None
    assert view.termination.startswith("exit 137 (OOMKilled): …")
    assert view.termination.endswith(" the end") and len(view.termination) < MESSAGE_LIMIT + 40


@pytest.fixture()
def jobset_api():
    from kube_server import EmulatorServer

    server = EmulatorServer(with_jobset=True).start()
    try:
        yield server
    finally:
        server.stop()


def test_jobset_workloads_keep_the_ttl_and_count_no_disruption(jobset_api, tmp_path,
                                                               planner_cache_dir):
    from kube_client import KubeHTTP
    from kube_operator import OperatorProcess

    kube = KubeHTTP(jobset_api.url)
    kubeconfig = jobset_api.write_kubeconfig(tmp_path / "kubeconfig")
    with OperatorProcess(kubeconfig, tmp_path / "operator.log", extra_args=(
            "--cache-dir", str(planner_cache_dir), "--workload", "jobset",
            "--restart-backoff", "0.2", "--timer-interval", "0.3")):
        kube.create_job(job_manifest("js", maxRestarts=0, ttlSecondsAfterFinished=120))
        resource = "jobset.x-k8s.io/v1alpha2/jobsets"
        first = wait_for(lambda: kube.get(resource, "default", "js-train"), what="the JobSet")
        assert first["spec"]["ttlSecondsAfterFinished"] == 120
        pods = _status(kube, "js")["plan"]["pods"]
        template = first["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        assert template["spec"]["containers"][0]["resources"] == pods["resources"]
        # A pod of the JobSet's Job is preempted; the JobSet fails.
        kube.create("v1/pods", "default", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "js-train-node-0-0-abcde",
                         "labels": template["metadata"]["labels"],
                         "annotations": {"dptrain.io/restart": "0"}},
            "spec": template["spec"]})
        kube.merge_patch("v1/pods", "default", "js-train-node-0-0-abcde", {"status": {
            "phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "True",
                                               "reason": "DeletionByTaintManager"}]}},
            "status")
        kube.merge_patch(resource, "default", "js-train", {"status": {"conditions": [
            {"type": "Failed", "status": "True", "reason": "FailedJobs",
             "message": "jobset failed due to one or more job failures"}]}}, "status")
        wait_for(lambda: (w := kube.get(resource, "default", "js-train"))
                 and w["metadata"]["uid"] != first["metadata"]["uid"],
                 what="a new JobSet", describe=lambda: repr(_status(kube, "js")))
        status = _status(kube, "js")
        assert status["disruptions"] == 1 and status.get("restarts", 0) == 0
        assert status["phase"] == "Running"  # maxRestarts 0, yet not failed
