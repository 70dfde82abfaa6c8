"""Generate the DPTrainingJob CRD from the pydantic models (the single source of truth).

pydantic emits JSON Schema (2020-12); a Kubernetes CRD wants a *structural* OpenAPI v3 schema:
no ``$ref``, ``nullable`` instead of ``anyOf [X, null]``, ``enum`` instead of ``const``,
boolean ``exclusiveMinimum``, no ``additionalProperties: false`` (the API server prunes or,
with strict field validation, rejects unknown fields). Cross-field rules that CEL can state are
added as ``x-kubernetes-validations``; ``_validation.py`` states the same rules in Python.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from dptrain.api._base import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from dptrain.api._dataset import (
    DATASET_KIND,
    DATASET_PLURAL,
    DATASET_SHORT_NAMES,
    DATASET_SINGULAR,
    DPDataset,
)
from dptrain.api._job import DPTrainingJob

JsonObject = dict[str, Any]

# CEL rules by schema path (properties only), mirroring _validation.semantic_errors.
_CEL_RULES: dict[tuple[str, ...], list[JsonObject]] = {
    ("spec", "data"): [
        {"rule": "(has(self.path) ? 1 : 0) + (has(self.builtin) ? 1 : 0) + "
                 "(has(self.uri) ? 1 : 0) == 1",
         "message": "must set exactly one of path, builtin and uri"},
        {"rule": "!has(self.uri) || !has(self.volume)",
         "message": "volume is exclusive with uri (object storage needs no volume)"},
        {"rule": "!has(self.secretRef) || has(self.uri)",
         "message": "secretRef is only used with uri"},
        {"rule": "!has(self.volume) || has(self.path)",
         "message": "path is required when volume is set"},
        {"rule": "self.tokenizer != 'sentencepiece' || has(self.tokenizerModel)",
         "message": "tokenizerModel is required when tokenizer is sentencepiece"},
    ],
    ("spec", "training"): [
        {"rule": "!has(self.physicalBatchSize) || !has(self.batchSize) || "
                 "self.physicalBatchSize >= self.batchSize",
         "message": "physicalBatchSize must be >= batchSize (the expected batch)"},
        {"rule": "!has(self.warmupSteps) || !has(self.iterations) || "
                 "self.warmupSteps < self.iterations",
         "message": "warmupSteps must be < iterations"},
    ],
    ("spec", "compute"): [
        {"rule": "!has(self.tpuTopology) || self.accelerator.startsWith('tpu-')",
         "message": "tpuTopology is only valid with a TPU accelerator"},
    ],
    ("spec", "checkpoint"): [
        {"rule": "!has(self.volume) || has(self.path)",
         "message": "path is required when volume is set"},
        {"rule": "!has(self.uri) || !has(self.volume)",
         "message": "uri is exclusive with volume (object storage needs no volume)"},
        {"rule": "!has(self.secretRef) || has(self.uri)",
         "message": "secretRef is only used with uri"},
    ],
    ("spec", "evaluation"): [
        {"rule": "has(self.data) != has(self.holdoutFraction)",
         "message": "must set exactly one of data and holdoutFraction"},
    ],
    ("spec", "evaluation", "data"): [
        {"rule": "has(self.path) != has(self.builtin)",
         "message": "must set exactly one of path and builtin"},
        {"rule": "!has(self.volume) || has(self.path)",
         "message": "path is required when volume is set"},
    ],
}


def _resolve(node: Any, defs: JsonObject) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return _resolve({**target, **extra}, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def _structural(node: JsonObject) -> JsonObject:
    node = dict(node)
    node.pop("title", None)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {len(options)} types in a CRD")
        # pydantic's `X | None` is `anyOf [X, null]`; OpenAPI says `nullable: true`.
        node = {**options[0], **node, "nullable": True}
        node.pop("title", None)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound in ("Minimum", "Maximum"):
        key = f"exclusive{bound}"
        if key in node and not isinstance(node[key], bool):
            node[bound.lower()] = node[key]
            node[key] = True
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if "default" in node:
        if node["default"] is None:
            del node["default"]
        else:
            node["default"] = _drop_none(node["default"])
    if "properties" in node:
        node["properties"] = {k: _structural(v) for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        node["items"] = _structural(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _structural(node["additionalProperties"])
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    if "properties" in node and "type" not in node:
        node["type"] = "object"
    return node


# Go's YAML and JSON encoders (helm's ``toYaml``, kustomize) write a float64 in exponent form
# (``1e+30``) outside [1e-4, 1e21); YAML 1.1 readers (PyYAML, kubernetes-validate's CLI) then read
# ``1e+30`` as a string. Bounds inside the range are written as plain numbers; the others become
# CEL rules (a string survives every tool), which the API server enforces the same way.
_PLAIN_FLOAT_RANGE = (1e-4, 1e21)


def _portable_number(value: float) -> int | float:
    """``value`` as every tool writes it the same way: integral floats as ints."""
    if isinstance(value, float) and value.is_integer() and abs(value) < _PLAIN_FLOAT_RANGE[1]:
        return int(value)
    return value


def _plain(value: float) -> bool:
    low, high = _PLAIN_FLOAT_RANGE
    return isinstance(value, int) or value == 0 or low <= abs(value) < high


def _portable_bounds(node: Any) -> Any:
    """Rewrite ``minimum``/``maximum`` so that YAML 1.1 and YAML 1.2 tools read numbers."""
    if isinstance(node, list):
        return [_portable_bounds(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _portable_bounds(v) for k, v in node.items()}
    for bound, cmp, words in (("minimum", ">", "greater than"), ("maximum", "<", "less than")):
        value = out.get(bound)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        value = _portable_number(value)
        if _plain(value):
            out[bound] = value
            continue
        exclusive = bool(out.pop("exclusive" + bound.capitalize(), False))
        del out[bound]
        literal = repr(float(value))
        op = cmp if exclusive else cmp + "="
        rule = {"rule": f"self {op} {literal}",
                "message": f"must be {words}{'' if exclusive else ' or equal to'} {literal}"}
        out["x-kubernetes-validations"] = [*out.get("x-kubernetes-validations", []), rule]
    return out


def crd_schema(model: type[BaseModel] = DPTrainingJob) -> JsonObject:
    """The structural ``openAPIV3Schema`` of DPTrainingJob (or of DPDataset)."""
    schema: JsonObject = _portable_bounds(_numeric_schema(model))
    return schema


def _numeric_schema(model: type[BaseModel]) -> JsonObject:
    """The structural schema with every numeric bound as a JSON-Schema keyword."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _structural(_resolve(raw, defs))
    props = schema["properties"]
    # The API server owns metadata, apiVersion and kind; a CRD may not constrain them further.
    props["metadata"] = {"type": "object"}
    props["apiVersion"] = {"type": "string"}
    props["kind"] = {"type": "string"}
    schema["required"] = ["spec"]
    schema["description"] = ("A differentially private language-model training job: a privacy "
                             "budget (ε, δ), a dataset and a compute budget.")
    if model is DPDataset:
        schema["description"] = ("A dataset and the privacy budget (ε, δ) shared by every "
                                 "DPTrainingJob that trains on it (spec.data.datasetRef).")
    status = props["status"]
    status.pop("nullable", None)
    status.pop("default", None)
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions.pop("default", None)
    rules_by_path = _CEL_RULES if model is DPTrainingJob else _DATASET_CEL_RULES
    for path, rules in rules_by_path.items():
        node = schema
        for key in path:
            node = node["properties"][key]
        node["x-kubernetes-validations"] = rules
    return schema


