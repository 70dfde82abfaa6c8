"""Sizing that fits: pods sized once with the plan, fitted to node allocatable, never re-planned.

Unit checks of the allocatable table and the fitting, then the real operator over HTTP: the
plan's pods in ``status.plan.pods``, the workload built from them (also after a restart), a plan
whose pods fit no node refused with the shortfall, and ``PodsScheduled`` from the pods.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time

import kubernetes_validate
import pytest
import yaml
from kube_samples import job_manifest
from kube_waiting import wait_for

from dptrain.api import parse_job
from dptrain.operator._fit import PodsDoNotFitError, _q, size_pods
from dptrain.operator._machines import (
    GIB,
    MACHINES,
    MIB,
    eks_reserved_memory,
    gke_reserved_memory,
    reserved_cpu_milli,
)
from dptrain.operator._profiles import OperatorConfig, placements
from dptrain.operator._tools import OperatorTools
from dptrain.planner import ACCELERATORS
from dptrain.planner._accelerators import candidate_slices

JOBS = "dptrain.io/v1alpha1/dptrainingjobs"


# ------------------------------------------------------------------------------ the table


def test_reservation_formulas_match_the_documented_tiers():
    # GKE: 25 % of 4 GiB + 20 % of 4 GiB + 10 % of 8 GiB = 2.6 GiB on a 16 GiB node; 2 % above
    # 128 GiB: 1 + 0.8 + 0.8 + 6.72 + 0.02 × 128 = 11.88 GiB on 256 GiB.
    assert gke_reserved_memory(16 * GIB) == pytest.approx(2.6 * GIB, abs=1)
    assert gke_reserved_memory(256 * GIB) == pytest.approx(11.88 * GIB, abs=1)
    assert gke_reserved_memory(512 * MIB) == 255 * MIB
    # CPU: 6 % + 1 % + 2 × 0.5 % of the first 4 cores = 80m; + 0.25 % of each further core.
    assert reserved_cpu_milli(4) == 80 and reserved_cpu_milli(44) == 180
    # EKS AMI: 11 MiB per pod + 255 MiB.
    assert eks_reserved_memory(110) == 1465 * MIB


def test_allocatable_is_below_nominal_by_the_reservations():
    v6e = MACHINES["ct6e-standard-1t"]
    nominal = 176 * GIB
    expected = int(nominal * 0.97) - gke_reserved_memory(int(nominal * 0.97)) - 100 * MIB
    assert v6e.allocatable_memory == expected
    assert v6e.allocatable_cpu_milli == 44_000 - 180
    p5 = MACHINES["p5.48xlarge"]
    assert p5.allocatable_memory == int(2048 * GIB * 0.97) - (11 * 100 + 255) * MIB - 100 * MIB


@pytest.mark.parametrize("profile", ["gke", "eks"])
def test_every_planner_slice_fits_a_node_of_its_shipped_profile(profile):
    chosen = placements(OperatorConfig(gpu_profile=profile))
    tools = OperatorTools(placements=chosen)
    accelerators = [a for a, s in ACCELERATORS.items()
                    if s.kind == "gpu" or (s.kind == "tpu" and profile == "gke")]
    for accelerator in accelerators:
        spec = ACCELERATORS[accelerator]
        for sl in candidate_slices(spec, max_hosts=64, max_chips_per_host=None, topology=None):
            pod = _pod_of(tools, accelerator, sl)
            pods = size_pods(pod, chosen, accelerator)
            machine = MACHINES[pods.machine_type]
            requests = pods.resources["requests"]
            # Within what one pod may ask of that machine, in binary units.
            assert _q(requests["cpu"]) * 1000 <= machine.usable_cpu_milli, (accelerator, sl)
            assert _q(requests["memory"]) <= machine.usable_memory, (accelerator, sl)
            assert _q(requests["memory"]) >= pod.host_memory_required
            assert machine.accelerators >= pod.chips_per_host


def _pod_of(tools, accelerator, sl):
    """The planner's pod for the tiny model on slice ``sl`` (topology pinned for TPUs)."""
    compute = {"accelerator": accelerator, "maxHosts": max(1, sl.hosts),
               "maxChipsPerHost": sl.chips_per_host}
    if sl.topology is not None:
        compute = {"accelerator": accelerator, "tpuTopology": sl.topology}
    spec = parse_job(job_manifest("x", compute=compute)).spec
    return tools._plan(spec, 2000).pod


def test_a_v5e_host_asks_less_than_the_planner_default_to_fit_its_node():
    tools = OperatorTools()
    spec = parse_job(job_manifest("x", compute={"accelerator": "tpu-v5e",
                                               "tpuTopology": "1x1"})).spec
    pod = tools._plan(spec, 2000).pod
    assert pod.resources["requests"]["cpu"] == "24"  # the planner's 24 cores per chip ...
    pods = tools.plan(spec, 2000).pods
    machine = MACHINES["ct5lp-hightpu-1t"]  # ... on a 24-vCPU VM: would never schedule
    assert pods.machine_type == machine.name
    assert pods.resources["requests"]["cpu"] == f"{machine.usable_cpu_milli}m"
    assert _q(pods.resources["requests"]["memory"]) <= machine.usable_memory < 48 * GIB
    assert pods.node_selector["cloud.google.com/gke-tpu-topology"] == "1x1"


