"""Carrying out a decision: the reconciler's writes to Kubernetes, in a safe order.

Deletes first, then creates (the job's secret key before its workload), the ConfigMap replaced
when the plan changed (it is immutable), the annotations (the authoritative ledger before its
copy in ``status.privacy``), the status patch, then events (best effort).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import secrets
from collections.abc import Mapping
from typing import Any

from dptrain.api import (
    API_VERSION,
    IN_CLUSTER_API_SERVER,
    PLURAL,
    DPTrainingJobSpec,
    PlanStatus,
    status_path,
)
from dptrain.operator import _kueue as kueue
from dptrain.operator import _metrics
from dptrain.operator._children import (
    ChildNames,
    JobRef,
    PodSizing,
    build_config_map,
    build_key_secret,
    build_role,
    build_role_binding,
    build_service_account,
)
from dptrain.operator._conditions import timestamp
from dptrain.operator._draft import Decision
from dptrain.operator._kube import ApiError, KubeClient, resource_path
from dptrain.operator._ledger_record import ANNOTATION_LEDGER
from dptrain.operator._observed import Settings
from dptrain.operator._overrides import apply_overrides, service_account
from dptrain.operator._peering import PeeringIdentity
from dptrain.operator._profiles import Placements, placements
from dptrain.operator._spec_changes import ANNOTATION_APPLIED_SPEC
from dptrain.operator._tools import OperatorTools
from dptrain.operator._workloads import (
    Lifecycle,
    build_export_job,
    build_headless_service,
    build_jobset,
    build_prepare_job,
    build_trainer_job,
)

logger = logging.getLogger("dptrain.operator")


JOBSET_API = "jobset.x-k8s.io/v1alpha2"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReconcilerConfig:
    """Operator-wide knobs.

    Attributes:
        decisions: timing of restarts, stalls and reports.
        pod_api_server: the API server URL given to pods (``DPTRAIN_API_SERVER``).
        use_jobset: run the workload as a JobSet instead of an Indexed Job + Service.
        error_backoff: first retry delay after a failed reconcile (doubles, capped at 60 s).
        peering: this replica's peering identity when several replicas run (None: alone).
        placements: node selectors, tolerations and extra resources per accelerator (the
            accelerator profiles of the operator configuration).
    """

    decisions: Settings = dataclasses.field(default_factory=Settings)
    pod_api_server: str = IN_CLUSTER_API_SERVER
    use_jobset: bool = False
    error_backoff: float = 1.0
    peering: PeeringIdentity | None = None
    placements: Placements = dataclasses.field(default_factory=placements)


def workload_path(config: ReconcilerConfig, namespace: str, name: str | None = None) -> str:
    """The REST path of the workload kind in use (JobSets or Jobs)."""
    if config.use_jobset:
        return resource_path(JOBSET_API, "jobsets", namespace, name)
    return resource_path("batch/v1", "jobs", namespace, name)


async def apply_decision(client: KubeClient, config: ReconcilerConfig, tools: OperatorTools,
                         body: Mapping[str, Any], decision: Decision, now: dt.datetime) -> None:
    """Carry out ``decision`` for the job ``body``: delete, create, annotate, patch, post events.

    Creates are idempotent (AlreadyExists is success), so a pass repeated after a crash never
    duplicates a child; the authoritative ledger annotation is written before its published copy.
    """
    job = JobRef.from_body(body)
    names = ChildNames.of(job.name)
    ns = job.namespace
    for child in decision.delete:
        if child == "workload":
            await client.delete(workload_path(config, ns, names.workload))
            if not config.use_jobset:
                await client.delete(resource_path("v1", "services", ns, names.service))
        elif child == "prepare":
            await client.delete(resource_path("batch/v1", "jobs", ns, names.prepare))
        elif child == "export":
            await client.delete(resource_path("batch/v1", "jobs", ns, names.export))
        elif child == "config":
            await client.delete(resource_path("v1", "configmaps", ns, names.config_map))
    spec, plan = decision.spec, decision.plan
    # The ConfigMap holds the job's own spec (the decision verifies it against that); the
    # operator's default image for jobs that name none goes into the pods only.
    config_spec = spec
    if spec is not None:
        spec = config.placements.trainer.spec(spec)
    dataset = decision.dataset
    created_config = False
    for child in dict.fromkeys(decision.create):
        assert spec is not None and config_spec is not None
        if child == "config":
            created_config = await client.create(
                resource_path("v1", "configmaps", ns),
                build_config_map(config_spec, job, plan, dataset))
        elif child == "rbac":
            await _create_rbac(client, job, service_account(spec))
        elif child == "service" and not config.use_jobset:
            await client.create(resource_path("v1", "services", ns),
                                build_headless_service(job))
        elif child == "workload":
            assert plan is not None
            # The secret key first: trainer pods cannot start without it. Created once
            # (AlreadyExists keeps the first key, so restarts reuse it); never logged.
            await client.create(resource_path("v1", "secrets", ns),
                                build_key_secret(job, secrets.token_bytes(32)))
            await _create_workload(client, config, job, decision, plan, spec, _labels(body))
        elif child == "prepare":
            prepare = config.placements.trainer.apply(
                build_prepare_job(spec, job, api_server=config.pod_api_server,
                                  ttl_seconds_after_finished=spec.ttl_seconds_after_finished))
            prepare = apply_overrides(prepare, spec.pod_template_overrides)
            await client.create(resource_path("batch/v1", "jobs", ns),
                                kueue.for_queue(prepare, _labels(body)))
        elif child == "export":
            export = config.placements.trainer.apply(
                build_export_job(spec, job, api_server=config.pod_api_server))
            export = apply_overrides(export, spec.pod_template_overrides)
            await client.create(resource_path("batch/v1", "jobs", ns),
                                kueue.for_queue(export, _labels(body)))
    if decision.update_config and not created_config and config_spec is not None:
        # The ConfigMap is immutable: a new config is a new object (delete, then create) —
        # but only when it differs: a pass repeated after a lost status write re-plans the same
        # config, and replacing it then would churn the trainer's config under its feet.
        config_map = build_config_map(config_spec, job, plan, dataset)
        path = resource_path("v1", "configmaps", ns, names.config_map)
        existing = await client.get(path)
        unchanged = (existing is not None and existing.get("data") == config_map.get("data")
                     and not (existing.get("metadata") or {}).get("deletionTimestamp"))
        if not unchanged:
            await client.delete(path)
            if not await client.create(resource_path("v1", "configmaps", ns), config_map):
                raise ApiError(409, "AlreadyExists", "the old ConfigMap is still being deleted")
    job_path = resource_path(API_VERSION, PLURAL, ns, job.name)
    annotations: dict[str, str] = {}
    if decision.applied_spec is not None:
        annotations[ANNOTATION_APPLIED_SPEC] = json.dumps(
            decision.applied_spec, sort_keys=True, separators=(",", ":"))
    if decision.ledger_annotation is not None:
        # The authoritative ledger first, then its published copy (status.privacy).
        annotations[ANNOTATION_LEDGER] = decision.ledger_annotation
    if annotations:
        await client.merge_patch(job_path, {"metadata": {"annotations": annotations}})
    if decision.status:
        await client.merge_patch(status_path(ns, job.name), {"status": decision.status})
    for event in decision.events:
        try:
            await client.post_event(body, type_=event.type, reason=event.reason,
                                    message=event.message, now=timestamp(now))
        except ApiError as error:  # events are best effort, the status is the record
            logger.warning("could not post event %s on %s/%s: %s", event.reason, ns,
                           job.name, error)
    if decision.halted is not None:
        _metrics.HALTED.labels(decision.halted).inc()
        logger.info("%s/%s halted: %s (%s)", ns, job.name, decision.phase, decision.halted)


def _labels(body: Mapping[str, Any]) -> dict[str, str]:
    return dict((body.get("metadata") or {}).get("labels") or {})


async def _create_rbac(client: KubeClient, job: JobRef, account: str | None) -> None:
    """The job's status Role, bound to its own account or to the pods' (cloud identity)."""
    ns = job.namespace
    if account is None:
        await client.create(resource_path("v1", "serviceaccounts", ns),
                            build_service_account(job))
    await client.create(
        resource_path("rbac.authorization.k8s.io/v1", "roles", ns), build_role(job))
    binding = build_role_binding(job, account)
    path = resource_path("rbac.authorization.k8s.io/v1", "rolebindings", ns)
    if not await client.create(path, binding):
        # It exists: bound to whom the pods run as now (the override may have changed).
        named = resource_path("rbac.authorization.k8s.io/v1", "rolebindings", ns,
                              binding["metadata"]["name"])
        existing = await client.get(named)
        if existing is not None and existing.get("subjects") != binding["subjects"]:
            await client.merge_patch(named, {"subjects": binding["subjects"]})


async def _create_workload(client: KubeClient, config: ReconcilerConfig, job: JobRef,
                           decision: Decision, plan: PlanStatus, spec: DPTrainingJobSpec,
                           job_labels: Mapping[str, str]) -> None:
    # Built from the sizing stored with the plan (status.plan.pods), never from a re-plan: what
    # the status shows is what the pods request.
    if plan.pods is None:
        raise ValueError("status.plan.pods is missing: the decision must size the pods first")
    sizing = PodSizing(hosts=plan.pods.hosts, resources=plan.pods.resources,
                       node_selector=plan.pods.node_selector,
                       tolerations=tuple(t.model_dump(by_alias=True, exclude_none=True)
                                         for t in plan.pods.tolerations))
    lifecycle = Lifecycle(ttl_seconds_after_finished=spec.ttl_seconds_after_finished,
                          active_deadline_seconds=decision.active_deadline_seconds)
    if config.use_jobset:
        workload = build_jobset(spec, job, plan, sizing, api_server=config.pod_api_server,
                                restart=decision.restart, lifecycle=lifecycle)
    else:
        workload = build_trainer_job(spec, job, plan, sizing,
                                     api_server=config.pod_api_server,
                                     restart=decision.restart, lifecycle=lifecycle)
    workload = apply_overrides(config.placements.trainer.apply(workload),
                               spec.pod_template_overrides)
    multi_host_tpu = spec.compute.accelerator.startswith("tpu-") and sizing.hosts > 1
    await client.create(workload_path(config, job.namespace),
                        kueue.for_queue(workload, job_labels, multi_host_tpu=multi_host_tpu))
