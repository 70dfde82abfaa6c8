"""Accelerator profiles: trainer pods land where each kind of cluster puts accelerators."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml
from kube_samples import job_manifest
from kube_waiting import wait_for

from dptrain.operator._children import PodSizing
from dptrain.operator._profiles import (
    SHIPPED,
    ConfigError,
    OperatorConfig,
    load_config,
    placements,
)

GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
TPU_SIZING = PodSizing(hosts=4, resources={"requests": {"google.com/tpu": "4"},
                                           "limits": {"google.com/tpu": "4"}},
                       node_selector={"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
                                      "cloud.google.com/gke-tpu-topology": "4x4"})
GPU_SIZING = PodSizing(hosts=1, resources={"requests": {"nvidia.com/gpu": "8"},
                                           "limits": {"nvidia.com/gpu": "8"}},
                       node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"})


def test_defaults_are_generic_gpus_and_gke_tpus():
    chosen = placements()
    gpu = chosen.place(GPU_SIZING, "nvidia-h100-80gb")
    assert gpu.node_selector == {} and gpu.tolerations == (GPU_TAINT,)  # any GPU node
    assert gpu.resources == GPU_SIZING.resources
    tpu = chosen.place(TPU_SIZING, "tpu-v6e")
    assert tpu.node_selector == TPU_SIZING.node_selector  # the planner's topology is kept
    assert tpu.tolerations == ({"key": "google.com/tpu", "operator": "Exists",
                                "effect": "NoSchedule"},)
    assert chosen.place(PodSizing(), "cpu") == PodSizing()


@pytest.mark.parametrize(("profile", "selector"), [
    ("gke", {"cloud.google.com/gke-accelerator": "nvidia-h200-141gb"}),
    ("eks", {"node.kubernetes.io/instance-type": "p5e.48xlarge"}),
    ("generic", {}),
])
def test_each_shipped_profile_places_every_gpu(profile, selector):
    chosen = placements(OperatorConfig(gpu_profile=profile))
    assert chosen.place(GPU_SIZING, "nvidia-h200").node_selector == selector
    assert set(SHIPPED[profile].accelerators) >= {"nvidia-a100-80gb", "nvidia-h100-80gb",
                                                  "nvidia-h200"}


def test_custom_profile_from_a_file_with_extra_resources(tmp_path):
    path = tmp_path / "operator.yaml"
    path.write_text(yaml.safe_dump({"gpuProfile": "eks-efa", "profiles": {"eks-efa": {
        "accelerators": {name: {
            "nodeSelector": {"karpenter.k8s.aws/instance-gpu-name": name.split("-")[1]},
            "tolerations": [GPU_TAINT],
            "extraResources": {"vpc.amazonaws.com/efa": "32"}}
            for name in ("nvidia-a100-80gb", "nvidia-h100-80gb", "nvidia-h200")}}}}))
    sized = placements(load_config(path)).place(GPU_SIZING, "nvidia-h100-80gb")
    assert sized.node_selector == {"karpenter.k8s.aws/instance-gpu-name": "h100"}
    assert sized.resources["requests"] == {"nvidia.com/gpu": "8", "vpc.amazonaws.com/efa": "32"}
    assert sized.resources["limits"]["vpc.amazonaws.com/efa"] == "32"
    assert GPU_SIZING.resources["requests"] == {"nvidia.com/gpu": "8"}  # not mutated


@pytest.mark.parametrize(("config", "message"), [
    ({"gpuProfile": "aks"}, "gpuProfile: unknown profile 'aks'"),
    ({"tpuProfile": "eks"}, "tpuProfile: profile 'eks' does not place tpu-v5e"),
    ({"gpuProfile": "mine", "profiles": {"mine": {"accelerators": {}}}},
     "gpuProfile: profile 'mine' does not place nvidia-a100-80gb"),
    ({"gpuProfiel": "eks"}, "gpuProfiel: Extra inputs are not permitted"),
    ({"profiles": {"x": {"accelerators": {"nvidia-h200": {"tolerations": [
        {"operator": "Sometimes"}]}}}}}, "profiles.x.accelerators.nvidia-h200.tolerations.0"),
])
def test_bad_configuration_names_the_field(tmp_path, config, message):
    path = tmp_path / "operator.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        placements(load_config(path))


@pytest.mark.e2e
def test_operator_with_the_eks_profile_creates_gpu_pods_for_eks(kube, kube_api, start_operator,
                                                                tmp_path):
    config = tmp_path / "operator.yaml"
    config.write_text("gpuProfile: eks\ntrainer: {image: registry.example/dptrain/trainer:9, "
                      "imagePullPolicy: Always, imagePullSecrets: [mirror]}\n")
    start_operator("--config", str(config))
    kube.create_job(job_manifest("eksgpu", compute={"accelerator": "nvidia-h100-80gb"}))
    job = wait_for(lambda: kube.get("batch/v1/jobs", "default", "eksgpu-train"),
                   what="the trainer Job", describe=lambda: repr(kube.get_job("eksgpu")))
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert pod["tolerations"] == [GPU_TAINT]
    (container,) = pod["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # The operator's pod defaults: this job names no image.
    assert container["image"] == "registry.example/dptrain/trainer:9"
    assert container["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "mirror"}]
    clean = {k: v for k, v in job.items() if k != "status"}
    clean["metadata"] = {k: job["metadata"][k] for k in ("name", "namespace", "labels")}
    kubernetes_validate.validate(clean, "1.32", strict=True)


def test_cli_refuses_a_bad_configuration_with_one_line(tmp_path, capsys):
    from dptrain.cli import main

    path = tmp_path / "operator.yaml"
    path.write_text("gpuProfile: aks\n")
    assert main(["operator", "--config", str(path), "--metrics-port", "0"]) != 0
    err = capsys.readouterr().err
    assert "gpuProfile: unknown profile 'aks'" in err and err.count("\n") == 1


def test_trainer_defaults_apply_to_jobs_without_an_image_of_their_own():
    from dptrain.api import DEFAULT_TRAINER_IMAGE, parse_job
    from dptrain.operator._profiles import TrainerDefaults

    defaults = TrainerDefaults(image="mirror.local/trainer:1", image_pull_policy="Never",
                               image_pull_secrets=("a", "b"))
    plain = parse_job(job_manifest("x")).spec
    assert plain.image == DEFAULT_TRAINER_IMAGE
    assert defaults.spec(plain).image == "mirror.local/trainer:1"
    own = parse_job(job_manifest("y", image="example.com/mine:2")).spec
    assert defaults.spec(own).image == "example.com/mine:2"  # the job's choice wins
    jobset = {"kind": "JobSet", "spec": {"replicatedJobs": [{"template": {"spec": {
        "template": {"spec": {"containers": [{"name": "trainer"}]}}}}}]}}
    pod = defaults.apply(jobset)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"][
        "spec"]
    assert pod["containers"][0]["imagePullPolicy"] == "Never"
    assert pod["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}]
