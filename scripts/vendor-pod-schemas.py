#!/usr/bin/env python3
"""Vendor the Kubernetes schemas of the pod fields ``spec.podTemplateOverrides`` may set.

Reads the strict JSON schemas that ship with ``kubernetes-validate`` (a test dependency; the
operator image does not carry its 100 MB of schemas) for one Kubernetes minor version, keeps the
definitions reachable from the override's field types, drops descriptions, and writes them to
``operator/dptrain/api/k8s_pod_schemas.json``. ``dptrain.api._pod_schemas`` validates overrides
against them and embeds them (made structural) in the CRD. Re-run after bumping the version,
then ``scripts/generate-crd.sh``; tests/test_pod_overrides.py fails on drift.

Usage: python scripts/vendor-pod-schemas.py [--check]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import kubernetes_validate

KUBERNETES_VERSION = "1.33.0"
ROOTS = (
    "Affinity",
    "Toleration",
    "Volume",
    "EnvVar",
    "EnvFromSource",
    "VolumeMount",
    "ResourceRequirements",
    "SecurityContext",
    "LocalObjectReference",
)
OUT = Path(__file__).resolve().parent.parent / "operator/dptrain/api/k8s_pod_schemas.json"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def _strip(node: object) -> object:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def vendored() -> dict[str, object]:
    """The vendored document (deterministic)."""
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    defs = json.loads(
        (base / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json").read_text()
    )["$defs"]
    # An ephemeral volume's claim template carries ObjectMeta; only labels and annotations of it
    # mean anything there (the API server ignores the rest), and its managedFields would drag in
    # free-form FieldsV1.
    defs[OBJECT_META] = {
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": {
            k: {"type": ["object", "null"], "additionalProperties": {"type": "string"}}
            for k in ("labels", "annotations")
        },
    }
    seen: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                name = ref.split("/")[-1]
                if name not in seen:
                    seen.add(name)
                    walk(defs[name])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for root in ROOTS:
        name = f"io.k8s.api.core.v1.{root}"
        seen.add(name)
        walk(defs[name])
    return {
        "source": f"kubernetes-validate {kubernetes_validate.__version__}, Kubernetes "
        f"v{KUBERNETES_VERSION} (strict), descriptions dropped",
        "$defs": {name: _strip(defs[name]) for name in sorted(seen)},
    }


def main() -> int:
    """Write (or with --check compare) the vendored schemas."""
    text = json.dumps(vendored(), indent=1, sort_keys=True) + "\n"
    if "--check" in sys.argv[1:]:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run scripts/vendor-pod-schemas.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
