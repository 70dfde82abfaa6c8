"""Pure builders of a job's workloads, as plain dicts.

The trainer's Indexed Job (or JobSet) and its headless Service, and the data-preparation Job.

The pods follow the pod contract (``dptrain.api._contract``): they run :func:`trainer_command` /
:func:`prepare_command` with :func:`trainer_env`, mount the config, the data, the pretrained
checkpoint (read-only) and the evaluation data when they are on volumes, the checkpoints and
(trainers only) the job's secret key, and never run as root. Exit code
``EXIT_BUDGET_EXHAUSTED`` fails the Job for good (never retried); retries are the operator's.

Lifecycle (:class:`Lifecycle`): a finished or failed workload stays for
``spec.ttlSecondsAfterFinished`` (Kubernetes' TTL controller deletes it, its pods and their logs
with it); ``compute.deadline`` becomes the Job's ``activeDeadlineSeconds``; containers write
their last log lines as the termination message when they fail without one
(``FallbackToLogsOnError``), which the operator copies into the failure condition.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from dptrain.api import (
    CHECKPOINT_MOUNT,
    CONFIG_DIR,
    COORDINATOR_PORT,
    DATA_MOUNT,
    ENV_API_SERVER,
    ENV_GOOGLE_CREDENTIALS,
    ENV_JAX_COORDINATOR,
    ENV_JAX_NUM_PROCESSES,
    ENV_JAX_PROCESS_ID,
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_REPORT,
    EVAL_DATA_MOUNT,
    EXIT_BUDGET_EXHAUSTED,
    IN_CLUSTER_API_SERVER,
    KEY_DIR,
    KEY_FILE,
    PRETRAINED_MOUNT,
    REPORT_KUBERNETES,
    STORAGE_SECRET_DIR,
    TRAINER_METRICS_PORT,
    DPTrainingJobSpec,
    PlanStatus,
    StorageSecretRef,
    VolumeSource,
    export_command,
    prepare_command,
    trainer_command,
)
from dptrain.operator._names import (
    ANNOTATION_PLAN_GENERATION,
    ANNOTATION_RESTART,
    COMPLETION_INDEX_FIELD,
    KEY_FILE_MODE,
    LABEL_COMPONENT,
    LABEL_JOB,
    TERMINATION_GRACE_SECONDS,
    ChildNames,
    JobRef,
    PodSizing,
    checkpoint_dir,
    child_meta,
    key_secret_name,
    labels,
    prepared_dir,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lifecycle:
    """How long a workload may run and is kept.

    Attributes:
        ttl_seconds_after_finished: kept this long after it finished or failed (None: forever).
        active_deadline_seconds: the Job fails ``DeadlineExceeded`` after this long running.
    """

    ttl_seconds_after_finished: int | None = None
    active_deadline_seconds: int | None = None


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


def _claim(name: str, source: VolumeSource, mount_path: str, *, read_only: bool
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A PersistentVolumeClaim volume and its mount (``subPath`` when the source names one)."""
    volume = {"name": name, "persistentVolumeClaim": {"claimName": source.claim_name,
                                                      "readOnly": read_only}}
    mount: dict[str, Any] = {"name": name, "mountPath": mount_path, "readOnly": read_only}
    if source.sub_path:
        mount["subPath"] = source.sub_path
    return volume, mount


