"""Pure builders of a DPTrainingJob's children: Kubernetes objects as plain dicts.

Every child carries an ownerReference (``controller: true``) to its job, so deleting the job
deletes them, and the labels ``dptrain.io/job=<job>`` and ``app.kubernetes.io/managed-by=
dptrain-operator``. Names are deterministic, so re-running a handler can never duplicate a child.

What the pods run (the contract with ``dptrain train`` / ``dptrain prepare-data``; its names,
paths, ports and exit codes are defined once, in ``dptrain.api._contract``):

- The ConfigMap ``<job>-config`` holds ``config.json``, mounted read-only at ``/etc/dptrain``. It is
  a complete ``DPTrainingJob`` manifest whose paths are rewritten to paths *inside the pod*
  (``spec.data.volume`` mounted at ``/data``, ``spec.checkpoint.volume`` at ``/checkpoints``; the
  rewritten spec has no ``volume`` fields, so its paths are plain local paths) and whose
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
- When N is unknown, a data-preparation Job runs ``dptrain prepare-data --config
  /etc/dptrain/config.json --output <checkpoint dir>/prepared --report kubernetes`` with the same
  env (without the JAX variables) and merge-patches ``status.dataset`` (``numSequences``,
  ``location``, ``checksum``) of its job. With a checkpoint volume the prepared data is reused by
  the trainer pods (same path); without one the trainer prepares again from the source.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import posixpath
from collections.abc import Mapping
from typing import Any

from dptrain.api import (
    API_VERSION,
    CHECKPOINT_MOUNT,
    CONFIG_DIR,
    CONFIG_FILE,
    COORDINATOR_PORT,
    DATA_MOUNT,
    ENV_API_SERVER,
    ENV_JAX_COORDINATOR,
    ENV_JAX_NUM_PROCESSES,
    ENV_JAX_PROCESS_ID,
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_REPORT,
    EXIT_BUDGET_EXHAUSTED,
    GROUP,
    IN_CLUSTER_API_SERVER,
    KEY_DIR,
    KEY_FILE,
    KIND,
    PLURAL,
    REPORT_KUBERNETES,
    TRAINER_METRICS_PORT,
    DatasetStatus,
    DPTrainingJobSpec,
    PlanStatus,
    prepare_command,
    trainer_command,
)

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
        )


def owner_reference(job: JobRef) -> dict[str, Any]:
    """The ownerReference that makes ``job`` the controller of a child."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": job.name, "uid": job.uid,
            "controller": True, "blockOwnerDeletion": True}


def labels(job: JobRef, component: str) -> dict[str, str]:
    """Labels every child carries (the operator watches Jobs by them)."""
    return {LABEL_NAME: "dptrain", LABEL_COMPONENT: component, LABEL_MANAGED_BY: MANAGER,
            LABEL_JOB: job.name}


def _meta(job: JobRef, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": job.namespace, "labels": labels(job, component),
            "ownerReferences": [owner_reference(job)]}


# ------------------------------------------------------------------------------ trainer config


def checkpoint_dir(spec: DPTrainingJobSpec, job: JobRef) -> str:
    """The checkpoint directory inside the pod."""
    if spec.checkpoint.volume is None:
        return CHECKPOINT_MOUNT
    relative = (spec.checkpoint.path or job.name).lstrip("/")
    return posixpath.join(CHECKPOINT_MOUNT, relative)


def prepared_dir(spec: DPTrainingJobSpec, job: JobRef) -> str:
    """Where data preparation writes the prepared sequences inside the pod."""
    return posixpath.join(checkpoint_dir(spec, job), "prepared")


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
    checkpoint = out["checkpoint"]
    checkpoint.pop("volume", None)
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
        status["plan"] = plan.model_dump(mode="json", by_alias=True, exclude_none=True)
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
        "metadata": _meta(job, ChildNames.of(job.name).config_map, "config"),
        # Immutable: what the pods read cannot be edited under a running job; a new plan is a
        # new ConfigMap (and the operator compares the one it finds with the plan).
        "immutable": True,
        "data": {CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True)},
    }


# ------------------------------------------------------------------------------ secret key


def key_secret_name(job: JobRef) -> str:
    """The name of the job's key Secret: includes the uid, so a re-created job gets a new key."""
    return _shorten(job.name, f"key-{job.uid.replace('-', '')[:8]}", 63)


def build_key_secret(job: JobRef, key: bytes) -> dict[str, Any]:
    """The immutable Secret holding the job's secret key (``key``: ≥ 32 random bytes).

    The caller draws ``key`` from the OS CSPRNG and never logs this object.
    """
    if len(key) < 32:
        raise ValueError("the job key must be at least 32 bytes")
    meta = _meta(job, key_secret_name(job), "key")
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque",
            "immutable": True, "data": {KEY_FILE: base64.b64encode(key).decode()}}


