"""A corpus of hostile DPTrainingJob manifests: each is rejected, naming the field.

The corpus lives in tests/data/bad-manifests/ (one file per case; the header line
`# expect-field: <path>` names the field the rejection must point at). Here each file goes
through what `kubectl apply` meets (the CRD's schema, strict) and what the operator checks
(`dptrain.api` parsing and semantic rules); the operator end-to-end tests post the same files.
The CLI's manifest parsing is fuzzed with hypothesis: any input gives InvalidJobError or a job.
"""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dptrain.api import InvalidJobError, load_manifests, parse_job, validate_job
from dptrain.api._crd import validating_schema

ROOT = Path(__file__).resolve().parents[1]
CORPUS = sorted((ROOT / "tests" / "data" / "bad-manifests").glob("*.yaml"))
VALIDATOR = jsonschema.Draft4Validator(validating_schema())


def expected_field(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# expect-field:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{path.name} has no expect-field header")


def api_error_fields(document: dict) -> list[str]:
    try:
        validate_job(parse_job(document))
    except InvalidJobError as error:
        return [e.field for e in error.errors]
    return []


def schema_error_fields(document: dict) -> list[str]:
    fields = []
    for error in VALIDATOR.iter_errors(document):
        where = ".".join(str(p) for p in error.absolute_path)
        if error.validator == "additionalProperties":
            extra = error.message.split("'")[1]
            where = f"{where}.{extra}" if where else extra
        fields.append(where)
    return fields


def test_the_corpus_has_at_least_forty_cases():
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_hostile_manifest_is_rejected_and_the_field_is_named(path):
    field = expected_field(path)
    [document] = list(load_manifests(path.read_text()))
    fields = api_error_fields(document)
    assert field in fields, f"the operator's checks named {fields}, expected {field}"
    schema_fields = schema_error_fields(document)
    if schema_fields:  # what the API server rejects, it rejects for the same field
        assert any(f == field or field.startswith(f) for f in schema_fields), schema_fields


def test_cli_validate_rejects_the_whole_corpus_without_a_traceback():
    out = subprocess.run([sys.executable, "-m", "dptrain.cli._main", "validate", "--json",
                          *map(str, CORPUS)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 3
    assert "Traceback" not in out.stderr
    report = json.loads(out.stdout)
    assert [f["valid"] for f in report["files"]] == [False] * len(CORPUS)


GOOD = yaml.safe_load(
    "apiVersion: dptrain.io/v1alpha1\nkind: DPTrainingJob\nmetadata: {name: fuzz}\n"
    "spec: {privacy: {epsilon: 2.0, delta: 1.0e-6}, data: {builtin: stdlib-docs},"
    " model: {preset: tiny}, training: {batchSize: 8, iterations: 10}}")
PATHS = [("spec", "privacy", "epsilon"), ("spec", "privacy", "delta"), ("spec", "data"),
         ("spec", "data", "sequenceLength"), ("spec", "training", "batchSize"),
         ("spec", "training"), ("metadata", "name"), ("spec",), ("spec", "compute", "flops"),
         ("spec", "model", "preset"), ("kind",), ("apiVersion",)]
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                     children, max_size=3),
    max_leaves=6)


def _set(document: dict, path: tuple[str, ...], value: object) -> dict:
    node = document
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value
    return document


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=VALUES)
def test_fuzzed_manifests_either_parse_or_raise_invalid_job_error(path, value):
    document = _set(json.loads(json.dumps(GOOD)), path, value)
    try:
        validate_job(parse_job(document))
    except InvalidJobError as error:
        assert error.errors and all(e.field for e in error.errors)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_fuzzed_yaml_text_never_crashes_the_loader(text):
    try:
        for document in load_manifests(text):
            with contextlib.suppress(InvalidJobError):
                parse_job(document)
    except InvalidJobError as error:
        assert error.errors
