"""Reading DPTrainingJob manifests: YAML with Kubernetes' number rules, errors per field."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pydantic
import yaml

from dptrain.api._errors import FieldError, InvalidJobError, short_repr
from dptrain.api._job import DPTrainingJob

MAX_MANIFEST_BYTES = 1_000_000  # the API server's request limit is ~1.5 MiB; be stricter


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float, as Kubernetes (YAML 1.2) does.

    PyYAML follows YAML 1.1, where a float needs a dot: `delta: 1e-5` would be the *string*
    "1e-5" — a schema error here but a number for `kubectl apply`.
    """


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_manifests(text: str) -> Iterator[dict[str, Any]]:
    """Parse a (multi-document) YAML or JSON text into mappings, skipping empty documents.

    Raises:
        InvalidJobError: if the text is not YAML or a document is not a mapping.
    """
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise InvalidJobError([FieldError("<file>", f"must be at most {MAX_MANIFEST_BYTES} bytes")])
    try:
        documents = list(yaml.load_all(text, Loader=_Yaml12Loader))
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else "invalid YAML"
        raise InvalidJobError([FieldError("<file>", f"must be valid YAML: {first_line}")]) from None
    for index, document in enumerate(documents):
        if document is None:
            continue
        if not isinstance(document, Mapping):
            raise InvalidJobError([FieldError(f"<document {index}>", "must be a mapping",
                                              short_repr(document))])
        yield dict(document)


def _location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in {"str", "int", "float", "bool"} or "[" in str(item):
            continue  # pydantic's union-member tags, not fields
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "<root>"


def _rule(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind == "missing":
        return "is required"
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
              "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()), "?")
        return f"must be {op} {bound}"
    if kind in {"float_type", "float_parsing"}:
        return "must be a number"
    if kind in {"int_type", "int_parsing", "int_from_float"}:
        return "must be an integer"
    if kind in {"bool_type", "bool_parsing"}:
        return "must be a boolean"
    if kind in {"string_type"}:
        return "must be a string"
    if kind in {"model_type", "dict_type", "model_attributes_type"}:
        return "must be an object"
    if kind == "finite_number":
        return "must be a finite number (no NaN or infinity)"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "value_error":  # our validators' own words, which name sub-fields and values
        return str(error["msg"]).removeprefix("Value error, ").rstrip(".")
    return str(error["msg"]).lower().rstrip(".")


def errors_from_pydantic(error: pydantic.ValidationError, prefix: str = "") -> list[FieldError]:
    """Turn pydantic's errors into FieldErrors with camelCase dotted paths."""
    out: list[FieldError] = []
    for item in error.errors(include_url=False):
        where = _location(tuple(item["loc"]))
        field = f"{prefix}.{where}" if prefix and where != "<root>" else (prefix or where)
        value = None if item["type"] == "missing" else short_repr(item.get("input"))
        out.append(FieldError(field, _rule(item), value))
    return out


def parse_job(manifest: Mapping[str, Any]) -> DPTrainingJob:
    """Validate a manifest mapping into a :class:`DPTrainingJob` (structure and types only).

    Raises:
        InvalidJobError: one FieldError per problem.
    """
    try:
        return DPTrainingJob.model_validate(dict(manifest))
    except pydantic.ValidationError as error:
        raise InvalidJobError(errors_from_pydantic(error)) from None


def load_job(path: str | Path) -> DPTrainingJob:
    """Read the single DPTrainingJob in a YAML/JSON file (structure and semantics).

    Raises:
        InvalidJobError: on unreadable files, bad YAML, or any broken rule.
        FileNotFoundError: if the file does not exist.
    """
    from dptrain.api._validation import validate_job  # a sibling; kept lazy to avoid a cycle

    text = Path(path).read_text(encoding="utf-8")
    documents = [d for d in load_manifests(text) if d.get("kind") in (None, "DPTrainingJob")]
    if len(documents) != 1:
        raise InvalidJobError([FieldError(str(path), "must hold exactly one DPTrainingJob",
                                          str(len(documents)))])
    job = parse_job(documents[0])
    validate_job(job)
    return job