# ------------------------------------------------------------------------------ RBAC


def build_service_account(job: JobRef) -> dict[str, Any]:
    """The per-job ServiceAccount the trainer and data-preparation pods run as."""
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _meta(job, ChildNames.of(job.name).service_account, "trainer"),
            "automountServiceAccountToken": False}


def build_role(job: JobRef) -> dict[str, Any]:
    """A Role that may read this one job and patch only its ``status``."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(job, ChildNames.of(job.name).role, "trainer"),
        "rules": [
            {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"],
             "resourceNames": [job.name], "verbs": ["get", "patch"]},
            {"apiGroups": [GROUP], "resources": [PLURAL],
             "resourceNames": [job.name], "verbs": ["get"]},
        ],
    }


def build_role_binding(job: JobRef) -> dict[str, Any]:
    """Binds the per-job Role to the per-job ServiceAccount."""
    names = ChildNames.of(job.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(job, names.role_binding, "trainer"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.role},
        "subjects": [{"kind": "ServiceAccount", "name": names.service_account,
                      "namespace": job.namespace}],
    }


# ------------------------------------------------------------------------------ pods


def trainer_env(job: JobRef, *, hosts: int, api_server: str,
                coordinator: str | None) -> list[dict[str, Any]]:
    """Environment of trainer pods (see the module docstring); no JAX vars without a coordinator."""
    env: list[dict[str, Any]] = [
        {"name": ENV_JOB_NAME, "value": job.name},
        {"name": ENV_JOB_NAMESPACE, "value": job.namespace},
        {"name": ENV_API_SERVER, "value": api_server},
        {"name": ENV_REPORT, "value": REPORT_KUBERNETES},
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/.matplotlib"},
    ]
    if coordinator is not None:
        env += [
            {"name": ENV_JAX_COORDINATOR, "value": coordinator},
            {"name": ENV_JAX_NUM_PROCESSES, "value": str(hosts)},
            {"name": ENV_JAX_PROCESS_ID,
             "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}}},
        ]
    return env


def _volumes(spec: DPTrainingJobSpec, job: JobRef, *, key: bool = False
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pod volumes and the container's mounts: config, /tmp, data, checkpoints (and the key)."""
    names = ChildNames.of(job.name)
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": names.config_map}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.data.volume is not None:
        volumes.append({"name": "data", "persistentVolumeClaim": {
            "claimName": spec.data.volume.claim_name, "readOnly": spec.data.volume.read_only}})
        mount: dict[str, Any] = {"name": "data", "mountPath": DATA_MOUNT,
                                 "readOnly": spec.data.volume.read_only}
        if spec.data.volume.sub_path:
            mount["subPath"] = spec.data.volume.sub_path
        mounts.append(mount)
    if spec.checkpoint.volume is not None:
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {
            "claimName": spec.checkpoint.volume.claim_name}})
        mount = {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT}
        if spec.checkpoint.volume.sub_path:
            mount["subPath"] = spec.checkpoint.volume.sub_path
        mounts.append(mount)
    else:
        # Without a volume checkpoints live as long as the pod: a restart starts from the ledger
        # (steps stay charged) but not from the weights.
        volumes.append({"name": "checkpoints", "emptyDir": {}})
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT})
    if key:
        volumes.append({"name": "job-key", "secret": {
            "secretName": key_secret_name(job), "defaultMode": KEY_FILE_MODE,
            "items": [{"key": KEY_FILE, "path": KEY_FILE}]}})
        mounts.append({"name": "job-key", "mountPath": KEY_DIR, "readOnly": True})
    return volumes, mounts


def _security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_template(spec: DPTrainingJobSpec, job: JobRef, *, component: str,
                  command: list[str], env: list[dict[str, Any]], sizing: PodSizing,
                  subdomain: str | None, annotations: Mapping[str, str],
                  ports: list[dict[str, Any]], key: bool = False) -> dict[str, Any]:
    volumes, mounts = _volumes(spec, job, key=key)
    container: dict[str, Any] = {
        "name": component,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": env,
        "resources": copy.deepcopy({k: dict(v) for k, v in sizing.resources.items()}),
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }
    if ports:
        container["ports"] = ports
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": ChildNames.of(job.name).service_account,
        # The token is needed to report progress; only this pod's per-job account gets it.
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": _pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if subdomain is not None:
        pod_spec["subdomain"] = subdomain
    if sizing.node_selector:
        pod_spec["nodeSelector"] = dict(sizing.node_selector)
    if sizing.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in sizing.tolerations]
    return {"metadata": {"labels": labels(job, component), "annotations": dict(annotations)},
            "spec": pod_spec}


