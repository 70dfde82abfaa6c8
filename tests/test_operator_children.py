"""The operator's children: valid Kubernetes objects, owned, least-privileged, hardened."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
from kube_samples import job_manifest

from dptrain.api import PlanStatus, parse_job
from dptrain.operator import (
    ChildNames,
    JobRef,
    PodSizing,
    build_config_map,
    build_headless_service,
    build_jobset,
    build_prepare_job,
    build_role,
    build_role_binding,
    build_service_account,
    build_trainer_job,
)

JOB = JobRef(name="tiny", namespace="research", uid="0b6c3c1e-0000-4000-8000-000000000001")

PLAN = PlanStatus(
    model_preset="tiny", model_params=90624, batch_size=64, iterations=1000,
    noise_multiplier=1.0, noise_batch_ratio=1 / 64, sampling_rate=0.032,
    physical_batch_size=128, dataset_size=2000, sequence_length=64, clip_norm=1.0,
    learning_rate=3e-3, compute_flops=2.2e12, hosts=4, chips_per_host=4, max_steps=31,
    epsilon_planned=1.99, accountant="rdp", spec_generation=1)

TPU = PodSizing(hosts=4, resources={"requests": {"google.com/tpu": "4", "cpu": "8"},
                                    "limits": {"google.com/tpu": "4"}},
                node_selector={"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
                               "cloud.google.com/gke-tpu-topology": "4x4"},
                tolerations=({"key": "google.com/tpu", "operator": "Exists",
                              "effect": "NoSchedule"},))


def spec(**overrides):
    return parse_job(job_manifest("tiny", namespace="research", **overrides)).spec


def all_children(s=None):
    s = s or spec()
    return [build_config_map(s, JOB, PLAN, None), build_service_account(JOB), build_role(JOB),
            build_role_binding(JOB), build_headless_service(JOB),
            build_trainer_job(s, JOB, PLAN, TPU), build_prepare_job(s, JOB)]


@pytest.mark.parametrize("index", range(7))
def test_every_child_is_a_valid_kubernetes_object_owned_by_the_job(index):
    child = all_children()[index]
    kubernetes_validate.validate(child, "1.32", strict=True)
    (owner,) = child["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob",
                     "name": "tiny", "uid": JOB.uid, "controller": True,
                     "blockOwnerDeletion": True}
    assert child["metadata"]["namespace"] == "research"
    assert child["metadata"]["labels"]["dptrain.io/job"] == "tiny"


def test_trainer_job_is_indexed_with_jax_env_and_planner_sizing():
    job = build_trainer_job(spec(), JOB, PLAN, TPU, api_server="https://api.example:6443")
    s = job["spec"]
    assert (s["completionMode"], s["completions"], s["parallelism"]) == ("Indexed", 4, 4)
    pod = s["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["dptrain", "train", "--config", "/etc/dptrain/config.json",
                                    "--key-file", "/var/run/secrets/dptrain.io/key"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JAX_NUM_PROCESSES"]["value"] == "4"
    assert env["JAX_COORDINATOR_ADDRESS"]["value"] == "tiny-train-0.tiny-hosts:8476"
    assert env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert env["DPTRAIN_API_SERVER"]["value"] == "https://api.example:6443"
    assert env["DPTRAIN_REPORT"]["value"] == "kubernetes"
    assert (env["DPTRAIN_JOB_NAME"]["value"], env["DPTRAIN_JOB_NAMESPACE"]["value"]) == (
        "tiny", "research")
    assert container["resources"]["limits"] == {"google.com/tpu": "4"}
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4"
    assert pod["tolerations"][0]["key"] == "google.com/tpu"
    assert pod["subdomain"] == "tiny-hosts" == build_headless_service(JOB)["metadata"]["name"]
    assert pod["serviceAccountName"] == "tiny-trainer"
    assert s["backoffLimit"] == 0  # restarts are the operator's, from the ledger


def test_pods_run_non_root_read_only_without_capabilities():
    for child in (build_trainer_job(spec(), JOB, PLAN, TPU), build_prepare_job(spec(), JOB)):
        pod = child["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts and "/etc/dptrain" in mounts


def test_role_may_only_read_its_job_and_patch_its_status():
    rules = build_role(JOB)["rules"]
    for rule in rules:
        assert rule["resourceNames"] == ["tiny"]
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        assert set(rule["verbs"]) <= {"get", "patch"}
    patchable = [r for r in rules if "patch" in r["verbs"]]
    assert [r["resources"] for r in patchable] == [["dptrainingjobs/status"]]
    binding = build_role_binding(JOB)
    assert binding["roleRef"]["name"] == build_role(JOB)["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tiny-trainer",
                                    "namespace": "research"}]


def test_config_map_holds_a_manifest_with_in_pod_paths_and_the_plan():
    s = spec(data={"builtin": None, "path": "corpus/docs.jsonl",
                   "volume": {"claimName": "corpus", "subPath": "v1"}},
             checkpoint={"path": "runs/tiny", "volume": {"claimName": "ckpt", "readOnly": False}})
    config = json.loads(build_config_map(s, JOB, PLAN, None)["data"]["config.json"])
    parsed = parse_job(config)  # the trainer can read it back as a DPTrainingJob
    assert parsed.spec.data.path == "/data/corpus/docs.jsonl"
    assert parsed.spec.data.volume is None and parsed.spec.checkpoint.volume is None
    assert parsed.spec.checkpoint.path == "/checkpoints/runs/tiny"
    assert parsed.status is not None and parsed.status.plan == PLAN
    mounts = {m["mountPath"]: m for m in build_trainer_job(s, JOB, PLAN, TPU)["spec"]["template"]
              ["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/data"]["subPath"] == "v1" and mounts["/data"]["readOnly"] is True
    assert "readOnly" not in mounts["/checkpoints"]


def test_child_names_fit_dns_limits_for_long_job_names():
    name = "a" * 63
    names = ChildNames.of(name)
    assert len(names.workload) <= 52 and len(names.prepare) <= 52
    assert all(len(n) <= 63 for n in vars(names).values())
    assert names != ChildNames.of("a" * 62 + "b")  # hashed, not merely truncated
    assert ChildNames.of("7up").service[0].isalpha()  # Service names are DNS-1035


def test_jobset_variant_wires_the_coordinator_through_jobset_dns():
    jobset = build_jobset(spec(), JOB, PLAN, TPU)
    (replicated,) = jobset["spec"]["replicatedJobs"]
    pod = replicated["template"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["JAX_COORDINATOR_ADDRESS"] == "tiny-train-node-0-0.tiny-train:8476"
    assert replicated["template"]["spec"]["completions"] == 4
    assert jobset["metadata"]["ownerReferences"][0]["controller"] is True