def test_a_pod_that_fits_no_node_is_refused_naming_the_shortfall():
    tools = OperatorTools()
    spec = parse_job(job_manifest("x", compute={"accelerator": "tpu-v5e",
                                               "tpuTopology": "2x2"})).spec
    pod = dataclasses.replace(tools._plan(spec, 2000).pod, host_memory_required=240 * GIB)
    with pytest.raises(PodsDoNotFitError) as caught:
        size_pods(pod, placements(), "tpu-v5e")
    usable = MACHINES["ct5lp-hightpu-4t"].usable_memory / GIB
    assert str(caught.value) == (
        "spec.compute.accelerator: the trainer pod fits no node of the 'gke' profile: "
        f"requests 240Gi memory; the largest ct5lp-hightpu-4t node allocates {usable:.4g}Gi "
        "to a pod")


# ------------------------------------------------------------------------------ the operator


def _config(tmp_path, body):
    path = tmp_path / "operator.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def _status(kube, name):
    return (kube.get_job(name) or {}).get("status") or {}


def _condition(kube, name, type_):
    return next((c for c in _status(kube, name).get("conditions", []) if c["type"] == type_),
                None)


@pytest.mark.e2e
def test_workload_is_built_from_the_stored_pods_also_after_a_restart(kube, start_operator):
    start_operator("--restart-backoff", "0.2")
    kube.create_job(job_manifest("tpu", compute={"accelerator": "tpu-v5e",
                                                 "tpuTopology": "1x1"}))
    workload = wait_for(lambda: kube.get("batch/v1/jobs", "default", "tpu-train"),
                        what="the trainer Job", describe=lambda: repr(_status(kube, "tpu")))
    pods = _status(kube, "tpu")["plan"]["pods"]
    assert pods["machineType"] == "ct5lp-hightpu-1t" and pods["profile"] == "gke"
    template = workload["spec"]["template"]["spec"]
    assert template["containers"][0]["resources"] == pods["resources"]
    assert template["nodeSelector"] == pods["nodeSelector"]
    assert template["tolerations"] == pods["tolerations"]
    # The trainer's config does not carry the pods (they are the operator's business).
    config = kube.get("v1/configmaps", "default", "tpu-config")
    assert '"pods"' not in config["data"]["config.json"]
    clean = {k: v for k, v in workload.items() if k != "status"}
    clean["metadata"] = {k: workload["metadata"][k] for k in ("name", "namespace", "labels")}
    kubernetes_validate.validate(clean, "1.32", strict=True)
    # A failed attempt: the next workload is built from the same record, not a re-plan.
    kube.merge_patch("batch/v1/jobs", "default", "tpu-train", {"status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "pod exited with 1"}]}}, "status")
    again = wait_for(lambda: _status(kube, "tpu").get("restarts") == 1
                     and (w := kube.get("batch/v1/jobs", "default", "tpu-train"))
                     and not (w.get("status") or {}).get("conditions") and w,
                     what="the second workload", timeout=30)
    assert again["spec"]["template"]["spec"]["containers"][0]["resources"] == pods["resources"]
    assert _status(kube, "tpu")["plan"]["pods"] == pods


@pytest.mark.e2e
def test_a_plan_whose_pods_fit_no_node_is_refused(kube, start_operator, tmp_path):
    small = {"name": "small-gpu-node", "accelerators": 8, "cpu": "30", "memory": "1Gi"}
    start_operator("--config", _config(tmp_path, {"gpuProfile": "onprem", "profiles": {
        "onprem": {"accelerators": {name: {"nodes": [small]} for name in
                                    ("nvidia-a100-80gb", "nvidia-h100-80gb", "nvidia-h200")}}}}))
    kube.create_job(job_manifest("toobig", compute={"accelerator": "nvidia-h100-80gb"}))
    planned = wait_for(lambda: (c := _condition(kube, "toobig", "Planned"))
                       and c["status"] == "False" and c,
                       what="the refusal", describe=lambda: repr(_status(kube, "toobig")))
    assert planned["reason"] == "PodsDoNotFit"
    assert planned["message"].startswith(
        "spec.compute.accelerator: the trainer pod fits no node of the 'onprem' profile: "
        "requests ")
    assert "memory; the largest small-gpu-node node allocates 1Gi to a pod" in planned["message"]
    assert _status(kube, "toobig")["phase"] == "Failed"
    assert kube.get("batch/v1/jobs", "default", "toobig-train") is None  # nothing Pending


def _trainer_pod(kube, job, name, *, attempt="0"):
    """Play the Job controller: a trainer pod of ``job``'s workload (labels and attempt)."""
    workload = kube.get("batch/v1/jobs", "default", f"{job}-train")
    template = workload["spec"]["template"]
    return kube.create("v1/pods", "default", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"]["labels"],
                     "annotations": {"dptrain.io/restart": attempt},
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                          "name": workload["metadata"]["name"],
                                          "uid": workload["metadata"]["uid"],
                                          "controller": True}]},
        "spec": template["spec"]})


