"""``spec.podTemplateOverrides``: what a platform engineer may change in the job's pods.

A partial PodTemplateSpec (in the spirit of Kubeflow Trainer's ``podTemplateOverrides``) that
the operator applies *last* to the trainer pods and the data-preparation pod:

- ``metadata``: labels and annotations added to the pods.
- ``spec``: ``nodeSelector`` (merged over the accelerator profile's, the override winning),
  ``affinity``, ``tolerations`` (added to the profile's), ``priorityClassName``,
  ``imagePullSecrets`` (added to the operator's), ``serviceAccountName`` (the pods run as this
  existing account, and the job's status Role is bound to it instead of a per-job account: EKS
  IRSA / Pod Identity, GKE Workload Identity), ``volumes`` (added), and ``containers``:
  entries matched by name. ``trainer`` applies to the trainer container; its ``env``,
  ``envFrom``, ``volumeMounts`` and ``securityContext`` also apply to the data-preparation
  container (both read the same data with the same credentials), its ``resources`` do not. A
  ``prepare`` entry applies to the data-preparation container only, after ``trainer``'s.
  ``resources`` replace the planner's entry by entry (``requests.cpu``, ``limits.memory``…).

Every Kubernetes-typed value is validated against the upstream schema of its type
(``_pod_schemas``), in the operator and, through the CRD, by the API server.

Refused, with an error naming the field: what the operator owns — ``command``, ``args``,
``image`` (``spec.image`` and the operator's configuration choose it), ``imagePullPolicy``
(operator configuration), ``ports``; the pod contract's env vars (``DPTRAIN_*`` and the JAX
wiring); the operator's volumes (``config``, ``tmp``, ``data``, ``checkpoints``, ``job-key``)
and mounts at or under its paths (the config, the key, the service-account token, ``/tmp``,
``/data``, ``/checkpoints``); the operator's labels and annotations; volume types and
``securityContext`` settings outside the *restricted* Pod Security Standard, which the
operator's pods meet (a security context can only add restrictions, a non-root user/group, or
the ``NET_BIND_SERVICE`` capability).
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator
from pydantic.json_schema import SkipJsonSchema

from dptrain.api._base import _Model
from dptrain.api._contract import (
    CHECKPOINT_MOUNT,
    CONFIG_DIR,
    DATA_MOUNT,
    ENV_API_SERVER,
    ENV_JAX_COORDINATOR,
    ENV_JAX_NUM_PROCESSES,
    ENV_JAX_PROCESS_ID,
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_REPORT,
    KEY_DIR,
    SERVICE_ACCOUNT_DIR,
)
from dptrain.api._pod_schemas import KubernetesType

#: Volumes the operator puts in every pod (names an override may not use).
OPERATOR_VOLUMES = frozenset({"config", "tmp", "data", "checkpoints", "job-key"})
#: Paths the operator mounts (an override may not mount at or under them).
OPERATOR_MOUNTS = (
    CONFIG_DIR,
    KEY_DIR,
    str(SERVICE_ACCOUNT_DIR),
    "/tmp",
    DATA_MOUNT,
    CHECKPOINT_MOUNT,
)
#: The pod contract's environment (``DPTRAIN_*`` is reserved as a whole).
OPERATOR_ENV = frozenset(
    {
        ENV_JOB_NAME,
        ENV_JOB_NAMESPACE,
        ENV_API_SERVER,
        ENV_REPORT,
        ENV_JAX_COORDINATOR,
        ENV_JAX_NUM_PROCESSES,
        ENV_JAX_PROCESS_ID,
    }
)
#: Label/annotation keys of the operator, of the Job and JobSet controllers, and of Kueue
#: (whose labels belong on the DPTrainingJob, which propagates them to its workloads).
RESERVED_KEY_PREFIXES = (
    "dptrain.io/",
    "batch.kubernetes.io/",
    "jobset.sigs.k8s.io/",
    "kueue.x-k8s.io/",
)
RESERVED_KEYS = frozenset(
    {
        "app.kubernetes.io/name",
        "app.kubernetes.io/component",
        "app.kubernetes.io/managed-by",
        "controller-uid",
        "job-name",
    }
)
#: Volume sources the restricted Pod Security Standard allows.
RESTRICTED_VOLUME_SOURCES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
_SELINUX_TYPES = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)

_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_QUALIFIED = re.compile(
    rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    rf"{_NAME}$"
)
_LABEL_VALUE = re.compile(rf"^({_NAME})?$")
DnsSubdomain = Annotated[
    str,
    StringConstraints(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", max_length=253
    ),
]

Affinity = Annotated[
    dict[str, Any], KubernetesType("Affinity", "Pod affinity (Kubernetes Affinity).")
]
Toleration = Annotated[
    dict[str, Any], KubernetesType("Toleration", "A toleration (Kubernetes Toleration).")
]
Volume = Annotated[
    dict[str, Any],
    KubernetesType("Volume", "A pod volume (Kubernetes Volume); restricted-profile sources only."),
]
EnvVar = Annotated[
    dict[str, Any], KubernetesType("EnvVar", "An environment variable (Kubernetes EnvVar).")
]
EnvFromSource = Annotated[
    dict[str, Any], KubernetesType("EnvFromSource", "Env from a ConfigMap or Secret.")
]
VolumeMount = Annotated[
    dict[str, Any], KubernetesType("VolumeMount", "A volume mount (Kubernetes VolumeMount).")
]
ResourceRequirements = Annotated[
    dict[str, Any],
    KubernetesType("ResourceRequirements", "Resources replacing the planner's, entry by entry."),
]
SecurityContext = Annotated[
    dict[str, Any],
    KubernetesType(
        "SecurityContext", "Container security context merged over the operator's (restricted)."
    ),
]
LocalObjectReference = Annotated[
    dict[str, Any], KubernetesType("LocalObjectReference", "A Secret to pull images with.")
]

# Fields the operator owns, refused by name (kept out of the CRD schema: the API server's
# strict field validation refuses them as unknown fields).
_OWNED_CONTAINER = {
    "command": "the pod contract runs `dptrain train` / `dptrain prepare-data`",
    "args": "the pod contract runs `dptrain train` / `dptrain prepare-data`",
    "image": "spec.image (or the operator configuration's trainer.image) chooses it",
    "imagePullPolicy": "the operator configuration's trainer.imagePullPolicy chooses it",
    "ports": "the operator publishes the coordinator and metrics ports",
}
_OWNED_POD = {
    "restartPolicy": "retries are the operator's",
    "subdomain": "the operator wires the JAX coordinator's DNS",
    "automountServiceAccountToken": "the trainer reports progress with the token",
}
_Owned = SkipJsonSchema[Any]


def _keys(value: dict[str, str], *, labels: bool) -> dict[str, str]:
    for key, text in value.items():
        if not _QUALIFIED.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
            raise ValueError(f"{key!r}: must be a qualified name ([prefix/]name)")
        if key in RESERVED_KEYS or key.startswith(RESERVED_KEY_PREFIXES):
            hint = (
                " (put Kueue labels on the DPTrainingJob's metadata.labels)"
                if key.startswith("kueue.x-k8s.io/")
                else ""
            )
            raise ValueError(f"{key!r}: is set by the operator or its controllers{hint}")
        if labels and (len(text) > 63 or not _LABEL_VALUE.match(text)):
            raise ValueError(f"{key!r}: {text!r} is not a valid label value")
    return value


class PodMetadataOverride(_Model):
    """Labels and annotations added to the pods."""

    labels: dict[str, str] = Field(default_factory=dict)
    """Pod labels (the operator's and its controllers' keys are refused)."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Pod annotations (``dptrain.io/`` keys are refused)."""

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return _keys(value, labels=True)

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, value: dict[str, str]) -> dict[str, str]:
        return _keys(value, labels=False)


