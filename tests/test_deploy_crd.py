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
