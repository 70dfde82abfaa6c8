"""Monitoring objects: alerts and dashboard queries parse and name only metrics dptrain exports.

The PrometheusRule and the Grafana dashboard are checked with a real PromQL parser
(``promql-parser``, the Rust parser of GreptimeDB with Python bindings); every metric they name must
be exported by the operator's registry (``dptrain.operator._metrics.REGISTRY``) or the trainer's.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "kube"))
import deploy_render as dr

# The cross-team metric names (team brief); the registries are the source of truth when importable.
BRIEF_OPERATOR_METRICS = {
    "dptrain_job_epsilon_spent": "gauge",
    "dptrain_job_epsilon_budget": "gauge",
    "dptrain_job_steps_charged": "gauge",
    "dptrain_job_phase": "gauge",
    "dptrain_jobs_halted": "counter",
    "dptrain_reconcile_errors": "counter",
    "dptrain_reconcile_duration_seconds": "histogram",
}
BRIEF_TRAINER_METRICS = {
    "dptrain_trainer_step": "gauge",
    "dptrain_trainer_loss": "gauge",
    "dptrain_trainer_epsilon_spent": "gauge",
    "dptrain_trainer_epsilon_budget": "gauge",
    "dptrain_trainer_tokens_per_second": "gauge",
    "dptrain_trainer_steps": "counter",
}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
}


def _sample_names(families: dict[str, str]) -> set[str]:
    """Series names Prometheus scrapes for metric families ``{name: type}``."""
    return {name + suffix for name, kind in families.items() for suffix in _SUFFIXES[kind]}


def _families(registry: Any) -> dict[str, str]:
    return {family.name: family.type for family in registry.collect()}


def _import_if_present(module_name: str) -> Any:
    """The module, or None while it does not exist yet (other errors propagate)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def operator_families() -> dict[str, str]:
    """The operator's exported metric families (``dptrain.operator._metrics.REGISTRY``)."""
    module = _import_if_present("dptrain.operator._metrics")
    return _families(module.REGISTRY) if module else BRIEF_OPERATOR_METRICS


def trainer_families() -> dict[str, str]:
    """The trainer's metric families (a probe ``TrainerMetrics``; serves nothing without a port)."""
    module = _import_if_present("dptrain.trainer._metrics")
    if module is None:
        return BRIEF_TRAINER_METRICS
    metrics = module.TrainerMetrics("probe")
    try:
        return _families(metrics.registry)
    finally:
        metrics.close()


def _promql() -> Any:
    try:
        return importlib.import_module("promql_parser")
    except ModuleNotFoundError:
        dr.missing_tool("promql-parser is not installed (pip install promql-parser==0.11.0)")
        raise


def metric_names(expr: str) -> set[str]:
    """Parse a PromQL expression (raises ValueError if invalid); return the metrics it selects."""
    promql = _promql()
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql.VectorSelector):
            assert node.name, f"selector without a metric name in {expr!r}"
            names.add(node.name)
        return True

    promql.walk(promql.parse(expr), visit, None)
    return names


_GRAFANA_VARIABLES = [
    (re.compile(r"\$__rate_interval|\$\{__rate_interval\}"), "5m"),
    (re.compile(r"\$__range|\$\{__range\}"), "1h"),
    (re.compile(r"\$\{?\w+\}?"), ".*"),  # dashboard variables are regex matchers here
]


def grafana_to_promql(query: str) -> str:
    """A Grafana query with its variables replaced by what Grafana would interpolate."""
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)
    if label_values:
        query = label_values.group(1)
    for pattern, replacement in _GRAFANA_VARIABLES:
        query = pattern.sub(replacement, query)
    return query


@pytest.fixture(scope="session")
def monitoring() -> tuple[dict[str, Any], ...]:
    return dr.chart_objects("monitoring")


@pytest.fixture(scope="session")
def exported() -> set[str]:
    return _sample_names(operator_families()) | _sample_names(trainer_families())


