"""Who a job's children are: the job's identity, the children's names, labels and owner.

Names are deterministic (a re-run handler can never duplicate a child) and fit Kubernetes'
limits (long job names are shortened with a hash); every child carries the job's labels and an
ownerReference (``controller: true``), so deleting the job deletes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
from collections.abc import Mapping
from typing import Any

from dptrain.api import API_VERSION, CHECKPOINT_MOUNT, KIND, DPTrainingJobSpec

LABEL_JOB = "dptrain.io/job"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
MANAGER = "dptrain-operator"
ANNOTATION_RESTART = "dptrain.io/restart"
ANNOTATION_PLAN_GENERATION = "dptrain.io/plan-generation"

COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
TERMINATION_GRACE_SECONDS = 60  # time for the trainer to save its last checkpoint on SIGTERM
KEY_FILE_MODE = 0o440  # owner root, group fsGroup (the trainer's): read-only, nobody else



# ------------------------------------------------------------------------------ identities


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobRef:
    """The identity of a DPTrainingJob, enough to own and name its children."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> JobRef:
        """Read the identity from a job's body."""
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class PodSizing:
    """Where and how big each trainer pod is (from the planner).

    Attributes:
        hosts: pods of the workload (one JAX process each).
        resources: container ``resources`` (``requests``/``limits``).
        node_selector: node labels the pods must land on (e.g. GKE TPU labels).
        tolerations: tolerations for tainted accelerator nodes.
    """

    hosts: int = 1
    resources: Mapping[str, Mapping[str, str]] = dataclasses.field(
        default_factory=lambda: {"requests": {"cpu": "1", "memory": "2Gi"},
                                 "limits": {"memory": "2Gi"}})
    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()


def _shorten(base: str, suffix: str, limit: int) -> str:
    """``<base>-<suffix>`` within ``limit`` characters, hashing long bases (stable, unique)."""
    name = f"{base}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    keep = limit - len(suffix) - len(digest) - 2
    return f"{base[:keep].rstrip('-')}-{digest}-{suffix}"


@dataclasses.dataclass(frozen=True)
class ChildNames:
    """Deterministic names of every child of one job."""

    config_map: str
    service_account: str
    role: str
    role_binding: str
    service: str
    workload: str
    prepare: str
    export: str

    @classmethod
    def of(cls, job: str) -> ChildNames:
        """Names for the children of job ``job``."""
        # Pod hostnames are "<job-name>-<index>" and must stay a DNS label (≤ 63): keep room
        # for a 4-digit index. Service names must start with a letter (DNS-1035).
        service_base = job if job[0].isalpha() else f"j{job}"
        trainer = _shorten(job, "trainer", 63)
        return cls(
            config_map=_shorten(job, "config", 63),
            service_account=trainer,
            role=trainer,
            role_binding=trainer,
            service=_shorten(service_base, "hosts", 63),
            workload=_shorten(job, "train", 52),
            prepare=_shorten(job, "prepare", 52),
            export=_shorten(job, "export", 52),
        )


def owner_reference(job: JobRef) -> dict[str, Any]:
    """The ownerReference that makes ``job`` the controller of a child."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": job.name, "uid": job.uid,
            "controller": True, "blockOwnerDeletion": True}


def labels(job: JobRef, component: str) -> dict[str, str]:
    """Labels every child carries (the operator watches Jobs by them)."""
    return {LABEL_NAME: "dptrain", LABEL_COMPONENT: component, LABEL_MANAGED_BY: MANAGER,
            LABEL_JOB: job.name}


def child_meta(job: JobRef, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": job.namespace, "labels": labels(job, component),
            "ownerReferences": [owner_reference(job)]}


def checkpoint_dir(spec: DPTrainingJobSpec, job: JobRef) -> str:
    """The checkpoint directory inside the pod."""
    if spec.checkpoint.volume is None:
        return CHECKPOINT_MOUNT
    relative = (spec.checkpoint.path or job.name).lstrip("/")
    return posixpath.join(CHECKPOINT_MOUNT, relative)


def prepared_dir(spec: DPTrainingJobSpec, job: JobRef) -> str:
    """Where data preparation writes the prepared sequences inside the pod."""
    return posixpath.join(checkpoint_dir(spec, job), "prepared")


def key_secret_name(job: JobRef) -> str:
    """The name of the job's key Secret: includes the uid, so a re-created job gets a new key."""
    return _shorten(job.name, f"key-{job.uid.replace('-', '')[:8]}", 63)
