"""The Helm chart lints, renders valid objects for every values file, and rejects bad values."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "kube"))
import deploy_render as dr

CASE_NAMES = [case.name for case in dr.RENDER_CASES]


@pytest.fixture(scope="session")
def rendered() -> dict[str, tuple[dict[str, Any], ...]]:
    return {name: dr.chart_objects(name) for name in CASE_NAMES}


def _kinds(objects: tuple[dict[str, Any], ...]) -> set[str]:
    return {obj["kind"] for obj in objects}


def _operator_command(objects: tuple[dict[str, Any], ...]) -> list[str]:
    deployment = dr.one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return list(container["command"])


def test_every_ci_values_file_is_rendered_by_a_case() -> None:
    files = {path.name for path in (dr.CHART / "ci").glob("*.yaml")}
    assert files == {case.values_file for case in dr.RENDER_CASES}


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_helm_lint_strict(case_name: str) -> None:
    case = dr.CASES_BY_NAME[case_name]
    out = dr.run_tool(
        [dr.helm_binary(), "lint", "--strict", str(dr.CHART), "--namespace", dr.NAMESPACE,
         "-f", str(case.values_path)]
    )
    assert "1 chart(s) linted, 0 chart(s) failed" in out


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_every_rendered_object_is_valid(
    rendered: dict[str, tuple[dict[str, Any], ...]], case_name: str
) -> None:
    objects = rendered[case_name]
    assert objects, "helm template rendered nothing"
    how = {dr.object_id(obj): dr.validate_object(obj) for obj in objects}
    assert all(h.startswith(("k8s", "crd", "skipped")) for h in how.values()), how
    ids = [dr.object_id(obj) for obj in objects]
    assert len(ids) == len(set(ids)), f"duplicate objects: {ids}"
    # Namespaced objects land in the release namespace unless they are per-watched-namespace RBAC.
    for obj in objects:
        if obj["kind"] in {"Deployment", "Service", "ServiceAccount", "ServiceMonitor",
                           "PodMonitor", "PrometheusRule"}:
            assert obj["metadata"]["namespace"] == dr.NAMESPACE, dr.object_id(obj)


def test_default_render_installs_the_operator_cluster_wide(
    rendered: dict[str, tuple[dict[str, Any], ...]],
) -> None:
    objects = rendered["default"]
    assert _kinds(objects) == {
        "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
        "Deployment", "Service", "ConfigMap",
    }
    names = {obj["metadata"]["name"] for obj in dr.of_kind(objects, "ClusterRole")}
    assert names == {
        "dptrain-operator", "dptrain-operator-discovery", "dptrain-operator-edit",
        "dptrain-operator-view",
    }
    command = _operator_command(objects)
    assert command == [
        "dptrain", "operator", "--all-namespaces", "--metrics-port", "9090",
        "--health-port", "8080", "--log-format", "json", "--config",
        "/etc/dptrain/operator.yaml",
    ]
    deployment = dr.one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/dptrain/operator:0.1.0"


def test_crd_is_kept_on_uninstall(rendered: dict[str, tuple[dict[str, Any], ...]]) -> None:
    crds = dr.of_kind(rendered["default"], "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "clusterkopfpeerings.kopf.dev", "dpdatasets.dptrain.io", "dptrainingjobs.dptrain.io",
        "kopfpeerings.kopf.dev"]
    for crd in crds:
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "CustomResourceDefinition" not in _kinds(rendered["namespaced"])  # crds.enabled=false


def test_namespaced_scope_renders_roles_per_namespace(
    rendered: dict[str, tuple[dict[str, Any], ...]],
) -> None:
    objects = rendered["namespaced"]
    roles = dr.of_kind(objects, "Role")
    bindings = dr.of_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        (subject,) = binding["subjects"]
        assert subject == {
            "kind": "ServiceAccount", "name": "dptrain-operator", "namespace": dr.NAMESPACE,
        }
        assert binding["roleRef"]["kind"] == "Role"
    # Cluster-wide, the operator keeps only read access to namespaces and CRDs.
    cluster_role = dr.one(objects, "ClusterRole", "dptrain-operator-discovery")
    resources = {res for rule in cluster_role["rules"] for res in rule["resources"]}
    assert resources == {"namespaces", "customresourcedefinitions"}
    workload_roles = [
        r for r in dr.of_kind(objects, "ClusterRole")
        if r["metadata"]["name"] == "dptrain-operator"
    ]
    assert workload_roles == [], "namespaced scope must not grant job rights cluster-wide"
    command = _operator_command(objects)
    assert "--all-namespaces" not in command
    assert command[2:6] == ["--namespace", "team-a", "--namespace", "team-b"]
    assert command[command.index("--log-format") + 1] == "plain"
    image = dr.one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("ghcr.io/dptrain/operator@sha256:")


def test_scheduling_and_extra_labels_are_applied(
    rendered: dict[str, tuple[dict[str, Any], ...]],
) -> None:
    objects = rendered["monitoring"]
    for obj in objects:
        assert obj["metadata"]["labels"]["team"] == "ml-platform", dr.object_id(obj)
    pod = dr.one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["affinity"]
    command = _operator_command(objects)
    assert command[-4:] == ["--workload", "jobset", "--stall-timeout", "1800"]


def _jobset_verbs(role: dict[str, Any]) -> set[str]:
    return {verb for rule in role["rules"] if "jobsets" in rule["resources"]
            for verb in rule["verbs"]}


def test_jobset_rights_follow_the_workload_kind(
    rendered: dict[str, tuple[dict[str, Any], ...]],
) -> None:
    manage = {"get", "list", "watch", "create", "patch", "delete"}
    for case in ("default", "monitoring"):
        role = dr.one(rendered[case], "ClusterRole", "dptrain-operator")
        assert _jobset_verbs(role) == manage, case
    # workload=job: the operator still watches JobSets but may not create any.
    for role in dr.of_kind(rendered["namespaced"], "Role"):
        assert _jobset_verbs(role) == {"get", "list", "watch"}
    command = _operator_command(rendered["namespaced"])
    assert command[command.index("--workload") + 1] == "job"
    assert "--workload" not in _operator_command(rendered["default"])


def test_monitoring_objects_need_the_prometheus_operator_api() -> None:
    case = dr.CASES_BY_NAME["monitoring"]
    without_api = dr.RenderCase("monitoring-no-api", case.values_file)
    kinds = _kinds(tuple(dr.helm_template(without_api)))
    assert not kinds & dr.PROMETHEUS_OPERATOR_KINDS
    assert "ConfigMap" in kinds  # the Grafana dashboard needs no CRD
    with_api = _kinds(dr.chart_objects("monitoring"))
    assert with_api >= dr.PROMETHEUS_OPERATOR_KINDS
    assert not _kinds(dr.chart_objects("default")) & dr.PROMETHEUS_OPERATOR_KINDS
    assert [c["metadata"]["name"] for c in dr.of_kind(dr.chart_objects("default"), "ConfigMap")
            ] == ["dptrain-operator-config"]  # no dashboard


@pytest.mark.parametrize(
    ("set_value", "complaint"),
    [
        ("imagee.tag=1.0", "imagee"),  # typo'd top-level key
        ("image.tagg=1.0", "tagg"),  # typo'd nested key
        ("monitoring.serviceMonitor.enable=true", "enable"),
        ("logFormat=xml", "logFormat"),
        ("watch.scope=namespace", "scope"),
        ("monitoring.prometheusRule.epsilonSpentRatio=1.5", "epsilonSpentRatio"),
        ("operator.metricsPort=70000", "metricsPort"),
        ("watch.namespaces[0]=Not_A_Namespace", "namespaces"),
    ],
)
def test_values_schema_rejects_bad_values(set_value: str, complaint: str) -> None:
    case = dr.CASES_BY_NAME["default"]
    with pytest.raises(dr.ToolError) as template_error:
        dr.helm_template(case, set_values=[set_value])
    assert complaint in str(template_error.value)
    with pytest.raises(dr.ToolError) as lint_error:
        dr.run_tool([dr.helm_binary(), "lint", "--strict", str(dr.CHART), "--set", set_value])
    assert complaint in str(lint_error.value)


def test_namespaced_scope_requires_namespaces() -> None:
    with pytest.raises(dr.ToolError) as error:
        dr.helm_template(dr.CASES_BY_NAME["default"], set_values=["watch.scope=namespaced"])
    assert "namespaces" in str(error.value)


def _objects_without_additional_properties_false(schema: Any, path: str = "") -> list[str]:
    """Paths of object schemas with named properties that still accept unknown keys."""
    found: list[str] = []
    if isinstance(schema, dict):
        if "properties" in schema and schema.get("additionalProperties") is not False:
            found.append(path or "<root>")
        for key, value in schema.items():
            found += _objects_without_additional_properties_false(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            found += _objects_without_additional_properties_false(value, f"{path}/{i}")
    return found


def test_values_schema_is_closed_everywhere() -> None:
    schema = json.loads((dr.CHART / "values.schema.json").read_text())
    # `if`/`then` only add conditions to the (closed) object they sit in.
    loose = [
        path for path in _objects_without_additional_properties_false(schema)
        if not path.endswith(("/if", "/then"))
    ]
    assert loose == []


def test_one_replica_runs_alone_and_two_run_with_peering(
    rendered: dict[str, tuple[dict[str, Any], ...]],
) -> None:
    alone = dr.one(rendered["default"], "Deployment")["spec"]
    assert alone["replicas"] == 1 and alone["strategy"] == {"type": "Recreate"}
    assert "--peering" not in _operator_command(rendered["default"])

    objects = rendered["ha"]
    spec = dr.one(objects, "Deployment")["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    command = _operator_command(objects)
    assert command[command.index("--peering") + 1] == "dptrain-operator"
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    operator_role = dr.one(objects, "ClusterRole", "dptrain-operator")
    peering_rules = [r for r in operator_role["rules"] if r["apiGroups"] == ["kopf.dev"]]
    assert peering_rules == [{"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"],
                              "verbs": ["get", "list", "watch", "create", "patch"]}]
    crds = {c["metadata"]["name"]: c for c in dr.of_kind(objects, "CustomResourceDefinition")}
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"


def test_namespaced_replicas_peer_in_each_watched_namespace() -> None:
    objects = dr.helm_template(dr.CASES_BY_NAME["namespaced"], set_values=["replicas=2"])
    for role in dr.of_kind(objects, "Role"):
        if role["metadata"]["name"] == "dptrain-operator":
            assert {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"],
                    "verbs": ["get", "list", "watch", "create", "patch"]} in role["rules"]
    assert "--peering" in _operator_command(tuple(objects))


def test_accelerator_profiles_reach_the_operator_configuration(tmp_path: Path) -> None:
    from dptrain.operator._profiles import load_config, placements

    custom = {"onprem": {"accelerators": {name: {
        "nodeSelector": {"example.com/gpu": name},
        "tolerations": [{"key": "example.com/gpu", "operator": "Exists"}]}
        for name in ("nvidia-a100-80gb", "nvidia-h100-80gb", "nvidia-h200")}}}
    values = tmp_path / "values.yaml"
    values.write_text(json.dumps({"acceleratorProfiles": {"gpu": "onprem", "custom": custom},
                                  "trainer": {"image": "mirror.local/trainer:1",
                                              "pullPolicy": "Always",
                                              "imagePullSecrets": ["mirror"]}}))
    objects = dr.helm_template(dr.CASES_BY_NAME["default"], values_files=[values])
    config = dr.one(objects, "ConfigMap", "dptrain-operator-config")
    path = tmp_path / "operator.yaml"
    path.write_text(config["data"]["operator.yaml"])
    chosen = placements(load_config(path))  # what the operator reads at startup
    assert chosen.gpu_name == "onprem" and chosen.tpu_name == "gke"
    assert chosen.trainer.image == "mirror.local/trainer:1"
    assert chosen.trainer.image_pull_policy == "Always"
    assert chosen.trainer.image_pull_secrets == ("mirror",)
    placement = chosen.for_accelerator("nvidia-h100-80gb")
    assert placement is not None
    assert placement.node_selector == {"example.com/gpu": "nvidia-h100-80gb"}
    deployment = dr.one(objects, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "dptrain-operator-config"
    with pytest.raises(dr.ToolError, match="operator"):
        dr.helm_template(dr.CASES_BY_NAME["default"],
                         set_values=["acceleratorProfiles.custom.x.accelerators.a.operator=1"])
