"""Accelerator profiles: where trainer pods of each accelerator run, per kind of cluster.

The planner sizes pods (chips, CPU, memory, TPU topology); *where* they land is the cluster's
business. A profile maps ``spec.compute.accelerator`` to node selectors, tolerations and extra
resources (e.g. EFA interfaces). Profiles ship for three kinds of cluster, and operator
configuration (``dptrain operator --config FILE``, a ConfigMap rendered from Helm values) picks
one for GPUs and one for TPUs and may define its own:

- ``generic``: only the ``nvidia.com/gpu`` resource and a toleration of the usual
  ``nvidia.com/gpu`` taint; no node selector, so any GPU node fits (on-prem, kind, any cloud).
  Default for GPUs.
- ``gke``: GKE's node labels (``cloud.google.com/gke-accelerator``, and for TPUs
  ``cloud.google.com/gke-tpu-accelerator`` plus the slice topology the planner chose) and the
  taints GKE puts on accelerator node pools. Default for TPUs (TPUs exist only there).
- ``eks``: ``node.kubernetes.io/instance-type`` of the EC2 instance that carries the GPU (works
  with managed node groups and Karpenter NodePools alike) and the ``nvidia.com/gpu`` taint.

A selector a profile does not know for an accelerator is an error at configuration time, not
a pod that stays Pending: every profile must place every accelerator it is chosen for.

The same configuration holds operator-wide pod defaults (``trainer``): the image of jobs that
name none, the pull policy and pull secrets (e.g. a private registry mirror on-prem).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from dptrain.api import DEFAULT_TRAINER_IMAGE, DPTrainingJobSpec
from dptrain.operator._children import PodSizing
from dptrain.operator._machines import EKS_MACHINES, GKE_MACHINES, MACHINES, MIB
from dptrain.planner import ACCELERATORS


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)


class Toleration(_Model):
    """A Kubernetes toleration (the fields the scheduler reads)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    def manifest(self) -> dict[str, Any]:
        """As it appears in a pod spec."""
        return self.model_dump(by_alias=True, exclude_none=True)


class NodeShape(_Model):
    """A kind of node the pods may land on, and what one pod may request there."""

    name: str = Field(min_length=1)
    """The machine (instance) type, or any name of your own (it appears in messages)."""
    accelerators: int = Field(ge=0)
    """Accelerator chips on the node."""
    cpu: str = Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    """CPU one pod may request (node allocatable less the DaemonSets'), e.g. ``"42"``."""
    memory: str = Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
    """Memory one pod may request (node allocatable less the DaemonSets'), e.g. ``"160Gi"``."""


class Placement(_Model):
    """Where the pods of one accelerator go, and what else they request."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    extra_resources: dict[str, str] = Field(default_factory=dict)
    """Added to requests and limits, e.g. ``vpc.amazonaws.com/efa: "32"``."""
    nodes: tuple[NodeShape, ...] = ()
    """The node shapes pods of this accelerator land on; requests are fitted to them and a pod
    that fits none is refused (empty: unknown nodes, requests are not checked)."""


class Profile(_Model):
    """A kind of cluster: a placement per accelerator name."""

    description: str = ""
    accelerators: dict[str, Placement]


class TrainerDefaults(_Model):
    """Operator-wide defaults of the pods the operator creates (trainers, data preparation)."""

    image: str | None = Field(default=None, min_length=1, max_length=512, pattern=r"^[^\s]+$")
    """Image of jobs that do not name one (``spec.image`` unset or the built-in default)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    """Secrets (in each job's namespace) to pull the image with."""
    export: Literal["huggingface", "none"] = "huggingface"
    """Export every finished model (Succeeded or BudgetExhausted) whose checkpoints are on a
    volume as a Hugging Face directory into ``export/`` under its checkpoint directory (an
    export Job; ``status.artifacts.export``), or not."""

    def spec(self, spec: DPTrainingJobSpec) -> DPTrainingJobSpec:
        """``spec`` with the default image when it names none of its own."""
        if self.image is None or spec.image != DEFAULT_TRAINER_IMAGE:
            return spec
        return spec.model_copy(update={"image": self.image})

    def apply(self, workload: dict[str, Any]) -> dict[str, Any]:
        """Pull policy and pull secrets on every pod template of a Job or JobSet (in place)."""
        for pod in _pod_specs(workload):
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                container["imagePullPolicy"] = self.image_pull_policy
            if self.image_pull_secrets:
                pod["imagePullSecrets"] = [{"name": n} for n in self.image_pull_secrets]
        return workload