def _job_spec(template: dict[str, Any], hosts: int) -> dict[str, Any]:
    return {
        "completionMode": "Indexed",
        "completions": hosts,
        "parallelism": hosts,
        # Retries are the operator's (with backoff, each resuming from the ledger), not the Job's.
        "backoffLimit": 0,
        "podFailurePolicy": {"rules": [
            # Exit 4 is the trainer's "budget exhausted": final, never retried.
            {"action": "FailJob",
             "onExitCodes": {"operator": "In", "values": [EXIT_BUDGET_EXHAUSTED]}},
            # Preemption and node drains are not the trainer's fault: do not count them.
            {"action": "Ignore",
             "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": template,
    }


def build_trainer_job(spec: DPTrainingJobSpec, job: JobRef, plan: PlanStatus, sizing: PodSizing,
                      *, api_server: str = IN_CLUSTER_API_SERVER, restart: int = 0
                      ) -> dict[str, Any]:
    """The Indexed Job that runs the trainer on ``sizing.hosts`` pods."""
    names = ChildNames.of(job.name)
    coordinator = f"{names.workload}-0.{names.service}:{COORDINATOR_PORT}"
    annotations = {ANNOTATION_RESTART: str(restart),
                   ANNOTATION_PLAN_GENERATION: str(plan.spec_generation or 0)}
    template = _pod_template(
        spec, job, component="trainer", command=trainer_command(),
        env=trainer_env(job, hosts=sizing.hosts, api_server=api_server, coordinator=coordinator),
        sizing=sizing, subdomain=names.service, annotations=annotations,
        ports=[{"name": "coordinator", "containerPort": COORDINATOR_PORT},
               {"name": "metrics", "containerPort": TRAINER_METRICS_PORT}], key=True)
    meta = _meta(job, names.workload, "trainer")
    meta["annotations"] = annotations
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": _job_spec(template, sizing.hosts)}


def build_headless_service(job: JobRef) -> dict[str, Any]:
    """The headless Service that gives trainer pods stable DNS names for JAX's coordinator."""
    names = ChildNames.of(job.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, names.service, "trainer"),
        "spec": {
            "clusterIP": "None",
            # JAX processes rendezvous before any readiness: publish them immediately.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: job.name, LABEL_COMPONENT: "trainer"},
            "ports": [{"name": "coordinator", "port": COORDINATOR_PORT,
                       "targetPort": COORDINATOR_PORT}],
        },
    }


def build_jobset(spec: DPTrainingJobSpec, job: JobRef, plan: PlanStatus, sizing: PodSizing,
                 *, api_server: str = IN_CLUSTER_API_SERVER, restart: int = 0) -> dict[str, Any]:
    """The same workload as a JobSet (one replicated Job ``node``; JobSet makes the Service)."""
    names = ChildNames.of(job.name)
    jobset = names.workload
    coordinator = f"{jobset}-node-0-0.{jobset}:{COORDINATOR_PORT}"
    annotations = {ANNOTATION_RESTART: str(restart),
                   ANNOTATION_PLAN_GENERATION: str(plan.spec_generation or 0)}
    template = _pod_template(
        spec, job, component="trainer", command=trainer_command(),
        env=trainer_env(job, hosts=sizing.hosts, api_server=api_server, coordinator=coordinator),
        sizing=sizing, subdomain=None, annotations=annotations,
        ports=[{"name": "coordinator", "containerPort": COORDINATOR_PORT},
               {"name": "metrics", "containerPort": TRAINER_METRICS_PORT}], key=True)
    meta = _meta(job, jobset, "trainer")
    meta["annotations"] = annotations
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": meta,
        "spec": {
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "failurePolicy": {"maxRestarts": 0},
            "replicatedJobs": [{"name": "node", "replicas": 1,
                                "template": {"spec": _job_spec(template, sizing.hosts)}}],
        },
    }


def build_prepare_job(spec: DPTrainingJobSpec, job: JobRef, *,
                      api_server: str = IN_CLUSTER_API_SERVER) -> dict[str, Any]:
    """The data-preparation Job: measures N, writes prepared sequences, reports status.dataset."""
    names = ChildNames.of(job.name)
    command = prepare_command(prepared_dir(spec, job))
    sizing = PodSizing(resources={"requests": {"cpu": "1", "memory": "2Gi"},
                                  "limits": {"memory": "4Gi"}})
    template = _pod_template(
        spec, job, component="prepare", command=command,
        env=trainer_env(job, hosts=1, api_server=api_server, coordinator=None),
        sizing=sizing, subdomain=None, annotations={}, ports=[])
    job_spec = {"backoffLimit": 2, "template": template}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": _meta(job, names.prepare, "prepare"), "spec": job_spec}