_DATASET_CEL_RULES: dict[tuple[str, ...], list[JsonObject]] = {
    ("spec",): [{"rule": "has(self.data) != has(self.checksum)",
                 "message": "must set exactly one of data and checksum"}],
    ("spec", "data"): [*_CEL_RULES[("spec", "data")],
                       {"rule": "!has(self.datasetRef)",
                        "message": "a dataset cannot refer to a dataset"}],
}

_DATASET_PRINTER_COLUMNS: list[JsonObject] = [
    {"name": "Spent", "type": "number", "jsonPath": ".status.epsilonSpent",
     "description": "composed ε of the steps charged"},
    {"name": "Reserved", "type": "number", "jsonPath": ".status.epsilonReserved",
     "description": "composed ε admitted but not yet run"},
    {"name": "Budget", "type": "number", "jsonPath": ".spec.privacy.epsilon",
     "description": "ε budget of the dataset"},
    {"name": "Jobs", "type": "integer", "jsonPath": ".status.jobs",
     "description": "jobs charged to the dataset"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def dataset_crd_manifest() -> JsonObject:
    """The DPDataset CustomResourceDefinition (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{DATASET_PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "dptrain", "app.kubernetes.io/part-of": "dptrain"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": DATASET_KIND,
                "listKind": f"{DATASET_KIND}List",
                "plural": DATASET_PLURAL,
                "singular": DATASET_SINGULAR,
                "shortNames": list(DATASET_SHORT_NAMES),
                "categories": ["dptrain"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": _DATASET_PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": crd_schema(DPDataset)},
            }],
        },
    }


def dataset_crd_yaml() -> str:
    """The DPDataset CRD as YAML, exactly as committed in ``manifests/crd-dpdataset.yaml``."""
    header = ("# Generated by `dptrain crd --kind DPDataset` from dptrain.api; "
              "do not edit by hand.\n")
    return header + yaml.safe_dump(dataset_crd_manifest(), sort_keys=False, width=100,
                                   allow_unicode=True)


_PRINTER_COLUMNS: list[JsonObject] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Epsilon", "type": "number", "jsonPath": ".status.privacy.epsilonSpent",
     "description": "ε spent so far"},
    {"name": "Budget", "type": "number", "jsonPath": ".spec.privacy.epsilon",
     "description": "ε budget"},
    {"name": "Steps", "type": "integer", "jsonPath": ".status.privacy.stepsCharged",
     "description": "DP-SGD steps charged to the ledger"},
    {"name": "Model", "type": "string", "jsonPath": ".status.plan.modelPreset", "priority": 1},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "priority": 1,
     "description": "DP estimate of the training loss (released under the job's ε)"},
    {"name": "Eval-Loss", "type": "number", "jsonPath": ".status.evaluation.loss", "priority": 1,
     "description": "held-out loss (not covered by ε: computed on data not trained on)"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_manifest() -> JsonObject:
    """The CustomResourceDefinition object (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "dptrain", "app.kubernetes.io/part-of": "dptrain"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["all", "dptrain"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": _PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": crd_schema()},
            }],
        },
    }


