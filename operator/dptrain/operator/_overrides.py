"""Applying ``spec.podTemplateOverrides`` to the pods of a built workload (pure).

The builders (``_workloads``) make the operator's pods; the accelerator profile and the
operator's pod defaults are applied; then :func:`apply_overrides` applies the job's override
last. What may be overridden, and how each field combines with the operator's, is defined (and
validated) in :mod:`dptrain.api._pod_overrides`; here it is only carried out:

- labels, annotations, ``nodeSelector``: merged, the override's keys winning (the operator's
  own label keys cannot appear: validation refuses them);
- ``tolerations``, ``imagePullSecrets``, ``volumes``, ``env``, ``envFrom``, ``volumeMounts``:
  added after the operator's (an ``env`` entry of the same name as an operator default such as
  ``HOME`` replaces it; the pod contract's variables cannot appear);
- ``affinity``, ``priorityClassName``, ``serviceAccountName``: set;
- ``resources``: the planner's requests and limits replaced entry by entry;
- ``securityContext``: merged over the operator's restricted context; ``capabilities.drop``
  keeps ``ALL``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from dptrain.api import DPTrainingJobSpec, PodTemplateOverrides
from dptrain.api._pod_overrides import ContainerOverride

# What of the ``trainer`` entry also reaches the data-preparation container (same data, same
# credentials); its resources do not (data preparation is CPU work).
_SHARED_WITH_PREPARE = ("env", "env_from", "volume_mounts", "security_context")


def pod_templates(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The pod templates (``metadata`` + ``spec``) of a Job or JobSet, to edit in place."""
    spec = workload.get("spec") or {}
    if workload.get("kind") == "JobSet":
        for job in spec.get("replicatedJobs", []):
            yield job["template"]["spec"]["template"]
    elif "template" in spec:
        yield spec["template"]


def apply_overrides(
    workload: dict[str, Any], overrides: PodTemplateOverrides | None
) -> dict[str, Any]:
    """``workload`` with the job's pod template overrides applied to every pod (a copy)."""
    if overrides is None:
        return workload
    out = copy.deepcopy(workload)
    for template in pod_templates(out):
        _apply_pod(template, overrides)
    return out


def _by_name(
    items: list[dict[str, Any]], extra: list[dict[str, Any]], key: str = "name"
) -> list[dict[str, Any]]:
    """``items`` then ``extra``, an ``extra`` entry replacing an item of the same ``key``."""
    names = {str(e.get(key)) for e in extra}
    return [i for i in items if str(i.get(key)) not in names] + copy.deepcopy(extra)


def _apply_pod(template: dict[str, Any], overrides: PodTemplateOverrides) -> None:
    meta = template.setdefault("metadata", {})
    if overrides.metadata.labels:
        meta["labels"] = {**(meta.get("labels") or {}), **overrides.metadata.labels}
    if overrides.metadata.annotations:
        meta["annotations"] = {**(meta.get("annotations") or {}), **overrides.metadata.annotations}
    pod = template["spec"]
    over = overrides.spec
    if over.node_selector:
        pod["nodeSelector"] = {**(pod.get("nodeSelector") or {}), **over.node_selector}
    if over.affinity is not None:
        pod["affinity"] = copy.deepcopy(over.affinity)
    if over.tolerations:
        present = list(pod.get("tolerations") or [])
        pod["tolerations"] = present + [
            copy.deepcopy(t) for t in over.tolerations if t not in present
        ]
    if over.priority_class_name is not None:
        pod["priorityClassName"] = over.priority_class_name
    if over.image_pull_secrets:
        pod["imagePullSecrets"] = _by_name(
            list(pod.get("imagePullSecrets") or []), list(over.image_pull_secrets)
        )
    if over.service_account_name is not None:
        pod["serviceAccountName"] = over.service_account_name
    if over.volumes:
        pod["volumes"] = _by_name(list(pod.get("volumes") or []), list(over.volumes))
    for container in pod.get("containers", []):
        name = container.get("name")
        trainer = over.container("trainer")
        if name == "trainer" and trainer is not None:
            _apply_container(container, trainer, (*_SHARED_WITH_PREPARE, "resources"))
        elif name == "prepare":
            if trainer is not None:
                _apply_container(container, trainer, _SHARED_WITH_PREPARE)
            prepare = over.container("prepare")
            if prepare is not None:
                _apply_container(container, prepare, (*_SHARED_WITH_PREPARE, "resources"))


def _apply_container(
    container: dict[str, Any], over: ContainerOverride, fields: tuple[str, ...]
) -> None:
    if "env" in fields and over.env:
        container["env"] = _by_name(list(container.get("env") or []), list(over.env))
    if "env_from" in fields and over.env_from:
        container["envFrom"] = list(container.get("envFrom") or []) + copy.deepcopy(
            list(over.env_from)
        )
    if "volume_mounts" in fields and over.volume_mounts:
        container["volumeMounts"] = list(container.get("volumeMounts") or []) + copy.deepcopy(
            list(over.volume_mounts)
        )
    if "resources" in fields and over.resources is not None:
        resources = copy.deepcopy(container.get("resources") or {})
        for kind in ("requests", "limits"):
            if kind in over.resources:
                resources[kind] = {**(resources.get(kind) or {}), **over.resources[kind]}
        if "claims" in over.resources:
            resources["claims"] = copy.deepcopy(over.resources["claims"])
        container["resources"] = resources
    if "security_context" in fields and over.security_context is not None:
        container["securityContext"] = merge_security_context(
            container.get("securityContext") or {}, over.security_context
        )


def service_account(spec: DPTrainingJobSpec) -> str | None:
    """The existing ServiceAccount the pods run as, if the override names one."""
    overrides = spec.pod_template_overrides
    return overrides.spec.service_account_name if overrides is not None else None


def merge_security_context(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged over ``base``; capabilities dropped by ``base`` stay dropped."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if key == "capabilities":
            caps = dict(out.get("capabilities") or {})
            drop = list(caps.get("drop") or [])
            drop += [c for c in value.get("drop") or [] if c not in drop]
            if drop:
                caps["drop"] = drop
            if value.get("add"):
                caps["add"] = list(value["add"])
            out["capabilities"] = caps
        else:
            out[key] = copy.deepcopy(value)
    return out
