"""spec.evaluation and instruction data: accepted shapes, and errors naming the field and rule."""

import jsonschema
import pytest

from dptrain.api import InvalidJobError, parse_job, validate_job
from dptrain.api._crd import validating_schema


def _job(data=None, evaluation=None):
    spec = {"privacy": {"epsilon": 2.0, "delta": 1e-6},
            "data": data or {"path": "docs.jsonl", "sequenceLength": 128},
            "model": {"preset": "tiny"}, "training": {"batchSize": 32, "iterations": 100}}
    if evaluation is not None:
        spec["evaluation"] = evaluation
    return {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob",
            "metadata": {"name": "job"}, "spec": spec}


def _errors(manifest):
    with pytest.raises(InvalidJobError) as info:
        validate_job(parse_job(manifest))
    return {e.field: e.rule for e in info.value.errors}


@pytest.mark.parametrize("evaluation", [
    {"holdoutFraction": 0.1, "intervalSteps": 10, "maxRows": 64},
    {"data": {"path": "eval.jsonl", "volume": {"claimName": "eval"}}, "intervalSteps": 5},
    {"data": {"builtin": "stdlib-docs"}},
])
def test_good_evaluations_pass_python_and_the_crd(evaluation):
    manifest = _job(evaluation=evaluation)
    job = parse_job(manifest)
    validate_job(job)
    assert job.spec.evaluation is not None
    errors = list(jsonschema.Draft4Validator(validating_schema()).iter_errors(manifest))
    assert errors == []


@pytest.mark.parametrize(("evaluation", "field", "rule_part"), [
    ({}, "spec.evaluation", "exactly one of data and holdoutFraction"),
    ({"holdoutFraction": 0.1, "data": {"builtin": "stdlib-docs"}}, "spec.evaluation",
     "exactly one of data and holdoutFraction"),
    ({"data": {"path": "e.jsonl", "tokenizer": "sentencepiece"}}, "spec.evaluation.data.tokenizer",
     "training data's tokenizer"),
    ({"data": {"path": "e.jsonl", "sequenceLength": 64}}, "spec.evaluation.data.sequenceLength",
     "sequence length"),
    ({"data": {"path": "e", "format": "prepared"}}, "spec.evaluation.data.format",
     "must be jsonl, text or instruction"),
    ({"data": {"volume": {"claimName": "x"}, "builtin": "stdlib-docs"}},
     "spec.evaluation.data.path", "required when volume is set"),
])
def test_bad_evaluations_name_the_field(evaluation, field, rule_part):
    errors = _errors(_job(evaluation=evaluation))
    assert field in errors and rule_part in errors[field]


def test_holdout_fraction_is_bounded_and_needs_documents():
    with pytest.raises(Exception, match="holdoutFraction"):
        parse_job(_job(evaluation={"holdoutFraction": 0.9}))
    errors = _errors(_job(data={"path": "prepared", "format": "prepared"},
                          evaluation={"holdoutFraction": 0.2}))
    assert "needs documents to split" in errors["spec.evaluation.holdoutFraction"]


def test_instruction_format_and_field_names():
    job = parse_job(_job(data={"path": "sft.jsonl", "format": "instruction",
                               "promptField": "question", "responseField": "answer"}))
    validate_job(job)
    assert (job.spec.data.prompt_field, job.spec.data.response_field) == ("question", "answer")
    errors = _errors(_job(data={"builtin": "stdlib-docs", "format": "instruction"}))
    assert "prompt/response" in errors["spec.data.format"]