def crd_yaml() -> str:
    """The CRD as YAML, exactly as committed in ``manifests/crd.yaml``."""
    header = "# Generated by `dptrain crd` from dptrain.api; do not edit by hand.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=100,
                                   allow_unicode=True)


def validating_schema(strict: bool = True, model: type[BaseModel] = DPTrainingJob
                      ) -> JsonObject:
    """The CRD schema as a JSON-Schema draft-4 document, for jsonschema validation.

    Mirrors the API server's checks: OpenAPI ``nullable`` becomes a ``null`` type, and with
    ``strict`` unknown fields are errors (``kubectl --validate=strict``, the default since
    Kubernetes 1.27) instead of being pruned. CEL rules are not evaluated here; the same rules
    run in :func:`dptrain.api.semantic_errors`, except numeric bounds, which stay JSON-Schema
    keywords here even where the CRD states them as CEL rules.
    """

    def convert(node: Any, *, is_metadata: bool = False) -> Any:
        if isinstance(node, list):
            return [convert(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: convert(v, is_metadata=(k == "metadata")) if k == "properties" else convert(v)
               for k, v in node.items() if not k.startswith("x-kubernetes")}
        if "properties" in node:
            out["properties"] = {k: convert(v, is_metadata=(k == "metadata"))
                                 for k, v in node["properties"].items()}
        if out.pop("nullable", False) and "type" in out:
            out["type"] = [out["type"], "null"]
        if strict and node.get("type") == "object" and "properties" in node \
                and "additionalProperties" not in node and not is_metadata:
            out["additionalProperties"] = False
        return out

    # Numeric bounds that the CRD states as CEL rules (see _portable_bounds) stay keywords here.
    schema: JsonObject = convert(_numeric_schema(model))
    schema["$schema"] = "http://json-schema.org/draft-04/schema#"
    return schema