def _rules(rule_object: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in rule_object["spec"]["groups"] for rule in group["rules"]]


def _assert_exported(names: Iterable[str], exported: set[str], where: str) -> None:
    unknown = sorted(set(names) - exported)
    assert not unknown, f"{where} names metrics nobody exports: {unknown}"


def test_metric_name_helper_can_fail() -> None:
    assert metric_names('rate(dptrain_jobs_halted_total{reason="x"}[5m]) > 0') == {
        "dptrain_jobs_halted_total"
    }
    with pytest.raises(ValueError):
        metric_names("sum by (handler) (rate(dptrain_reconcile_errors_total[5m])")
    with pytest.raises(AssertionError):
        _assert_exported({"dptrain_job_epsilon_spent_total"}, _sample_names(operator_families()),
                         "this check")


def test_operator_and_trainer_export_the_brief_metrics() -> None:
    operator = _import_if_present("dptrain.operator._metrics")
    assert operator is not None, "dptrain.operator._metrics (the operator's REGISTRY) is missing"
    assert operator_families().items() >= BRIEF_OPERATOR_METRICS.items()
    trainer = _import_if_present("dptrain.trainer._metrics")
    assert trainer is not None, "dptrain.trainer._metrics (TrainerMetrics) is missing"
    assert trainer_families().items() >= BRIEF_TRAINER_METRICS.items()


def test_prometheus_rule_alerts_parse_and_use_exported_metrics(
    monitoring: tuple[dict[str, Any], ...], exported: set[str]
) -> None:
    rule_object = dr.one(monitoring, "PrometheusRule")
    rules = _rules(rule_object)
    alerts = [rule["alert"] for rule in rules]
    assert len(alerts) == len(set(alerts)), f"duplicate alert names: {alerts}"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"].strip()
        if "for" in rule:
            assert re.fullmatch(r"([0-9]+(ms|s|m|h|d))+", rule["for"]), rule["for"]
        _assert_exported(metric_names(rule["expr"]), exported, f"alert {rule['alert']}")


def test_budget_alerts_are_present(monitoring: tuple[dict[str, Any], ...]) -> None:
    rules = {rule["alert"]: rule for rule in _rules(dr.one(monitoring, "PrometheusRule"))}
    nearly = rules["DPTrainEpsilonBudgetNearlySpent"]["expr"]
    assert metric_names(nearly) >= {"dptrain_job_epsilon_spent", "dptrain_job_epsilon_budget"}
    assert re.search(r">\s*0\.9\b", nearly), nearly
    halted = rules["DPTrainJobHaltedForBudget"]["expr"]
    assert metric_names(halted) == {"dptrain_job_phase"}
    assert 'phase="BudgetExhausted"' in halted
    assert "dptrain_reconcile_errors_total" in metric_names(rules["DPTrainReconcileErrors"]["expr"])
    overspent = rules["DPTrainEpsilonOverspent"]
    assert overspent["labels"]["severity"] == "critical"


def test_budget_alert_threshold_is_configurable(tmp_path: Path) -> None:
    # A values file, not --set: helm's --set turns 0.75 into a string (only integers are parsed).
    values = tmp_path / "ratio.yaml"
    values.write_text("monitoring:\n  prometheusRule:\n    epsilonSpentRatio: 0.75\n")
    objects = dr.helm_template(dr.CASES_BY_NAME["monitoring"], values_files=[values])
    rules = {rule["alert"]: rule for rule in _rules(dr.one(objects, "PrometheusRule"))}
    expr = rules["DPTrainEpsilonBudgetNearlySpent"]["expr"]
    assert re.search(r">\s*0\.75\b", expr), expr
    metric_names(expr)


