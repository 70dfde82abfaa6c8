"""The CRD is generated from the models, structural, committed, and validates the samples."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from dptrain.api import crd_manifest, crd_schema, crd_yaml, load_manifests
from dptrain.api._crd import validating_schema

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))


def _walk(node, path=""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}[{index}]")


def test_committed_crd_matches_the_generated_one():
    committed = (ROOT / "manifests" / "crd.yaml").read_text()
    assert committed == crd_yaml(), "drifted: run `dptrain crd > manifests/crd.yaml`"


def test_crd_schema_is_structural():
    for path, node in _walk(crd_schema()):
        for forbidden in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title"):
            assert forbidden not in node, f"{forbidden} at {path}"
        assert node.get("additionalProperties") is not False, path
        if "properties" in node:
            assert node.get("type") == "object", path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node:
                assert isinstance(node[key], bool), path


def test_crd_declares_status_subresource_columns_and_short_name():
    crd = crd_manifest()
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Epsilon"] == ".status.privacy.epsilonSpent"
    assert columns["Budget"] == ".spec.privacy.epsilon"
    assert columns["Steps"] == ".status.privacy.stepsCharged"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert crd["spec"]["names"]["shortNames"] == ["dptj"]
    assert crd["metadata"]["name"] == "dptrainingjobs.dptrain.io"


def test_crd_patterns_are_re2_compatible():
    # The API server compiles patterns with Go's RE2: no look-arounds or back-references.
    for path, node in _walk(crd_schema()):
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            for construct in ("(?=", "(?!", "(?<=", "(?<!", "\\1"):
                assert construct not in pattern, path


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_every_sample_validates_against_the_crd_and_semantics(sample):
    from dptrain.api import DPDataset, parse_job, validate_job

    validators = {"DPTrainingJob": jsonschema.Draft4Validator(validating_schema()),
                  "DPDataset": jsonschema.Draft4Validator(validating_schema(model=DPDataset))}
    jobs = 0
    for document in load_manifests(sample.read_text()):
        errors = sorted(validators[document["kind"]].iter_errors(document), key=str)
        assert not errors, [e.message for e in errors]
        if document["kind"] == "DPTrainingJob":
            validate_job(parse_job(document))  # semantic rules
            jobs += 1
        else:
            DPDataset.model_validate(document)
    assert jobs >= 1


def test_samples_cover_cpu_gpu_and_multihost_tpu():
    accelerators = set()
    for sample in SAMPLES:
        for document in load_manifests(sample.read_text()):
            if document["kind"] != "DPTrainingJob":
                continue
            accelerators.add(document["spec"].get("compute", {}).get("accelerator", "cpu"))
    assert {"cpu", "nvidia-h100-80gb", "tpu-v6e"} <= accelerators
    assert (ROOT / "manifests" / "samples" / "tiny-cpu.yaml").exists()


def test_strict_schema_rejects_unknown_fields_and_wrong_types():
    validator = jsonschema.Draft4Validator(validating_schema())
    job = yaml.safe_load((ROOT / "manifests" / "samples" / "gpu-h100.yaml").read_text())
    job["spec"]["privacy"]["epsilonn"] = 3
    job["spec"]["data"]["sequenceLength"] = "long"
    messages = " ".join(e.message for e in validator.iter_errors(job))
    assert "epsilonn" in messages
    assert "'long' is not of type 'integer'" in messages


def test_crd_json_output_is_the_same_object():
    assert json.loads(json.dumps(crd_manifest())) == yaml.safe_load(crd_yaml())


def test_bounds_go_tools_would_write_as_1e_plus_30_are_cel_rules_and_still_enforced():
    flops = crd_schema()["properties"]["spec"]["properties"]["compute"]["properties"]["flops"]
    assert "maximum" not in flops and flops["minimum"] == 0 and flops["exclusiveMinimum"] is True
    assert flops["x-kubernetes-validations"] == [
        {"rule": "self <= 1e+30", "message": "must be less than or equal to 1e+30"}]
    hours = crd_schema()["properties"]["spec"]["properties"]["compute"]["properties"][
        "acceleratorHours"]
    assert hours["maximum"] == 10_000_000 and isinstance(hours["maximum"], int)
    # The emulator's validator (what the API server enforces, CEL included) still has the bound.
    validator = jsonschema.Draft4Validator(validating_schema())
    job = yaml.safe_load((ROOT / "manifests" / "samples" / "gpu-h100.yaml").read_text())
    job["spec"].setdefault("compute", {})["flops"] = 2e30
    assert any(list(e.absolute_path)[-1] == "flops" for e in validator.iter_errors(job))
    job["spec"]["compute"]["flops"] = 1e30
    assert not any(list(e.absolute_path)[-1:] == ["flops"] for e in validator.iter_errors(job))
