"""Pure builders of a DPTrainingJob's children: Kubernetes objects as plain dicts.

Every child carries an ownerReference (``controller: true``) to its job, so deleting the job
deletes them, and the labels ``dptrain.io/job=<job>`` and ``app.kubernetes.io/managed-by=
dptrain-operator``. Names are deterministic, so re-running a handler can never duplicate a child.

What the pods run (the contract with ``dptrain train`` / ``dptrain prepare-data``; its names,
paths, ports and exit codes are defined once, in ``dptrain.api._contract``):

- The ConfigMap ``<job>-config`` holds ``config.json``, mounted read-only at ``/etc/dptrain``. It is
  a complete ``DPTrainingJob`` manifest whose paths are rewritten to paths *inside the pod*
  (``spec.data.volume`` mounted at ``/data``, ``spec.model.pretrained.volume`` read-only at
  ``/pretrained``, ``spec.evaluation.data.volume`` at ``/eval-data``,
  ``spec.checkpoint.volume`` at ``/checkpoints``; the
  rewritten spec has no ``volume`` fields, so its paths are plain local paths; ``uri`` fields
  stay as they are, without their ``secretRef``; with a ``checkpoint.uri`` the checkpoint path
  is the ``/checkpoints`` scratch directory orbax stages in before each upload) and whose
  ``status`` carries what the trainer must follow: ``status.plan`` (the operator's plan; the
  trainer must not re-plan, so that its accounting matches the operator's) and, once known,
  ``status.dataset`` (``numSequences``, ``location`` of prepared data, ``checksum``).
  ``spec.data.numSequences`` is filled in once the dataset size is known.
- Trainer pods (an Indexed Job, completions = parallelism = hosts) run
  ``dptrain train --config /etc/dptrain/config.json`` with the env of :func:`trainer_env`:
  ``DPTRAIN_JOB_NAME``, ``DPTRAIN_JOB_NAMESPACE``, ``DPTRAIN_API_SERVER``, ``DPTRAIN_REPORT=
  kubernetes``, ``JAX_COORDINATOR_ADDRESS`` (``<job>-0.<service>:8476``), ``JAX_NUM_PROCESSES``
  and ``JAX_PROCESS_ID`` (the completion index), ``HOME=/tmp``. The trainer reports by
  merge-patching ``status.progress`` (``stepsCharged``, ``step``, ``loss``, ``tokensPerSecond``,
  ``lastUpdate``, ``endState``) of its own job; it may GET the job to resume from
  ``status.privacy.stepsCharged``. Exit codes: ``EXIT_OK`` done, ``EXIT_BUDGET_EXHAUSTED``
  (final), else error.
- The job's secret key (256 bits from ``secrets``, drawn by the operator before the first
  workload) lives in the immutable Secret ``<job>-key-<uid8>`` owned by the job (the uid in the
  name: a job re-created under the same name never inherits an old key). Trainer pods mount it
  read-only at ``/var/run/secrets/dptrain.io/key`` and pass it with ``--key-file``; it is never
  in an env var, the ConfigMap, a status or a log, and no Role the operator creates grants any
  verb on Secrets (the kubelet mounts it). The trainer derives every batch and noise draw from
  it (``dptrain.trainer._keys``).
- Object-storage credentials (``spec.data.secretRef``, ``spec.checkpoint.secretRef``) reach the
  trainer and data-preparation containers as ``envFrom`` (or, with ``keyFile``, a read-only mount
  named by ``GOOGLE_APPLICATION_CREDENTIALS``): see ``_workloads.storage_credentials``.
- When N is unknown, a data-preparation Job runs ``dptrain prepare-data --config
  /etc/dptrain/config.json --output <checkpoint dir>/prepared --report kubernetes`` with the same
  env (without the JAX variables) and merge-patches ``status.dataset`` (``numSequences``,
  ``location``, ``checksum``) of its job. With a checkpoint volume the prepared data is reused by
  the trainer pods (same path); without one the trainer prepares again from the source.
"""

