"""Least privilege and safe pod defaults in everything dptrain installs or creates.

RBAC: the rules of the chart (every values file) and of manifests/ must stay within an explicit
allow-list: no wildcards, secrets only ``create`` (each job's key; never read), no
escalate/bind/impersonate, no pods, cluster-wide
rights only for discovery. The per-job trainer Role the operator creates may touch its own job
only (``resourceNames``). Pods: non-root, read-only root filesystem, no privilege escalation, all
capabilities dropped, RuntimeDefault seccomp, resource requests and limits, a liveness probe.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "kube"))
import deploy_render as dr

READ = frozenset({"get", "list", "watch"})
# Children addressed by name: no list/watch (which would read every such object in a namespace).
MANAGE = frozenset({"get", "create", "patch", "delete"})
# (apiGroup, resource) -> the most the operator's own roles may grant.
OPERATOR_ALLOWED: dict[tuple[str, str], frozenset[str]] = {
    ("", "namespaces"): frozenset({"list", "watch"}),
    ("apiextensions.k8s.io", "customresourcedefinitions"): READ,
    ("dptrain.io", "dptrainingjobs"): READ | {"patch"},
    ("dptrain.io", "dptrainingjobs/status"): frozenset({"get", "patch"}),
    # DPDatasets: the ledger in their status and the finalizer that guards it.
    ("dptrain.io", "dpdatasets"): READ | {"patch"},
    ("dptrain.io", "dpdatasets/status"): frozenset({"get", "patch"}),
    ("", "events"): frozenset({"create", "patch"}),
    ("events.k8s.io", "events"): frozenset({"create", "patch"}),
    ("", "configmaps"): MANAGE,
    # Each job's secret key: create only, so the operator can read no Secret.
    ("", "secrets"): frozenset({"create"}),
    ("", "serviceaccounts"): MANAGE,
    ("", "services"): MANAGE,
    ("batch", "jobs"): READ | MANAGE,
    # Trainer pods: listed by label (scheduling, disruptions, termination messages), never
    # watched or changed.
    ("", "pods"): frozenset({"get", "list"}),
    ("rbac.authorization.k8s.io", "roles"): MANAGE,
    ("rbac.authorization.k8s.io", "rolebindings"): MANAGE,
    ("jobset.x-k8s.io", "jobsets"): READ | MANAGE,
    # kopf peering (several replicas): keep-alives in the peering object, created if missing.
    ("kopf.dev", "clusterkopfpeerings"): READ | {"create", "patch"},
    ("kopf.dev", "kopfpeerings"): READ | {"create", "patch"},
}
# Cluster-scoped resources: the only ones a namespaced-scope operator may reach cluster-wide.
CLUSTER_DISCOVERY = {("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions")}
DANGEROUS_VERBS = {"*", "escalate", "bind", "impersonate", "approve", "sign"}
USER_ROLE_SUFFIXES = ("-edit", "-view")


def _renderings() -> dict[str, tuple[dict[str, Any], ...]]:
    return dr.all_rendered()


@pytest.fixture(scope="session")
def renderings() -> dict[str, tuple[dict[str, Any], ...]]:
    return _renderings()


def _grants(rule: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (group, resource, verb)
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    ]


def rbac_violations(
    role: dict[str, Any], allowed: dict[tuple[str, str], frozenset[str]]
) -> list[str]:
    """What a Role/ClusterRole grants beyond ``allowed`` or that is never acceptable."""
    problems: list[str] = []
    where = dr.object_id(role)
    if role.get("aggregationRule"):
        problems.append(f"{where}: aggregationRule pulls in rights from other roles")
    for rule in role.get("rules", []):
        if rule.get("nonResourceURLs"):
            problems.append(f"{where}: nonResourceURLs {rule['nonResourceURLs']}")
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            if "*" in rule.get(field, []):
                problems.append(f"{where}: wildcard in {field}")
        for group, resource, verb in _grants(rule):
            if resource.split("/")[0] == "secrets" and verb not in allowed.get(
                    (group, "secrets"), frozenset()):
                problems.append(f"{where}: {verb} on secrets")
            if verb in DANGEROUS_VERBS:
                problems.append(f"{where}: verb {verb} on {group}/{resource}")
            if verb not in allowed.get((group, resource), frozenset()):
                problems.append(f"{where}: {verb} {group or 'core'}/{resource} is not allowed")
    return problems


def test_rbac_checker_catches_overreach() -> None:
    role = {"kind": "ClusterRole", "metadata": {"name": "bad"}, "rules": [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        {"apiGroups": ["*"], "resources": ["pods"], "verbs": ["delete"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["escalate"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["update"]},
    ]}
    problems = " | ".join(rbac_violations(role, OPERATOR_ALLOWED))
    for expected in ("secrets", "wildcard in apiGroups", "escalate", "delete core/pods",
                     "update batch/jobs"):
        assert expected in problems


def _operator_roles(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [
        role for role in dr.of_kind(objects, "Role", "ClusterRole")
        if not role["metadata"]["name"].endswith(USER_ROLE_SUFFIXES)
    ]


def test_operator_rbac_is_least_privilege(
    renderings: dict[str, tuple[dict[str, Any], ...]],
) -> None:
    for name, objects in renderings.items():
        roles = _operator_roles(objects)
        assert roles, f"{name}: no operator roles"
        problems = [p for role in roles for p in rbac_violations(role, OPERATOR_ALLOWED)]
        assert problems == [], name
        for binding in dr.of_kind(objects, "RoleBinding", "ClusterRoleBinding"):
            ref = binding["roleRef"]["name"]
            assert ref not in {"cluster-admin", "admin", "edit"}, dr.object_id(binding)
            assert any(r["metadata"]["name"] == ref for r in roles), dr.object_id(binding)
            assert all(s["kind"] == "ServiceAccount" for s in binding["subjects"])


def test_operator_can_grant_what_trainers_need_without_escalate(
    renderings: dict[str, tuple[dict[str, Any], ...]],
) -> None:
    # RBAC lets a subject create a Role only with rights it holds itself (no `escalate`): the
    # operator must hold every right of the per-job trainer Role, in every namespace it serves.
    children = pytest.importorskip("dptrain.operator._children")
    job = children.JobRef(name="demo", namespace="team-a",
                          uid="00000000-0000-0000-0000-000000000000")
    needed = {
        (group, resource, verb)
        for rule in children.build_role(job)["rules"] for group, resource, verb in _grants(rule)
    }
    for name, objects in renderings.items():
        held = {
            grant for role in _operator_roles(objects) for rule in role["rules"]
            for grant in _grants(rule)
        }
        assert needed <= held, f"{name}: operator lacks {sorted(needed - held)}"


def test_namespaced_scope_grants_nothing_cluster_wide_but_discovery(
    renderings: dict[str, tuple[dict[str, Any], ...]],
) -> None:
    objects = renderings["chart:namespaced"]
    for role in dr.of_kind(objects, "ClusterRole"):
        if role["metadata"]["name"].endswith(USER_ROLE_SUFFIXES):
            continue
        granted = {(g, r) for rule in role["rules"] for g, r, _ in _grants(rule)}
        assert granted <= CLUSTER_DISCOVERY, dr.object_id(role)


def test_user_roles_aggregate_and_never_write_status(
    renderings: dict[str, tuple[dict[str, Any], ...]],
) -> None:
    for name, objects in renderings.items():
        edit = dr.one(objects, "ClusterRole", "dptrain-operator-edit")
        view = dr.one(objects, "ClusterRole", "dptrain-operator-view")
        assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
        assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
        assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
        for group, resource, verb in (g for rule in edit["rules"] for g in _grants(rule)):
            assert group == "dptrain.io", name
            if resource.endswith("/status"):
                assert verb in READ, f"{name}: users may not {verb} {resource}"
        for group, resource, verb in (g for rule in view["rules"] for g in _grants(rule)):
            assert (group, verb) in {("dptrain.io", v) for v in READ}, name
            assert resource.startswith(("dptrainingjobs", "dpdatasets"))


def test_trainer_role_is_limited_to_its_own_job() -> None:
    children = pytest.importorskip("dptrain.operator._children")
    job = children.JobRef(name="demo", namespace="team-a",
                          uid="00000000-0000-0000-0000-000000000000")
    role = children.build_role(job)
    assert role["kind"] == "Role" and role["metadata"]["namespace"] == "team-a"
    dr.validate_object(role)
    allowed = {("dptrain.io", "dptrainingjobs"): frozenset({"get"}),
               ("dptrain.io", "dptrainingjobs/status"): frozenset({"get", "patch"})}
    assert rbac_violations(role, allowed) == []
    for rule in role["rules"]:
        assert rule.get("resourceNames") == ["demo"], rule
    binding = children.build_role_binding(job)
    dr.validate_object(binding)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}


# ------------------------------------------------------------------------------ pods


def pod_security_violations(pod_spec: dict[str, Any], where: str) -> list[str]:
    """Ways a pod spec falls short of the `restricted` Pod Security Standard and our defaults."""
    problems: list[str] = []
    pod_ctx = pod_spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(flag):
            problems.append(f"{where}: {flag}")
    for volume in pod_spec.get("volumes", []):
        if "hostPath" in volume:
            problems.append(f"{where}: hostPath volume {volume['name']}")
    containers = pod_spec.get("containers", []) + pod_spec.get("initContainers", [])
    if not containers:
        problems.append(f"{where}: no containers")
    for container in containers:
        at = f"{where}/{container['name']}"
        ctx = container.get("securityContext", {})
        if not (ctx.get("runAsNonRoot") or pod_ctx.get("runAsNonRoot")):
            problems.append(f"{at}: runAsNonRoot is not set")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            problems.append(f"{at}: runs as UID 0")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: root filesystem is writable")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        if ctx.get("privileged"):
            problems.append(f"{at}: privileged")
        if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
            problems.append(f"{at}: capabilities not dropped")
        if ctx.get("capabilities", {}).get("add"):
            problems.append(f"{at}: adds capabilities")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"{at}: seccompProfile is {seccomp}")
        resources = container.get("resources", {})
        if not resources.get("requests") or not resources.get("limits", {}).get("memory"):
            problems.append(f"{at}: needs resource requests and a memory limit")
    return problems


def test_pod_checker_catches_unsafe_pods() -> None:
    unsafe = {"hostNetwork": True, "containers": [{"name": "c", "securityContext": {}}],
              "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    problems = " | ".join(pod_security_violations(unsafe, "pod"))
    for expected in ("hostNetwork", "hostPath", "runAsNonRoot", "writable",
                     "allowPrivilegeEscalation", "capabilities", "seccomp", "resource"):
        assert expected in problems


def test_operator_pods_are_locked_down(
    renderings: dict[str, tuple[dict[str, Any], ...]],
) -> None:
    for name, objects in renderings.items():
        deployment = dr.one(objects, "Deployment")
        spec = deployment["spec"]
        command = spec["template"]["spec"]["containers"][0]["command"]
        if "--peering" in command:  # several replicas, one active (kopf peering)
            assert spec["replicas"] >= 2 and spec["strategy"]["type"] == "RollingUpdate", name
        else:  # alone: never two operators (two ledger writers) at once, even in an upgrade
            assert spec["replicas"] == 1, name
            assert spec["strategy"] == {"type": "Recreate"}, name
        pod = spec["template"]["spec"]
        assert pod_security_violations(pod, f"{name}:{dr.object_id(deployment)}") == []
        (container,) = pod["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        health = next(p for p in container["ports"] if p["name"] == "health")
        assert health["containerPort"] == 8080
        assert container["livenessProbe"]["httpGet"]["port"] in {"health", 8080}
        assert container["command"][:2] == ["dptrain", "operator"]
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts  # a writable scratch dir, since / is read-only
        assert not any("secret" in volume for volume in pod.get("volumes", [])), name


def _sample_spec() -> Any:
    from dptrain.api import load_job

    # Single-job samples (dataset-budget.yaml holds a DPDataset and two jobs).
    samples = [p for p in sorted(dr.SAMPLES.glob("*.yaml")) if "kind: DPDataset" not in
               p.read_text()]
    if not samples:
        pytest.skip("no sample DPTrainingJob in manifests/samples yet")
    return load_job(samples[0]).spec


def test_workloads_the_operator_creates_are_locked_down() -> None:
    children = pytest.importorskip("dptrain.operator._children")
    from dptrain.api import PlanStatus

    spec = _sample_spec()
    job = children.JobRef(name="demo", namespace="team-a",
                          uid="00000000-0000-0000-0000-000000000000")
    plan = PlanStatus(
        model_preset="tiny", model_params=1_000_000, batch_size=256, iterations=100,
        noise_multiplier=1.0, noise_batch_ratio=1.0 / 256, sampling_rate=0.01,
        physical_batch_size=300, dataset_size=25_600, sequence_length=128, clip_norm=1.0,
        learning_rate=1e-3, compute_flops=1e15, max_steps=100, epsilon_planned=1.0,
    )
    sizing = children.PodSizing(hosts=2)
    workloads = [
        children.build_trainer_job(spec, job, plan, sizing),
        children.build_prepare_job(spec, job),
        children.build_service_account(job),
        children.build_headless_service(job),
    ]
    for obj in workloads:
        dr.validate_object(obj)
    for obj in workloads[:2]:
        pod = obj["spec"]["template"]["spec"]
        assert pod_security_violations(pod, dr.object_id(obj)) == []
        # The only Secret a pod mounts is its job's key, read-only (issue 10).
        secrets = [v for v in pod.get("volumes", []) if "secret" in v]
        assert all(v["secret"]["secretName"] == children.key_secret_name(job) for v in secrets)
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert all(mounts[v["name"]]["readOnly"] is True for v in secrets)