@pytest.mark.e2e
def test_unschedulable_pods_are_reported_not_stalled(kube, start_operator):
    start_operator("--timer-interval", "0.5", "--stall-timeout", "3")
    kube.create_job(job_manifest("waits"))
    wait_for(lambda: kube.get("batch/v1/jobs", "default", "waits-train"), what="the workload")
    _trainer_pod(kube, "waits", "waits-train-0")
    scheduler = ("0/3 nodes are available: 3 Insufficient google.com/tpu. preemption: 0/3 "
                 "nodes are available: 3 No preemption victims found for incoming pod.")
    kube.merge_patch("v1/pods", "default", "waits-train-0", {"status": {"phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": scheduler}]}}, "status")
    placed = wait_for(lambda: (c := _condition(kube, "waits", "PodsScheduled"))
                      and c["status"] == "False" and c, what="PodsScheduled=False",
                      describe=lambda: repr(_status(kube, "waits")))
    assert placed["reason"] == "Unschedulable"
    assert placed["message"] == f"pod waits-train-0 cannot be scheduled: {scheduler}"
    assert _status(kube, "waits")["phase"] == "Pending"
    # Longer than the stall timeout: waiting for nodes is not a stalled trainer.
    time.sleep(3.5)  # the stall timeout (3 s) must pass for the assertion to mean anything
    assert _condition(kube, "waits", "Stalled") is None
    assert _status(kube, "waits")["phase"] == "Pending"
    assert any(e["reason"] == "Unschedulable" for e in kube.events_for("waits"))
    # The scheduler places it: Running, PodsScheduled=True.
    kube.merge_patch("v1/pods", "default", "waits-train-0", {"status": {"phase": "Running",
        "conditions": [{"type": "PodScheduled", "status": "True"}]}}, "status")
    wait_for(lambda: _status(kube, "waits").get("phase") == "Running"
             and _condition(kube, "waits", "PodsScheduled")["status"] == "True",
             what="Running once scheduled", describe=lambda: repr(_status(kube, "waits")))


# ------------------------------------------------------------------------------ decisions


def _decide(body, tools, observed=None):
    from dptrain.operator import Observed, decide

    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return decide(body, observed or Observed(), now, tools=tools)


def _body(name, status=None, **overrides):
    manifest = job_manifest(name, **overrides)
    manifest["metadata"].update(uid="uid-1", generation=1)
    if status is not None:
        manifest["status"] = status
    return manifest


class _CountingTools(OperatorTools):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.plans = 0

    def plan(self, spec, dataset_size):
        self.plans += 1
        return super().plan(spec, dataset_size)


def test_a_plan_of_an_earlier_version_gets_its_pods_sized_once_and_recorded():
    tools = _CountingTools()
    first = _decide(_body("legacy"), tools)
    status = dict(first.status)
    status["plan"] = {k: v for k, v in status["plan"].items() if k != "pods"}  # as it was
    status["phase"] = "Planned"
    again = _decide(_body("legacy", status=status), tools)
    assert again.status["plan"]["pods"] == first.status["plan"]["pods"]
    assert "workload" in again.create and tools.plans == 2
    # Once recorded, building a workload plans nothing.
    status.update(again.status)
    _decide(_body("legacy", status=status), tools)
    assert tools.plans == 2


def test_pods_that_fit_no_node_fail_the_plan_recoverably():
    tools = OperatorTools(placements=placements(OperatorConfig.model_validate(
        {"gpuProfile": "small", "profiles": {"small": {"accelerators": {
            name: {"nodes": [{"name": "n", "accelerators": 8, "cpu": "8", "memory": "1Gi"}]}
            for name in ("nvidia-a100-80gb", "nvidia-h100-80gb", "nvidia-h200")}}}})))
    decision = _decide(_body("big", compute={"accelerator": "nvidia-h100-80gb"}), tools)
    assert decision.phase == "Failed" and decision.create == []
    planned = next(c for c in decision.status["conditions"] if c["type"] == "Planned")
    assert planned["reason"] == "PodsDoNotFit"
    assert "the largest n node allocates 1Gi to a pod" in planned["message"]
    # The user picks what fits (here: CPU): the job is planned again, not stuck Failed.
    status = dict(decision.status)
    fixed = _body("big", status=status, compute={"accelerator": "cpu"})
    fixed["metadata"]["generation"] = 2
    assert _decide(fixed, tools).phase == "Running"