from __future__ import annotations

import base64
import json
import posixpath
from typing import Any

from dptrain.api import (
    API_VERSION,
    CONFIG_FILE,
    COORDINATOR_PORT,
    DATA_MOUNT,
    EVAL_DATA_MOUNT,
    GROUP,
    KEY_FILE,
    KIND,
    PLURAL,
    PRETRAINED_MOUNT,
    TRAINER_METRICS_PORT,
    DatasetStatus,
    DPTrainingJobSpec,
    PlanStatus,
)
from dptrain.operator._names import (
    ANNOTATION_PLAN_GENERATION,
    ANNOTATION_RESTART,
    COMPLETION_INDEX_FIELD,
    KEY_FILE_MODE,
    LABEL_COMPONENT,
    LABEL_JOB,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    MANAGER,
    TERMINATION_GRACE_SECONDS,
    ChildNames,
    JobRef,
    PodSizing,
    checkpoint_dir,
    child_meta,
    key_secret_name,
    labels,
    owner_reference,
    prepared_dir,
)
from dptrain.operator._workloads import (
    build_export_job,
    build_headless_service,
    build_jobset,
    build_prepare_job,
    build_trainer_job,
    trainer_env,
)

# The builders of a job's children, in one namespace (the workloads' are in ``_workloads``).
__all__ = [
    "ANNOTATION_PLAN_GENERATION",
    "ANNOTATION_RESTART",
    "COMPLETION_INDEX_FIELD",
    "COORDINATOR_PORT",
    "KEY_FILE_MODE",
    "LABEL_COMPONENT",
    "LABEL_JOB",
    "LABEL_MANAGED_BY",
    "LABEL_NAME",
    "MANAGER",
    "TERMINATION_GRACE_SECONDS",
    "TRAINER_METRICS_PORT",
    "ChildNames",
    "JobRef",
    "PodSizing",
    "build_config_map",
    "build_export_job",
    "build_headless_service",
    "build_jobset",
    "build_key_secret",
    "build_prepare_job",
    "build_role",
    "build_role_binding",
    "build_service_account",
    "build_trainer_job",
    "checkpoint_dir",
    "child_meta",
    "key_secret_name",
    "labels",
    "owner_reference",
    "pod_spec_manifest",
    "prepared_dir",
    "trainer_config",
    "trainer_env",
]

# ------------------------------------------------------------------------------ trainer config


def pod_spec_manifest(spec: DPTrainingJobSpec, job: JobRef) -> dict[str, Any]:
    """The job's spec with every path rewritten to its place inside the pod."""
    out = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    data = out["data"]
    if spec.data.volume is not None:
        data.pop("volume")
        if spec.data.path is not None:
            data["path"] = posixpath.join(DATA_MOUNT, spec.data.path.lstrip("/"))
        else:
            data["path"] = DATA_MOUNT
    # Which Secret holds credentials is the pod's business (envFrom, a mount), not the config's.
    data.pop("secretRef", None)
    pretrained = spec.model.pretrained
    if pretrained is not None and pretrained.volume is not None:
        model = out["model"]["pretrained"]
        model.pop("volume")
        model["path"] = posixpath.join(PRETRAINED_MOUNT, pretrained.path.lstrip("/"))
    evaluation = spec.evaluation.data if spec.evaluation is not None else None
    if evaluation is not None and evaluation.volume is not None:
        eval_data = out["evaluation"]["data"]
        eval_data.pop("volume")
        eval_data["path"] = (posixpath.join(EVAL_DATA_MOUNT, evaluation.path.lstrip("/"))
                             if evaluation.path is not None else EVAL_DATA_MOUNT)
    if evaluation is not None:
        out["evaluation"]["data"].pop("secretRef", None)
    checkpoint = out["checkpoint"]
    checkpoint.pop("volume", None)
    checkpoint.pop("secretRef", None)
    # With a uri this is the scratch orbax writes to before each upload.
    checkpoint["path"] = checkpoint_dir(spec, job)
    return out


