"""Kueue: labels reach the workloads, queued workloads start suspended, a suspended workload is
``Queued`` (no stall clock, never unsuspended by the operator), multi-host TPU JobSets are
exclusive per node pool."""

from __future__ import annotations

import datetime as dt
import time

import kubernetes_validate
import pytest
from kube_samples import job_manifest
from kube_server import EmulatorServer
from kube_waiting import wait_for

from dptrain.api import PlanStatus, parse_job
from dptrain.operator import ChildState, JobRef, Observed, PodSizing, Settings, decide
from dptrain.operator._kueue import (
    EXCLUSIVE_TOPOLOGY,
    PRIORITY_LABEL,
    QUEUE_LABEL,
    for_queue,
    propagated_labels,
)
from dptrain.operator._workloads import build_jobset, build_prepare_job, build_trainer_job

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


class FakeTools:
    """Instant planning; ε = 0.01 per step (the accounting is not what is tested here)."""

    def plan(self, spec, dataset_size):
        return PlanStatus(
            model_preset="tiny",
            model_params=1000,
            batch_size=64,
            iterations=100,
            noise_multiplier=1.0,
            noise_batch_ratio=1 / 64,
            sampling_rate=64 / dataset_size,
            physical_batch_size=128,
            dataset_size=dataset_size,
            sequence_length=64,
            clip_norm=1.0,
            learning_rate=1e-3,
            compute_flops=1.0,
            max_steps=100,
            epsilon_planned=1.0,
            accountant=spec.privacy.accountant,
        )

    def enforce(self, plan, budget, delta, *, iterations=None):
        return plan

    def epsilon_spent(self, plan, delta, steps):
        return steps * 0.01

    def epsilon_exact(self, plan, delta, steps):
        return steps * 0.01


def merged(old_status, decision):
    status = dict(old_status or {})
    status.update(decision.status)
    return status


JOB = JobRef(name="q", namespace="default", uid="uid-1")
PLAN = PlanStatus(
    model_preset="tiny",
    model_params=90624,
    batch_size=64,
    iterations=1000,
    noise_multiplier=1.0,
    noise_batch_ratio=1 / 64,
    sampling_rate=0.032,
    physical_batch_size=128,
    dataset_size=2000,
    sequence_length=64,
    clip_norm=1.0,
    learning_rate=3e-3,
    compute_flops=2.2e12,
    hosts=4,
    chips_per_host=4,
    max_steps=31,
    epsilon_planned=1.99,
    accountant="rdp",
    spec_generation=1,
)
LABELS = {
    QUEUE_LABEL: "team-a",
    PRIORITY_LABEL: "research-high",
    "team": "nlp",
    "dptrain.io/job": "spoofed",
    "app.kubernetes.io/component": "spoofed",
}
SETTINGS = Settings(stall_timeout=60.0)


def body(labels=LABELS, status=None, **spec):
    manifest = job_manifest("q", **spec)
    manifest["metadata"].update(uid="uid-1", generation=1, labels=dict(labels))
    if status is not None:
        manifest["status"] = status
    return manifest