def _pod_specs(workload: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = workload.get("spec") or {}
    if workload.get("kind") == "JobSet":
        return [job["template"]["spec"]["template"]["spec"]
                for job in spec.get("replicatedJobs", [])]
    return [spec["template"]["spec"]] if "template" in spec else []


class OperatorConfig(_Model):
    """The operator configuration file (``--config``)."""

    trainer: TrainerDefaults = Field(default_factory=TrainerDefaults)
    gpu_profile: str = "generic"
    tpu_profile: str = "gke"
    profiles: dict[str, Profile] = Field(default_factory=dict)
    """Profiles of your own (or replacements of shipped ones, by name)."""


_GPU_TAINT = Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
_TPU_TAINT = Toleration(key="google.com/tpu", operator="Exists", effect="NoSchedule")
# GKE's accelerator label values (cloud.google.com/gke-accelerator / gke-tpu-accelerator): the
# planner's accelerator table records them.
_GKE = {name: spec.node_label for name, spec in ACCELERATORS.items()
        if spec.node_label is not None}
# The EC2 instance type of each GPU (8 GPUs per instance): p4de (A100 80 GB), p5 (H100), p5e (H200).
_EKS = {"nvidia-a100-80gb": "p4de.24xlarge", "nvidia-h100-80gb": "p5.48xlarge",
        "nvidia-h200": "p5e.48xlarge"}


def _shapes(names: tuple[str, ...]) -> tuple[NodeShape, ...]:
    """The node shapes of machine types of the table (``_machines``), usable per pod."""
    return tuple(NodeShape(name=m.name, accelerators=m.accelerators,
                           cpu=f"{m.usable_cpu_milli}m", memory=f"{m.usable_memory // MIB}Mi")
                 for m in (MACHINES[n] for n in names))


GPUS = tuple(name for name, spec in ACCELERATORS.items() if spec.kind == "gpu")
TPUS = tuple(name for name, spec in ACCELERATORS.items() if spec.kind == "tpu")

SHIPPED: dict[str, Profile] = {
    "generic": Profile(
        description="any cluster: the nvidia.com/gpu resource and taint, no node selector",
        accelerators={name: Placement(tolerations=(_GPU_TAINT,)) for name in GPUS}),
    "gke": Profile(
        description="Google Kubernetes Engine node labels and accelerator taints",
        accelerators={
            **{name: Placement(node_selector=dict([_GKE[name]]), tolerations=(_GPU_TAINT,),
                               nodes=_shapes(GKE_MACHINES[name]))
               for name in GPUS},
            **{name: Placement(node_selector=dict([_GKE[name]]), tolerations=(_TPU_TAINT,),
                               nodes=_shapes(GKE_MACHINES[name]))
               for name in TPUS}}),
    "eks": Profile(
        description="Amazon EKS (managed node groups or Karpenter): EC2 instance types",
        accelerators={name: Placement(
            node_selector={"node.kubernetes.io/instance-type": _EKS[name]},
            tolerations=(_GPU_TAINT,), nodes=_shapes(EKS_MACHINES[name])) for name in GPUS}),
}
TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"


class ConfigError(ValueError):
    """The operator configuration is invalid (the message names the field)."""


@dataclasses.dataclass(frozen=True)
class Placements:
    """The chosen profiles (placement of each accelerator) and the pod defaults."""

    gpu: Profile
    tpu: Profile
    gpu_name: str = "generic"
    tpu_name: str = "gke"
    trainer: TrainerDefaults = dataclasses.field(default_factory=TrainerDefaults)

    def for_accelerator(self, accelerator: str) -> Placement | None:
        """The placement of ``accelerator`` (None: CPU, which needs none)."""
        spec = ACCELERATORS.get(accelerator)
        if spec is None or spec.kind == "cpu":
            return None
        profile = self.gpu if spec.kind == "gpu" else self.tpu
        return profile.accelerators[accelerator]

    def place(self, sizing: PodSizing, accelerator: str) -> PodSizing:
        """``sizing`` with the profile's selectors, tolerations and extra resources."""
        placement = self.for_accelerator(accelerator)
        if placement is None:
            return sizing
        selector = dict(placement.node_selector)
        topology = sizing.node_selector.get(TOPOLOGY_LABEL)
        if topology is not None:  # the slice shape the planner chose (TPUs)
            selector[TOPOLOGY_LABEL] = topology
        resources = {k: dict(v) for k, v in copy.deepcopy(dict(sizing.resources)).items()}
        for name, amount in placement.extra_resources.items():
            resources.setdefault("requests", {})[name] = amount
            resources.setdefault("limits", {})[name] = amount
        return dataclasses.replace(
            sizing, node_selector=selector, resources=resources,
            tolerations=tuple(t.manifest() for t in placement.tolerations))


def placements(config: OperatorConfig | None = None) -> Placements:
    """Resolve the configuration's profiles; every accelerator of each kind must be placed."""
    config = config or OperatorConfig()
    known = {**SHIPPED, **config.profiles}
    chosen: dict[str, Profile] = {}
    for field, name, names in (("gpuProfile", config.gpu_profile, GPUS),
                               ("tpuProfile", config.tpu_profile, TPUS)):
        if name not in known:
            raise ConfigError(f"{field}: unknown profile {name!r} (known: "
                              f"{', '.join(sorted(known))})")
        missing = [a for a in names if a not in known[name].accelerators]
        if missing:
            raise ConfigError(f"{field}: profile {name!r} does not place "
                              f"{', '.join(missing)} (add profiles.{name}.accelerators.<name>)")
        chosen[field] = known[name]
    return Placements(gpu=chosen["gpuProfile"], tpu=chosen["tpuProfile"],
                      gpu_name=config.gpu_profile, tpu_name=config.tpu_profile,
                      trainer=config.trainer)


def load_config(path: str | Path) -> OperatorConfig:
    """Read and validate the operator configuration file (YAML or JSON)."""
    try:
        raw: Any = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the operator configuration: {error}") from error
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the operator configuration must be a mapping")
    try:
        return OperatorConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from error
