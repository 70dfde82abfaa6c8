"""The Kubernetes schemas of the pod fields that ``spec.podTemplateOverrides`` may set.

``k8s_pod_schemas.json`` holds the upstream OpenAPI definitions (strict JSON Schema, from
``kubernetes-validate``; see ``scripts/vendor-pod-schemas.py``) of Affinity, Toleration,
Volume, EnvVar, EnvFromSource, VolumeMount, ResourceRequirements, SecurityContext and
LocalObjectReference, and of everything they refer to. Two uses:

- :class:`KubernetesType` makes a pydantic type of one of them: validated with ``jsonschema``
  against the upstream definition (unknown fields and wrong types refused, naming the path
  inside the value), and carrying in the CRD the same definition made *structural*
  (:func:`structural`), so the API server checks it too.
- The operator never re-interprets these values: they are copied into the pod as given.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

_FILE = Path(__file__).with_name("k8s_pod_schemas.json")
PREFIX = "io.k8s.api.core.v1."


@functools.cache
def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(_FILE.read_text(encoding="utf-8"))
    return document


def source() -> str:
    """Where the vendored schemas come from (package and Kubernetes version)."""
    return str(_document()["source"])


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": _document()["$defs"],
        "$ref": f"#/$defs/{PREFIX}{name}",
    }
    return jsonschema.Draft202012Validator(schema)


def _path(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        where = _path(error)
        names = ", ".join(f"{where}.{e}" if where else e for e in extra)
        return f"{names}: is not a known field"
    where = _path(error)
    text = error.message.replace(", 'null'", "")
    if error.validator == "oneOf":  # a Quantity or an IntOrString
        text = f"{error.instance!r} must be a string or a number"
    return f"{where}: {text}" if where else text


def check(name: str, value: Any) -> list[str]:
    """Problems of ``value`` as the Kubernetes type ``name`` (e.g. ``"Affinity"``), if any."""
    errors = sorted(_validator(name).iter_errors(value), key=lambda e: list(e.absolute_path))
    return [_message(e) for e in errors]


def _validated(name: str) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        problems = check(name, value)
        if problems:
            raise ValueError(f"is not a valid Kubernetes {name}: " + "; ".join(problems[:5]))
        return value

    return validate


def _structural_node(node: Any, defs: dict[str, Any], depth: int = 0) -> Any:
    """One definition as a CRD's structural schema: refs inlined, OpenAPI v3 spellings."""
    if depth > 40:
        raise ValueError("recursive Kubernetes definition cannot be inlined in the CRD")
    if isinstance(node, list):
        return [_structural_node(v, defs, depth) for v in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        return _structural_node(
            {**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs, depth + 1
        )
    if "oneOf" in node:
        # Quantity and IntOrString: the API server's own spelling of "string or number".
        return {"x-kubernetes-int-or-string": True}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "discriminator":
            continue  # list/map/patch hints and unions: not part of a structural schema
        if key == "additionalProperties" and value is False:
            continue  # the API server prunes or (strict field validation) refuses unknowns
        if key == "type" and isinstance(value, list):
            kinds = [v for v in value if v != "null"]
            out["type"] = kinds[0]
        elif key == "properties":
            out["properties"] = {k: _structural_node(v, defs, depth) for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _structural_node(value, defs, depth)
        else:
            out[key] = copy.deepcopy(value)
    return out


@functools.cache
def _structural_cached(name: str) -> str:
    defs = _document()["$defs"]
    return json.dumps(_structural_node({"$ref": f"#/$defs/{PREFIX}{name}"}, defs))


def structural(name: str) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of the Kubernetes type ``name`` (for the CRD)."""
    schema: dict[str, Any] = json.loads(_structural_cached(name))
    return schema


@dataclasses.dataclass(frozen=True)
class KubernetesType:
    """Marks a ``dict[str, Any]`` as the Kubernetes type ``name``.

    ``Annotated[dict[str, Any], KubernetesType("Affinity", "...")]`` is validated against the
    upstream schema and carries its structural form in the CRD.
    """

    name: str
    description: str

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(_validated(self.name), handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        return {**structural(self.name), "description": self.description}