def test_labels_propagate_and_queued_workloads_start_suspended():
    spec = parse_job(job_manifest("q")).spec
    for workload in (
        build_trainer_job(spec, JOB, PLAN, PodSizing(hosts=2)),
        build_prepare_job(spec, JOB),
    ):
        out = for_queue(workload, LABELS)
        meta = out["metadata"]["labels"]
        assert meta[QUEUE_LABEL] == "team-a" and meta[PRIORITY_LABEL] == "research-high"
        assert meta["team"] == "nlp"
        assert meta["dptrain.io/job"] == "q"  # the operator's own keys win
        assert meta["app.kubernetes.io/component"] in ("trainer", "prepare")
        assert out["spec"]["suspend"] is True
        pod_labels = out["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["team"] == "nlp" and QUEUE_LABEL not in pod_labels
        kubernetes_validate.validate(out, "1.32", strict=True)
        assert "suspend" not in workload["spec"]  # a copy
    plain = for_queue(build_trainer_job(spec, JOB, PLAN, PodSizing()), {"team": "nlp"})
    assert "suspend" not in plain["spec"]  # no queue name: not created suspended
    assert propagated_labels(
        {"kueue.x-k8s.io/queue-name": "a", "batch.kubernetes.io/x": "1", "job-name": "x"}
    ) == {"kueue.x-k8s.io/queue-name": "a"}


def test_multi_host_tpu_jobsets_are_exclusive_per_node_pool():
    spec = parse_job(job_manifest("q", compute={"accelerator": "tpu-v6e"})).spec
    jobset = for_queue(
        build_jobset(spec, JOB, PLAN, PodSizing(hosts=4)), LABELS, multi_host_tpu=True
    )
    assert jobset["metadata"]["annotations"][EXCLUSIVE_TOPOLOGY] == "cloud.google.com/gke-nodepool"
    assert jobset["spec"]["suspend"] is True
    assert jobset["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    single = for_queue(build_jobset(spec, JOB, PLAN, PodSizing(hosts=1)), LABELS)
    assert EXCLUSIVE_TOPOLOGY not in single["metadata"].get("annotations", {})


def _conditions(status):
    return {c["type"]: c for c in status["conditions"]}


def test_a_suspended_workload_is_queued_without_a_stall_clock():
    first = decide(body(), Observed(), NOW, tools=FakeTools(), settings=SETTINGS)
    assert "workload" in first.create
    assert first.phase == "Queued"
    status = merged({}, first)
    admitted = _conditions(status)["Admitted"]
    assert (admitted["status"], admitted["reason"]) == ("False", "KueuePending")
    assert "LocalQueue team-a" in admitted["message"]
    # Hours later, still suspended: Queued, not Stalled, nothing deleted, no restart.
    later = NOW + dt.timedelta(hours=5)
    suspended = ChildState(name="q-train", suspended=True, created=NOW)
    held = decide(
        body(status=status),
        Observed(workload=suspended),
        later,
        tools=FakeTools(),
        settings=SETTINGS,
    )
    assert held.phase == "Queued" and not held.delete and not held.create
    status = merged(status, held)
    assert "Stalled" not in _conditions(status)
    assert status.get("restarts", 0) == 0
    # Admitted (Kueue unsuspended it): Running, and the stall clock starts at admission.
    running = ChildState(name="q-train", created=NOW)
    admitted_at = later + dt.timedelta(minutes=1)
    go = decide(
        body(status=status),
        Observed(workload=running),
        admitted_at,
        tools=FakeTools(),
        settings=SETTINGS,
    )
    assert go.phase == "Running"
    status = merged(status, go)
    conds = _conditions(status)
    assert conds["Admitted"]["status"] == "True" and conds["Running"]["status"] == "True"
    assert "Stalled" not in conds
    assert go.requeue_after == pytest.approx(SETTINGS.stall_timeout, abs=1.0)
    stalled = decide(
        body(status=status),
        Observed(workload=running),
        admitted_at + dt.timedelta(seconds=61),
        tools=FakeTools(),
        settings=SETTINGS,
    )
    assert _conditions(merged(status, stalled))["Stalled"]["status"] == "True"


def test_kueue_suspending_a_job_without_a_queue_label_is_also_queued():
    # manageJobsWithoutQueueName: Kueue's webhook suspends our unlabelled workload.
    first = decide(body(labels={}), Observed(), NOW, tools=FakeTools(), settings=SETTINGS)
    assert first.phase == "Running"
    status = merged({}, first)
    held = decide(
        body(labels={}, status=status),
        Observed(workload=ChildState(name="q-train", suspended=True, created=NOW)),
        NOW + dt.timedelta(hours=1),
        tools=FakeTools(),
        settings=SETTINGS,
    )
    assert held.phase == "Queued"
    assert "manageJobsWithoutQueueName" in _conditions(merged(status, held))["Admitted"]["message"]


def test_data_preparation_waits_in_the_queue_too():
    first = decide(
        body(data={"numSequences": None}), Observed(), NOW, tools=FakeTools(), settings=SETTINGS
    )
    assert "prepare" in first.create and first.phase == "Queued"


# ------------------------------------------------------------------------------ over HTTP


def _phase(kube, name):
    job = kube.get_job(name) or {}
    return (job.get("status") or {}).get("phase")


@pytest.mark.e2e
def test_operator_queues_with_kueue_and_never_unsuspends(kube, start_operator):
    start_operator("--stall-timeout", "2")
    manifest = job_manifest("queued")
    manifest["metadata"]["labels"] = {QUEUE_LABEL: "team-a", PRIORITY_LABEL: "high", "team": "nlp"}
    kube.create_job(manifest)
    prep_manifest = job_manifest("queuedprep", data={"numSequences": None})
    prep_manifest["metadata"]["labels"] = {QUEUE_LABEL: "team-a"}
    kube.create_job(prep_manifest)

    work = wait_for(
        lambda: kube.get("batch/v1/jobs", "default", "queued-train"),
        what="the trainer Job",
        describe=lambda: repr(kube.get_job("queued")),
    )
    assert work["spec"]["suspend"] is True
    assert work["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert work["metadata"]["labels"][PRIORITY_LABEL] == "high"
    assert work["spec"]["template"]["metadata"]["labels"]["team"] == "nlp"
    prep = wait_for(
        lambda: kube.get("batch/v1/jobs", "default", "queuedprep-prepare"),
        what="the data-preparation Job",
    )
    assert prep["spec"]["suspend"] is True and prep["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    wait_for(lambda: _phase(kube, "queued") == "Queued", what="phase Queued")
    wait_for(lambda: _phase(kube, "queuedprep") == "Queued", what="prep phase Queued")
    # Three stall timeouts queued: never Stalled, still suspended (the operator leaves it).
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=6)
    while dt.datetime.now(dt.UTC) < deadline:
        status = kube.get_job("queued")["status"]
        assert status["phase"] == "Queued", status
        assert "Stalled" not in _conditions(status)
        assert kube.get("batch/v1/jobs", "default", "queued-train")["spec"]["suspend"] is True
        time.sleep(0.3)
    admitted = _conditions(kube.get_job("queued")["status"])["Admitted"]
    assert (admitted["status"], admitted["reason"]) == ("False", "KueuePending")

    # Kueue admits it: unsuspends the Job. Running, Admitted, and the stall clock now runs.
    kube.merge_patch("batch/v1/jobs", "default", "queued-train", {"spec": {"suspend": False}})
    wait_for(lambda: _phase(kube, "queued") == "Running", what="phase Running")
    assert _conditions(kube.get_job("queued")["status"])["Admitted"]["status"] == "True"
    wait_for(
        lambda: "Stalled" in _conditions(kube.get_job("queued")["status"]),
        what="the stall clock running after admission",
        timeout=20,
    )
    # Kueue preempts it (suspends again): Queued, the Job kept.
    kube.merge_patch("batch/v1/jobs", "default", "queued-train", {"spec": {"suspend": True}})
    wait_for(lambda: _phase(kube, "queued") == "Queued", what="Queued after preemption")
    assert kube.get("batch/v1/jobs", "default", "queued-train") is not None


@pytest.fixture()
def jobset_kube():
    from kube_client import KubeHTTP

    server = EmulatorServer(with_jobset=True).start()
    try:
        yield server, KubeHTTP(server.url)
    finally:
        server.stop()


@pytest.mark.e2e
def test_operator_makes_queued_exclusive_tpu_jobsets(jobset_kube, tmp_path, planner_cache_dir):
    from kube_operator import OperatorProcess

    server, kube = jobset_kube
    manifest = job_manifest("tpu", compute={"accelerator": "tpu-v6e", "tpuTopology": "4x4"})
    manifest["metadata"]["labels"] = {QUEUE_LABEL: "tpu-queue"}
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    with OperatorProcess(
        kubeconfig, tmp_path / "operator.log", extra_args=("--cache-dir", str(planner_cache_dir))
    ).start():
        kube.create_job(manifest)
        jobset = wait_for(
            lambda: kube.get("jobset.x-k8s.io/v1alpha2/jobsets", "default", "tpu-train"),
            what="the JobSet",
            describe=lambda: repr(kube.get_job("tpu")),
        )
        assert jobset["metadata"]["annotations"][EXCLUSIVE_TOPOLOGY] == (
            "cloud.google.com/gke-nodepool"
        )
        assert jobset["spec"]["suspend"] is True
        assert jobset["metadata"]["labels"][QUEUE_LABEL] == "tpu-queue"
        assert jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["completions"] == 4
        wait_for(lambda: _phase(kube, "tpu") == "Queued", what="phase Queued")