def test_alert_templates_survive_helm(monitoring: tuple[dict[str, Any], ...]) -> None:
    # Prometheus' own {{ $labels.x }} templates must reach the cluster untouched by helm.
    text = json.dumps(dr.one(monitoring, "PrometheusRule"))
    assert "{{ $labels.namespace }}/{{ $labels.name }}" in text
    assert "{{ $value | humanizePercentage }}" in text


def test_grafana_dashboard_queries_parse_and_use_exported_metrics(
    monitoring: tuple[dict[str, Any], ...], exported: set[str]
) -> None:
    config_map = dr.one(monitoring, "ConfigMap", "dptrain-operator-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (payload,) = config_map["data"].values()
    dashboard = json.loads(payload)
    assert dashboard["uid"] and dashboard["title"]
    seen: set[str] = set()
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            names = metric_names(grafana_to_promql(query))
            _assert_exported(names, exported, f"variable {variable['name']}")
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(grafana_to_promql(target["expr"]))
            _assert_exported(names, exported, f"panel {panel['title']!r}")
            seen |= names
    # What the issue asks the dashboard to show: ε against budget per job, steps, loss, throughput.
    assert {
        "dptrain_job_epsilon_spent", "dptrain_job_epsilon_budget", "dptrain_job_steps_charged",
        "dptrain_trainer_loss", "dptrain_trainer_tokens_per_second",
    } <= seen


def test_service_monitor_scrapes_the_metrics_service(
    monitoring: tuple[dict[str, Any], ...],
) -> None:
    monitor = dr.one(monitoring, "ServiceMonitor")
    service = dr.one(monitoring, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names
    assert endpoint["path"] == "/metrics"
    # The operator's series carry the job's namespace: it must not be renamed exported_namespace.
    assert endpoint["honorLabels"] is True
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [dr.NAMESPACE]}
    deployment = dr.one(monitoring, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    metrics_port = next(p for p in container["ports"] if p["name"] == "metrics")
    assert metrics_port["containerPort"] == 9090
    assert container["command"][container["command"].index("--metrics-port") + 1] == "9090"


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        if operator == "Exists" and key not in labels:
            return False
        if operator == "In" and labels.get(key) not in expression["values"]:
            return False
    return True


def test_pod_monitor_selects_the_trainer_pods_the_operator_creates(
    monitoring: tuple[dict[str, Any], ...],
) -> None:
    children = pytest.importorskip("dptrain.operator._children")
    monitor = dr.one(monitoring, "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    job = children.JobRef(namespace="team-a", name="demo", uid="0-0-0")
    labels = children.labels(job, "trainer")
    assert _matches(monitor["spec"]["selector"], labels), (monitor["spec"]["selector"], labels)
    assert not _matches(monitor["spec"]["selector"], children.labels(job, "prepare"))
    assert children.TRAINER_METRICS_PORT == 9100
    assert endpoint["port"] == "metrics"
    assert endpoint["honorLabels"] is True


def test_pod_monitor_follows_the_watched_namespaces() -> None:
    objects = dr.helm_template(
        dr.RenderCase("namespaced-monitoring", "namespaced-values.yaml", (dr.MONITORING_API,))
    )
    monitor = dr.one(objects, "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_phase_matchers_name_real_phases(monitoring: tuple[dict[str, Any], ...]) -> None:
    from typing import get_args

    from dptrain.api import Phase

    phases = set(get_args(Phase))
    exprs = [rule["expr"] for rule in _rules(dr.one(monitoring, "PrometheusRule"))]
    (payload,) = dr.one(monitoring, "ConfigMap", "dptrain-operator-dashboard")["data"].values()
    exprs += [t["expr"] for p in json.loads(payload)["panels"] for t in p["targets"]]
    used = {
        value
        for expr in exprs
        for match in re.finditer(r'\bphase\s*=~?\s*"([^"]*)"', expr)
        for value in match.group(1).split("|")
    }
    assert used, "no phase matchers found"
    assert used <= phases, f"unknown phases {sorted(used - phases)}"