def trainer_config(spec: DPTrainingJobSpec, job: JobRef, plan: PlanStatus | None,
                   dataset: DatasetStatus | None) -> dict[str, Any]:
    """The ``config.json`` the pods read: a DPTrainingJob manifest with in-pod paths.

    Args:
        spec: the job's spec as applied.
        job: the job's identity.
        plan: the plan to follow (None while only data preparation runs).
        dataset: the prepared dataset, once known.
    """
    manifest_spec = pod_spec_manifest(spec, job)
    status: dict[str, Any] = {}
    if dataset is not None:
        status["dataset"] = dataset.model_dump(mode="json", by_alias=True, exclude_none=True)
        manifest_spec["data"]["numSequences"] = dataset.num_sequences
    if plan is not None:
        # The pods' sizing is the operator's business, not the trainer's (nor part of its config).
        status["plan"] = plan.model_dump(mode="json", by_alias=True, exclude_none=True,
                                         exclude={"pods"})
        manifest_spec["data"]["numSequences"] = plan.dataset_size
    config: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job.name, "namespace": job.namespace},
        "spec": manifest_spec,
    }
    if status:
        config["status"] = status
    return config


def build_config_map(spec: DPTrainingJobSpec, job: JobRef, plan: PlanStatus | None,
                     dataset: DatasetStatus | None) -> dict[str, Any]:
    """The ConfigMap holding the trainer config (see the module docstring)."""
    config = trainer_config(spec, job, plan, dataset)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_meta(job, ChildNames.of(job.name).config_map, "config"),
        # Immutable: what the pods read cannot be edited under a running job; a new plan is a
        # new ConfigMap (and the operator compares the one it finds with the plan).
        "immutable": True,
        "data": {CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True)},
    }


# ------------------------------------------------------------------------------ secret key


def build_key_secret(job: JobRef, key: bytes) -> dict[str, Any]:
    """The immutable Secret holding the job's secret key (``key``: ≥ 32 random bytes).

    The caller draws ``key`` from the OS CSPRNG and never logs this object.
    """
    if len(key) < 32:
        raise ValueError("the job key must be at least 32 bytes")
    meta = child_meta(job, key_secret_name(job), "key")
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque",
            "immutable": True, "data": {KEY_FILE: base64.b64encode(key).decode()}}


# ------------------------------------------------------------------------------ RBAC


def build_service_account(job: JobRef) -> dict[str, Any]:
    """The per-job ServiceAccount the trainer and data-preparation pods run as."""
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": child_meta(job, ChildNames.of(job.name).service_account, "trainer"),
            "automountServiceAccountToken": False}


def build_role(job: JobRef) -> dict[str, Any]:
    """A Role that may read this one job and patch only its ``status``."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": child_meta(job, ChildNames.of(job.name).role, "trainer"),
        "rules": [
            {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"],
             "resourceNames": [job.name], "verbs": ["get", "patch"]},
            {"apiGroups": [GROUP], "resources": [PLURAL],
             "resourceNames": [job.name], "verbs": ["get"]},
        ],
    }


def build_role_binding(job: JobRef, service_account: str | None = None) -> dict[str, Any]:
    """Binds the per-job Role to the per-job ServiceAccount, or to the pods' own account.

    ``service_account``: the existing account the pods run as
    (``spec.podTemplateOverrides.spec.serviceAccountName``: a cloud identity such as EKS IRSA
    or GKE Workload Identity); None binds the per-job account the operator creates.
    """
    names = ChildNames.of(job.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": child_meta(job, names.role_binding, "trainer"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.role},
        "subjects": [{"kind": "ServiceAccount",
                      "name": service_account or names.service_account,
                      "namespace": job.namespace}],
    }
