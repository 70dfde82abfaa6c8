"""Every values example in docs/clusters.md renders, validates and configures the operator."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "kube"))
import deploy_render as dr

DOC = dr.REPO / "docs" / "clusters.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_examples():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_values_example_renders_and_configures_the_operator(index: int, tmp_path: Path) -> None:
    from dptrain.operator._profiles import load_config, placements

    values = yaml.safe_load(BLOCKS[index])
    path = tmp_path / "values.yaml"
    path.write_text(BLOCKS[index])
    objects = dr.helm_template(dr.CASES_BY_NAME["default"], values_files=[path])
    for obj in objects:
        dr.validate_object(obj)
    config = tmp_path / "operator.yaml"
    config.write_text(dr.one(objects, "ConfigMap", "dptrain-operator-config")["data"]
                      ["operator.yaml"])
    chosen = placements(load_config(config))
    profiles = values.get("acceleratorProfiles", {})
    assert chosen.gpu_name == profiles.get("gpu", "generic")
    assert chosen.tpu_name == profiles.get("tpu", "gke")
    if "trainer" in values:
        assert chosen.trainer.image == values["trainer"]["image"]
    deployment = dr.one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == values.get("replicas", 1)


# ------------------------------------------------------------------------------ job manifests

MANIFESTS = re.findall(r"```yaml manifest\n(.*?)```", DOC.read_text(), flags=re.S)
KUEUE_CONFIGS = re.findall(r"```yaml kueue-config\n(.*?)```", DOC.read_text(), flags=re.S)
KUEUE_API = "kueue.x-k8s.io/v1beta1"


def _documents(text: str) -> list[dict]:
    from dptrain.api import load_manifests

    return list(load_manifests(text))


def test_the_page_has_manifest_examples():
    kinds = {d["kind"] for text in MANIFESTS for d in _documents(text)}
    assert {"DPTrainingJob", "ClusterQueue", "LocalQueue", "ResourceFlavor"} <= kinds
    assert len(KUEUE_CONFIGS) == 1


@pytest.mark.parametrize("index", range(len(MANIFESTS)))
def test_manifest_example_is_valid_and_builds_valid_workloads(index: int) -> None:
    """Each job passes the CRD schema and the operator's validation; the Trainer Job and the
    data-preparation Job the operator would build from it pass kubernetes-validate --strict;
    Kueue objects refer to each other and to the job consistently; the rest is strict
    Kubernetes."""
    import jsonschema
    import kubernetes_validate

    from dptrain.api import PlanStatus, _crd, parse_job, semantic_errors
    from dptrain.operator import JobRef
    from dptrain.operator._kueue import PRIORITY_LABEL, QUEUE_LABEL, for_queue
    from dptrain.operator._names import PodSizing
    from dptrain.operator._overrides import apply_overrides
    from dptrain.operator._profiles import placements
    from dptrain.operator._workloads import build_prepare_job, build_trainer_job
    from dptrain.planner import ACCELERATORS

    documents = _documents(MANIFESTS[index])
    by_kind: dict[str, list[dict]] = {}
    for document in documents:
        by_kind.setdefault(document["kind"], []).append(document)
    validator = jsonschema.Draft4Validator(_crd.validating_schema(strict=True))
    for manifest in by_kind.pop("DPTrainingJob"):
        assert [e.message for e in validator.iter_errors(manifest)] == []
        job = parse_job(manifest)
        assert semantic_errors(job.spec) == []
        ref = JobRef(name=job.metadata.name, namespace=job.metadata.namespace or "default",
                     uid="00000000-0000-4000-8000-000000000000")
        plan = PlanStatus(
            model_preset="tiny", model_params=1000, batch_size=64, iterations=100,
            noise_multiplier=1.0, noise_batch_ratio=1 / 64, sampling_rate=1e-4,
            physical_batch_size=128, dataset_size=job.spec.data.num_sequences or 1000,
            sequence_length=1024, clip_norm=1.0, learning_rate=1e-3, compute_flops=1.0,
            hosts=1, chips_per_host=8, max_steps=100, epsilon_planned=1.0, accountant="pld")
        # A full host of the accelerator, as the planner sizes one (requests of every kind
        # Kueue admits on); planning itself is not what this checks.
        accelerator = ACCELERATORS[job.spec.compute.accelerator]
        chips = accelerator.max_chips_per_host
        assert accelerator.resource is not None
        host = {"cpu": str(accelerator.host_cpu_per_chip * chips),
                "memory": f"{accelerator.host_memory_per_chip * chips // 2**20}Mi",
                accelerator.resource: str(chips)}
        sizing = placements().place(
            PodSizing(hosts=1, resources={"requests": host,
                                          "limits": {accelerator.resource: str(chips)}}),
            job.spec.compute.accelerator)
        labels = dict(job.metadata.labels or {})
        for workload in (build_trainer_job(job.spec, ref, plan, sizing),
                         build_prepare_job(job.spec, ref)):
            built = for_queue(apply_overrides(workload, job.spec.pod_template_overrides), labels)
            kubernetes_validate.validate(built, "1.32", strict=True)
            assert ("suspend" in built["spec"]) == (QUEUE_LABEL in labels)
        if QUEUE_LABEL in labels:
            queues = {(q["metadata"]["namespace"], q["metadata"]["name"]): q
                      for q in by_kind["LocalQueue"]}
            queue = queues[(ref.namespace, labels[QUEUE_LABEL])]
            cluster = {q["metadata"]["name"]: q for q in by_kind["ClusterQueue"]}[
                queue["spec"]["clusterQueue"]]
            flavors = {f["metadata"]["name"] for f in by_kind["ResourceFlavor"]}
            covered = set()
            for group in cluster["spec"]["resourceGroups"]:
                covered |= set(group["coveredResources"])
                for flavor in group["flavors"]:
                    assert flavor["name"] in flavors
                    assert {r["name"] for r in flavor["resources"]} == set(
                        group["coveredResources"])
            requested = set(built["spec"]["template"]["spec"]["containers"][0]["resources"]
                            .get("requests", {}))
            trainer = build_trainer_job(job.spec, ref, plan, sizing)
            requested |= set(trainer["spec"]["template"]["spec"]["containers"][0][
                "resources"]["requests"])
            assert requested <= covered, requested - covered  # Kueue admits on requests
            if PRIORITY_LABEL in labels:
                assert labels[PRIORITY_LABEL] in {
                    p["metadata"]["name"] for p in by_kind["WorkloadPriorityClass"]}
    for kind in ("LocalQueue", "ClusterQueue", "ResourceFlavor", "WorkloadPriorityClass"):
        for obj in by_kind.pop(kind, []):
            assert obj["apiVersion"] == KUEUE_API and obj["metadata"]["name"]
    for obj in by_kind.values():
        for document in obj:
            kubernetes_validate.validate(document, "1.32", strict=True)


def test_kueue_configuration_enables_dptrains_workload_kinds():
    (config,) = [yaml.safe_load(text) for text in KUEUE_CONFIGS]
    assert config["kind"] == "Configuration"
    assert {"batch/job", "jobset.x-k8s.io/jobset"} <= set(config["integrations"]["frameworks"])
    assert config["manageJobsWithoutQueueName"] is False
