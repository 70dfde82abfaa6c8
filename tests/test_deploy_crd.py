"""The CRD that ships (manifests/, the Helm chart) is exactly the one `dptrain crd` generates."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "kube"))
import deploy_render as dr

FIX = "run `bash scripts/generate-crd.sh` to regenerate it (never edit it by hand)"
SHIPPED = {
    "manifests/crd.yaml": dr.MANIFESTS / "crd.yaml",
    "charts/dptrain-operator/files/crd.yaml": dr.CHART / "files" / "crd.yaml",
}
SHIPPED_DATASET = {
    "manifests/crd-dpdataset.yaml": dr.MANIFESTS / "crd-dpdataset.yaml",
    "charts/dptrain-operator/files/crd-dpdataset.yaml": dr.CHART / "files" / "crd-dpdataset.yaml",
}


def test_shipped_dpdataset_crd_files_equal_the_generated_crd() -> None:
    from dptrain.api import dataset_crd_manifest, dataset_crd_yaml

    generated = dataset_crd_yaml()
    for name, path in SHIPPED_DATASET.items():
        assert path.read_text() == generated, f"{name} has drifted: {FIX}"
        (doc,) = dr.load_documents(path.read_text())
        assert doc == dataset_crd_manifest()
    from_kustomize = dr.one(dr.manifest_objects(), "CustomResourceDefinition",
                            "dpdatasets.dptrain.io")
    assert from_kustomize["spec"] == dataset_crd_manifest()["spec"], f"manifests/ drifted: {FIX}"
    from_helm = dr.one(dr.chart_objects("default"), "CustomResourceDefinition",
                       "dpdatasets.dptrain.io")
    assert from_helm["spec"] == dataset_crd_manifest()["spec"], f"the chart drifted: {FIX}"
    printer = [c["name"] for c in from_helm["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert printer == ["Spent", "Reserved", "Budget", "Jobs", "Age"]
    assert from_helm["spec"]["names"]["shortNames"] == ["dpds"]


def test_shipped_crd_files_equal_the_generated_crd() -> None:
    from dptrain.api import crd_manifest, crd_yaml

    generated = crd_yaml()
    for name, path in SHIPPED.items():
        assert path.read_text() == generated, f"{name} has drifted from `dptrain crd`: {FIX}"
        (doc,) = dr.load_documents(path.read_text())
        assert doc == crd_manifest(), f"{name} does not parse to dptrain.api.crd_manifest()"


def test_kustomize_and_helm_ship_the_generated_crd() -> None:
    from dptrain.api import crd_manifest

    generated = crd_manifest()
    from_kustomize = dr.one(dr.manifest_objects(), "CustomResourceDefinition",
                            "dptrainingjobs.dptrain.io")
    assert from_kustomize["spec"] == generated["spec"], f"manifests/ CRD drifted: {FIX}"

    from_helm = copy.deepcopy(dr.one(dr.chart_objects("default"), "CustomResourceDefinition",
                                     "dptrainingjobs.dptrain.io"))
    meta = from_helm["metadata"]
    assert meta.pop("annotations") == {"helm.sh/resource-policy": "keep"}
    # helm adds its release labels; every generated label is kept as generated.
    labels = meta.pop("labels")
    assert labels.items() >= generated["metadata"].get("labels", {}).items()
    expected = copy.deepcopy(generated)
    expected["metadata"].pop("labels", None)
    assert from_helm == expected, f"the chart's CRD drifted: {FIX}"


NUMERIC_KEYWORDS = frozenset({"minimum", "maximum", "multipleOf", "minLength", "maxLength",
                              "minItems", "maxItems", "minProperties", "maxProperties"})


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers_in_schema(schema: dict, path: str, found: list[tuple[str, object]]) -> None:
    """Collect (path, value) of every numeric keyword, default and enum value of a schema."""
    for key in NUMERIC_KEYWORDS & schema.keys():
        found.append((f"{path}.{key}", schema[key]))
    if schema.get("type") in ("number", "integer"):
        if "default" in schema:
            found.append((f"{path}.default", schema["default"]))
        found += [(f"{path}.enum[{i}]", v) for i, v in enumerate(schema.get("enum", []))]
    for name, child in (schema.get("properties") or {}).items():
        _numbers_in_schema(child, f"{path}.{name}", found)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _numbers_in_schema(schema[key], f"{path}.{key}", found)


def test_rendered_output_reads_the_same_with_yaml_1_1_tools_and_crd_numbers_are_numbers(
        tmp_path: Path) -> None:
    import subprocess

    import yaml

    crds = 0
    for key in dr.RENDERINGS:
        text = dr.rendered_text(key)
        as_yaml_1_1 = [d for d in yaml.safe_load_all(text) if d]
        as_yaml_1_2 = [d for d in yaml.load_all(text, Loader=dr.Yaml12Loader) if d]
        assert as_yaml_1_1 == as_yaml_1_2, f"{key}: PyYAML (YAML 1.1) reads something else"
        for crd in dr.of_kind(as_yaml_1_1, "CustomResourceDefinition"):
            crds += 1
            found: list[tuple[str, object]] = []
            for version in crd["spec"]["versions"]:
                _numbers_in_schema(version["schema"]["openAPIV3Schema"],
                                   f"{dr.object_id(crd)}:{version['name']}", found)
            if crd["spec"]["group"] == "dptrain.io":
                assert len(found) > 10, found  # the walk reached the bounds
            assert [(p, v) for p, v in found if not _is_number(v)] == [], key
        # kubernetes-validate's own CLI (it reads YAML 1.1 too), strict, on the built-in kinds.
        builtin = [d for d in as_yaml_1_1
                   if d.get("kind") not in dr.PROMETHEUS_OPERATOR_KINDS
                   and not d.get("apiVersion", "").startswith("dptrain.io/")]
        path = tmp_path / f"{key.replace(':', '-')}.yaml"
        path.write_text(yaml.safe_dump_all(builtin))
        cli = subprocess.run([str(Path(sys.executable).with_name("kubernetes-validate")),
                              "--strict", "-k", dr.KUBE_VERSION.removesuffix(".0"), "--quiet",
                              str(path)], capture_output=True, text=True, timeout=120,
                             check=False)
        assert cli.returncode == 0, f"{key}: {cli.stdout}{cli.stderr}"
    assert crds >= 8  # ours and kopf's peering CRDs, in the default chart and manifests/