def _restricted(context: dict[str, Any]) -> list[str]:
    """Where a container securityContext leaves the restricted Pod Security Standard."""
    problems = []
    if context.get("privileged") is True:
        problems.append("privileged: must not be true")
    if context.get("allowPrivilegeEscalation") is True:
        problems.append("allowPrivilegeEscalation: must not be true")
    if context.get("runAsNonRoot") is False:
        problems.append("runAsNonRoot: must not be false")
    if context.get("runAsUser") == 0:
        problems.append("runAsUser: must not be 0 (root)")
    if context.get("runAsGroup") == 0:
        problems.append("runAsGroup: must not be 0 (root)")
    added = (context.get("capabilities") or {}).get("add") or []
    if any(c != "NET_BIND_SERVICE" for c in added):
        problems.append("capabilities.add: only NET_BIND_SERVICE may be added")
    seccomp = (context.get("seccompProfile") or {}).get("type")
    if seccomp not in (None, "RuntimeDefault", "Localhost"):
        problems.append("seccompProfile.type: must be RuntimeDefault or Localhost")
    apparmor = (context.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, "RuntimeDefault", "Localhost"):
        problems.append("appArmorProfile.type: must be RuntimeDefault or Localhost")
    if context.get("procMount") not in (None, "Default"):
        problems.append("procMount: must be Default")
    selinux = context.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in _SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        problems.append("seLinuxOptions: only the container_* types, no user or role")
    if (context.get("windowsOptions") or {}).get("hostProcess") is True:
        problems.append("windowsOptions.hostProcess: must not be true")
    return problems


