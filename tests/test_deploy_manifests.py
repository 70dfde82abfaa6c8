"""`kubectl apply -k manifests/` installs valid objects: the same as the Helm chart's defaults."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "kube"))
import deploy_render as dr

# Labels that only say who rendered an object; everything else must match between the two.
_TOOL_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version",
                "app.kubernetes.io/part-of"}


@pytest.fixture(scope="session")
def manifests() -> tuple[dict[str, Any], ...]:
    return dr.manifest_objects()


@pytest.fixture(scope="session")
def chart_default() -> tuple[dict[str, Any], ...]:
    return dr.chart_objects("default")


def test_every_manifest_is_valid(manifests: tuple[dict[str, Any], ...]) -> None:
    assert manifests
    for obj in manifests:
        dr.validate_object(obj)
    kinds = sorted(obj["kind"] for obj in manifests)
    assert kinds == sorted([
        "Namespace", "CustomResourceDefinition", "CustomResourceDefinition",
        "CustomResourceDefinition", "CustomResourceDefinition", "ServiceAccount",
        "ClusterRole", "ClusterRole",
        "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "Service",
        "Deployment", "ConfigMap",
    ])


def test_namespace_enforces_restricted_pod_security(
    manifests: tuple[dict[str, Any], ...],
) -> None:
    namespace = dr.one(manifests, "Namespace")
    assert namespace["metadata"]["name"] == dr.NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in manifests:
        if obj["kind"] in {"Deployment", "Service", "ServiceAccount"}:
            assert obj["metadata"]["namespace"] == dr.NAMESPACE, dr.object_id(obj)
    for binding in dr.of_kind(manifests, "ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "dptrain-operator", "namespace": dr.NAMESPACE}
        ]


def _strip(obj: dict[str, Any]) -> dict[str, Any]:
    """An object without what depends on the tool that rendered it (labels, helm annotations)."""
    out = yaml.safe_load(yaml.safe_dump(obj))
    meta = out["metadata"]
    labels = {k: v for k, v in meta.get("labels", {}).items() if k not in _TOOL_LABELS}
    meta["labels"] = labels
    meta.get("annotations", {}).pop("helm.sh/resource-policy", None)
    if not meta.get("annotations"):
        meta.pop("annotations", None)
    if out["kind"] == "CustomResourceDefinition":
        meta.pop("labels")  # helm adds release labels; test_deploy_crd checks the content
    template = out.get("spec", {}).get("template", {}).get("metadata")
    if template:
        template["labels"] = {
            k: v for k, v in template.get("labels", {}).items() if k not in _TOOL_LABELS
        }
    return out


def test_manifests_install_what_the_chart_installs(
    manifests: tuple[dict[str, Any], ...], chart_default: tuple[dict[str, Any], ...]
) -> None:
    from_chart = {dr.object_id(obj): _strip(obj) for obj in chart_default}
    from_kustomize = {
        dr.object_id(obj): _strip(obj) for obj in manifests if obj["kind"] != "Namespace"
    }
    assert sorted(from_kustomize) == sorted(from_chart)
    for object_id, expected in from_chart.items():
        assert from_kustomize[object_id] == expected, f"{object_id} differs from the chart"


def test_samples_are_valid_jobs() -> None:
    from dptrain.api import load_job

    samples = sorted(dr.SAMPLES.glob("*.yaml"))
    assert samples, "manifests/samples/ has no DPTrainingJob samples"
    accelerators = set()
    from dptrain.api import parse_job

    for path in samples:
        for doc in dr.load_documents(path.read_text()):
            assert doc["kind"] in ("DPTrainingJob", "DPDataset"), path.name
            assert dr.validate_object(doc) == "crd"
            if doc["kind"] == "DPTrainingJob":
                accelerators.add(parse_job(doc).spec.compute.accelerator)
    assert load_job(dr.SAMPLES / "tiny-cpu.yaml")
    assert "cpu" in accelerators
    assert any(a.startswith("nvidia-") for a in accelerators), "no GPU sample"
    assert any(a.startswith("tpu-") for a in accelerators), "no TPU sample"
