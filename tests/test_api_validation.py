"""Bad manifests get one error per problem that names the field and the rule."""

import pytest

from dptrain.api import InvalidJobError, load_job, load_manifests, parse_job, validate_job


def _job(**spec_overrides):
    spec = {
        "privacy": {"epsilon": 2.0, "delta": 1e-6},
        "data": {"builtin": "stdlib-docs", "sequenceLength": 128},
        "model": {"preset": "tiny"},
        "training": {"batchSize": 32, "iterations": 100},
    }
    for key, value in spec_overrides.items():
        section, _, field = key.partition("__")
        if field:
            spec.setdefault(section, {})[field] = value
        else:
            spec[section] = value
    return {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob",
            "metadata": {"name": "job"}, "spec": spec}


def _fields(manifest):
    with pytest.raises(InvalidJobError) as info:
        validate_job(parse_job(manifest))
    return {e.field: e.rule for e in info.value.errors}


def test_a_good_manifest_passes():
    job = parse_job(_job())
    validate_job(job)
    assert job.spec.privacy.accountant == "pld"
    assert job.spec.training.clip_norm == 1.0


@pytest.mark.parametrize(("override", "field", "rule_part"), [
    ({"privacy__epsilon": -1}, "spec.privacy.epsilon", "must be > 0"),
    ({"privacy__epsilon": 0}, "spec.privacy.epsilon", "must be > 0"),
    ({"privacy__delta": 1.0}, "spec.privacy.delta", "must be < 1"),
    ({"privacy__delta": "NaN"}, "spec.privacy.delta", "must be a number"),
    ({"privacy__delta": float("nan")}, "spec.privacy.delta", "finite number"),
    ({"privacy__epsilon": True}, "spec.privacy.epsilon", "must be a number"),
    ({"training__iterations": 2.5}, "spec.training.iterations", "must be an integer"),
    ({"privacy__epsilon": float("inf")}, "spec.privacy.epsilon", "finite number"),
    ({"privacy__accountant": "moments"}, "spec.privacy.accountant", "must be one of"),
    ({"privacy__epsilonn": 1}, "spec.privacy.epsilonn", "is not a known field"),
    ({"data__sequenceLength": 8}, "spec.data.sequenceLength", "must be >= 16"),
    ({"training__batchSize": 0}, "spec.training.batchSize", "must be >= 1"),
    ({"data__path": "../../etc/passwd", "data__builtin": None}, "spec.data.path", "'..'"),
])
def test_structural_errors_name_field_and_rule(override, field, rule_part):
    manifest = _job(**override)
    manifest["spec"]["data"] = {k: v for k, v in manifest["spec"]["data"].items() if v is not None}
    fields = _fields(manifest)
    assert field in fields, fields
    assert rule_part in fields[field]


@pytest.mark.parametrize(("override", "field", "rule_part"), [
    ({"data__path": "docs.jsonl"}, "spec.data", "exactly one of path, builtin and uri"),
    ({"data__numSequences": 100, "privacy__delta": 0.05}, "spec.privacy.delta", "below 1/N"),
    ({"training__physicalBatchSize": 16}, "spec.training.physicalBatchSize",
     ">= training.batchSize"),
    ({"training__warmupSteps": 100}, "spec.training.warmupSteps", "< training.iterations"),
    ({"model": {}}, "spec.compute", "must set flops or acceleratorHours"),
    ({"compute__tpuTopology": "4x4"}, "spec.compute.tpuTopology", "only valid with a TPU"),
    ({"data__tokenizer": "sentencepiece"}, "spec.data.tokenizerModel", "required"),
])
def test_semantic_errors_name_field_and_rule(override, field, rule_part):
    fields = _fields(_job(**override))
    assert field in fields, fields
    assert rule_part in fields[field]


def test_all_problems_are_reported_at_once():
    manifest = _job(privacy__epsilon=-1, training__batchSize=-3)
    assert {"spec.privacy.epsilon", "spec.training.batchSize"} <= set(_fields(manifest))


def test_yaml_scientific_notation_is_a_number_like_kubectl_reads_it(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("""
apiVersion: dptrain.io/v1alpha1
kind: DPTrainingJob
metadata: {name: sci}
spec:
  privacy: {epsilon: 2, delta: 1e-6}
  data: {builtin: stdlib-docs}
  model: {preset: tiny}
  training: {batchSize: 8, iterations: 10}
""")
    assert load_job(path).spec.privacy.delta == pytest.approx(1e-6)


def test_metadata_name_must_be_a_dns_label():
    manifest = _job()
    manifest["metadata"]["name"] = "Not_A_Label"
    with pytest.raises(InvalidJobError) as info:
        parse_job(manifest)
    assert info.value.errors[0].field == "metadata.name"


def test_non_mapping_documents_and_bad_yaml_are_errors():
    with pytest.raises(InvalidJobError, match="must be a mapping"):
        list(load_manifests("- a\n- b\n"))
    with pytest.raises(InvalidJobError, match="valid YAML"):
        list(load_manifests("a: [1, 2\n"))