class ContainerOverride(_Model):
    """Changes to one of the operator's containers, matched by name."""

    name: Literal["trainer", "prepare"]
    """``trainer`` (trainer pods; env, envFrom, volumeMounts and securityContext also reach the
    data-preparation pod) or ``prepare`` (the data-preparation pod only)."""
    env: list[EnvVar] = Field(default_factory=list)
    """Environment added to the operator's (the pod contract's variables are refused)."""
    env_from: list[EnvFromSource] = Field(default_factory=list)
    """ConfigMaps and Secrets whose keys become environment variables."""
    volume_mounts: list[VolumeMount] = Field(default_factory=list)
    """Mounts of ``spec.volumes`` of this override (not at or under the operator's paths)."""
    resources: ResourceRequirements | None = None
    """Requests and limits replacing the planner's, entry by entry."""
    security_context: SecurityContext | None = None
    """Merged over the operator's restricted context; may not relax it."""

    command: _Owned = None
    args: _Owned = None
    image: _Owned = None
    image_pull_policy: _Owned = None
    ports: _Owned = None

    @field_validator("command", "args", "image", "image_pull_policy", "ports", mode="before")
    @classmethod
    def _owned(cls, value: Any, info: Any) -> Any:
        alias = {"image_pull_policy": "imagePullPolicy"}.get(info.field_name, info.field_name)
        raise ValueError(f"is owned by the operator: {_OWNED_CONTAINER[alias]}")

    @field_validator("env")
    @classmethod
    def _env(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for index, var in enumerate(value):
            name = str(var.get("name", ""))
            if name in OPERATOR_ENV or name.startswith("DPTRAIN_"):
                raise ValueError(
                    f"[{index}].name: {name} is set by the operator (the pod "
                    "contract's variables and DPTRAIN_* are reserved)"
                )
        return value

    @field_validator("volume_mounts")
    @classmethod
    def _mounts(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for index, mount in enumerate(value):
            name = str(mount.get("name", ""))
            if name in OPERATOR_VOLUMES:
                raise ValueError(f"[{index}].name: {name!r} is the operator's volume")
            path = posixpath.normpath(str(mount.get("mountPath", "/")))
            for owned in OPERATOR_MOUNTS:
                if path == owned or path.startswith(owned.rstrip("/") + "/"):
                    raise ValueError(
                        f"[{index}].mountPath: {path} is at or under the operator's mount {owned}"
                    )
        return value

    @field_validator("security_context")
    @classmethod
    def _security(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        problems = _restricted(value or {})
        if problems:
            raise ValueError(
                "must stay within the restricted Pod Security Standard: " + "; ".join(problems)
            )
        return value


class PodSpecOverride(_Model):
    """The pod spec fields an override may set."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels, merged over the accelerator profile's (these win)."""
    affinity: Affinity | None = None
    """Node and pod (anti-)affinity."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Tolerations added to the accelerator profile's."""
    priority_class_name: DnsSubdomain | None = None
    """A PriorityClass for the pods."""
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list)
    """Secrets to pull the image with, added to the operator's."""
    service_account_name: DnsSubdomain | None = None
    """An existing ServiceAccount the pods run as (cloud identity); the operator binds the
    job's status Role to it instead of creating a per-job account."""
    volumes: list[Volume] = Field(default_factory=list)
    """Volumes added to the operator's (restricted-profile sources only)."""
    containers: list[ContainerOverride] = Field(default_factory=list, max_length=2)
    """Changes to the ``trainer`` and ``prepare`` containers."""

    restart_policy: _Owned = None
    subdomain: _Owned = None
    automount_service_account_token: _Owned = None

    @field_validator(
        "restart_policy", "subdomain", "automount_service_account_token", mode="before"
    )
    @classmethod
    def _owned(cls, value: Any, info: Any) -> Any:
        alias = {
            "restart_policy": "restartPolicy",
            "automount_service_account_token": "automountServiceAccountToken",
        }.get(info.field_name, info.field_name)
        raise ValueError(f"is owned by the operator: {_OWNED_POD[alias]}")

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not _QUALIFIED.match(key) or len(text) > 63 or not _LABEL_VALUE.match(text):
                raise ValueError(f"{key!r}: must be a label key and value")
        return value

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen: set[str] = set()
        for index, volume in enumerate(value):
            name = str(volume.get("name", ""))
            if name in OPERATOR_VOLUMES:
                raise ValueError(f"[{index}].name: {name!r} is the operator's volume")
            if name in seen:
                raise ValueError(f"[{index}].name: {name!r} is declared twice")
            seen.add(name)
            sources = set(volume) - {"name"}
            outside = sorted(sources - RESTRICTED_VOLUME_SOURCES)
            if outside:
                raise ValueError(
                    f"[{index}].{outside[0]}: not allowed by the restricted Pod "
                    "Security Standard (use a PersistentVolumeClaim, csi, "
                    "configMap, secret, projected, emptyDir or ephemeral volume)"
                )
        return value

    @field_validator("containers")
    @classmethod
    def _containers(cls, value: list[ContainerOverride]) -> list[ContainerOverride]:
        names = [c.name for c in value]
        if len(set(names)) != len(names):
            raise ValueError("each container name may appear once")
        return value

    def container(self, name: str) -> ContainerOverride | None:
        """The entry for container ``name``, if any."""
        return next((c for c in self.containers if c.name == name), None)


class PodTemplateOverrides(_Model):
    """A partial PodTemplateSpec applied last to the trainer and data-preparation pods."""

    metadata: PodMetadataOverride = Field(default_factory=PodMetadataOverride)
    """Labels and annotations of the pods."""
    spec: PodSpecOverride = Field(default_factory=PodSpecOverride)
    """Pod spec fields: node placement, identity, volumes and container changes."""

    def mount_problems(self) -> list[tuple[str, str]]:
        """(field, rule) for mounts of volumes this override does not declare."""
        declared = {str(v.get("name")) for v in self.spec.volumes}
        out = []
        for c_index, container in enumerate(self.spec.containers):
            for m_index, mount in enumerate(container.volume_mounts):
                if mount.get("name") not in declared:
                    out.append(
                        (
                            f"spec.containers[{c_index}].volumeMounts[{m_index}].name",
                            f"must name a volume of podTemplateOverrides.spec.volumes "
                            f"(got {mount.get('name')!r})",
                        )
                    )
        return out