def _volumes(spec: DPTrainingJobSpec, job: JobRef, *, key: bool = False
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pod volumes and the container's mounts.

    Config, /tmp, data, the pretrained checkpoint and the evaluation data (when on volumes),
    checkpoints (and the key).
    """
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
    pretrained = spec.model.pretrained
    if pretrained is not None and pretrained.volume is not None:
        # Always read-only: nothing the job does may alter the weights it starts from.
        volume, mount = _claim("pretrained", pretrained.volume, PRETRAINED_MOUNT, read_only=True)
        volumes.append(volume)
        mounts.append(mount)
    evaluation = spec.evaluation.data if spec.evaluation is not None else None
    if evaluation is not None and evaluation.volume is not None:
        volume, mount = _claim("eval-data", evaluation.volume, EVAL_DATA_MOUNT,
                               read_only=evaluation.volume.read_only)
        volumes.append(volume)
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
        # (steps stay charged) but not from the weights. With a uri this is only the scratch
        # where orbax writes before the upload (and the prepared data, the report).
        volumes.append({"name": "checkpoints", "emptyDir": {}})
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT})
    if key:
        volumes.append({"name": "job-key", "secret": {
            "secretName": key_secret_name(job), "defaultMode": KEY_FILE_MODE,
            "items": [{"key": KEY_FILE, "path": KEY_FILE}]}})
        mounts.append({"name": "job-key", "mountPath": KEY_DIR, "readOnly": True})
    return volumes, mounts


def storage_credentials(spec: DPTrainingJobSpec) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's object-storage credentials: (env, envFrom, volumes, mounts).

    A ``secretRef`` without ``keyFile`` becomes ``envFrom`` (its keys are the container's
    environment: what the clouds' default credential chains read); with ``keyFile`` only that key
    is mounted, read-only, and ``GOOGLE_APPLICATION_CREDENTIALS`` names it. The kubelet resolves
    both: the Secret's values never pass through the operator, the ConfigMap or a status. Without
    a ``secretRef`` the pod's identity is used (nothing to add). The same Secret named for data
    and checkpoints is wired once.
    """
    refs: list[StorageSecretRef] = []
    for ref in (spec.data.secret_ref, spec.checkpoint.secret_ref):
        if ref is not None and ref not in refs:
            refs.append(ref)
    env: list[dict[str, Any]] = []
    env_from: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    for ref in refs:
        if ref.key_file is None:
            env_from.append({"secretRef": {"name": ref.name}})
            continue
        volumes.append({"name": "storage-credentials", "secret": {
            "secretName": ref.name, "defaultMode": KEY_FILE_MODE,
            "items": [{"key": ref.key_file, "path": ref.key_file}]}})
        mounts.append({"name": "storage-credentials", "mountPath": STORAGE_SECRET_DIR,
                       "readOnly": True})
        env.append({"name": ENV_GOOGLE_CREDENTIALS,
                    "value": f"{STORAGE_SECRET_DIR}/{ref.key_file}"})
    return env, env_from, volumes, mounts


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
    storage_env, env_from, storage_volumes, storage_mounts = storage_credentials(spec)
    volumes += storage_volumes
    mounts += storage_mounts
    container: dict[str, Any] = {
        "name": component,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": [*env, *storage_env],
        "resources": copy.deepcopy({k: dict(v) for k, v in sizing.resources.items()}),
        "securityContext": _security_context(),
        "volumeMounts": mounts,
        # A failure's last log lines become its termination message (copied into the job's
        # failure condition), so the reason survives the pod.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if env_from:
        container["envFrom"] = env_from
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


def _job_spec(template: dict[str, Any], hosts: int, lifecycle: Lifecycle) -> dict[str, Any]:
    spec: dict[str, Any] = {
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
    if lifecycle.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = lifecycle.ttl_seconds_after_finished
    if lifecycle.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = lifecycle.active_deadline_seconds
    return spec


def build_trainer_job(spec: DPTrainingJobSpec, job: JobRef, plan: PlanStatus, sizing: PodSizing,
                      *, api_server: str = IN_CLUSTER_API_SERVER, restart: int = 0,
                      lifecycle: Lifecycle | None = None) -> dict[str, Any]:
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
    meta = child_meta(job, names.workload, "trainer")
    meta["annotations"] = annotations
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": _job_spec(template, sizing.hosts, lifecycle or Lifecycle())}


def build_headless_service(job: JobRef) -> dict[str, Any]:
    """The headless Service that gives trainer pods stable DNS names for JAX's coordinator."""
    names = ChildNames.of(job.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_meta(job, names.service, "trainer"),
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
                 *, api_server: str = IN_CLUSTER_API_SERVER, restart: int = 0,
                 lifecycle: Lifecycle | None = None) -> dict[str, Any]:
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
    meta = child_meta(job, jobset, "trainer")
    meta["annotations"] = annotations
    lifecycle = lifecycle or Lifecycle()
    # The TTL is the JobSet's (it deletes its Jobs); the deadline is each Job's.
    inner = _job_spec(template, sizing.hosts,
                      dataclasses.replace(lifecycle, ttl_seconds_after_finished=None))
    jobset_spec: dict[str, Any] = {
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "failurePolicy": {"maxRestarts": 0},
        "replicatedJobs": [{"name": "node", "replicas": 1, "template": {"spec": inner}}],
    }
    if lifecycle.ttl_seconds_after_finished is not None:
        jobset_spec["ttlSecondsAfterFinished"] = lifecycle.ttl_seconds_after_finished
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": meta,
            "spec": jobset_spec}


def build_export_job(spec: DPTrainingJobSpec, job: JobRef, *,
                     api_server: str = IN_CLUSTER_API_SERVER) -> dict[str, Any]:
    """The export Job: the final checkpoint as a Hugging Face directory, reported in status.

    Post-processing of the released model (no privacy cost); it runs as the job's per-job
    ServiceAccount with the same mounts as the trainer (the pretrained checkpoint's tokenizer
    files are copied from its volume), without the secret key.
    """
    names = ChildNames.of(job.name)
    sizing = PodSizing(resources={"requests": {"cpu": "1", "memory": "2Gi"},
                                  "limits": {"memory": "8Gi"}})
    template = _pod_template(
        spec, job, component="export", command=export_command(checkpoint_dir(spec, job)),
        env=trainer_env(job, hosts=1, api_server=api_server, coordinator=None),
        sizing=sizing, subdomain=None, annotations={}, ports=[])
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": child_meta(job, names.export, "export"),
            "spec": {"backoffLimit": 1, "template": template}}


def build_prepare_job(spec: DPTrainingJobSpec, job: JobRef, *,
                      api_server: str = IN_CLUSTER_API_SERVER,
                      ttl_seconds_after_finished: int | None = None) -> dict[str, Any]:
    """The data-preparation Job: measures N, writes prepared sequences, reports status.dataset."""
    names = ChildNames.of(job.name)
    command = prepare_command(prepared_dir(spec, job))
    sizing = PodSizing(resources={"requests": {"cpu": "1", "memory": "2Gi"},
                                  "limits": {"memory": "4Gi"}})
    template = _pod_template(
        spec, job, component="prepare", command=command,
        env=trainer_env(job, hosts=1, api_server=api_server, coordinator=None),
        sizing=sizing, subdomain=None, annotations={}, ports=[])
    job_spec: dict[str, Any] = {"backoffLimit": 2, "template": template}
    if ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": child_meta(job, names.prepare, "prepare"), "spec": job_spec}
