"""Pure checks: the mechanism fingerprint, the trainer's ConfigMap, the authoritative ledger."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dptrain.api import PlanStatus, PrivacyLedgerStatus
from dptrain.operator import ChildState, Observed, decide
from dptrain.operator._ledger_record import (
    ANNOTATION_LEDGER,
    LedgerRecord,
    authoritative,
    merge_records,
    read_record,
)
from dptrain.operator._verification import (
    config_mismatches,
    expected_fingerprint,
    mechanism_mismatches,
)
from dptrain.privacy import round_up_to_float32

sys.path.insert(0, str(Path(__file__).parent))  # the decision tests' fake tools and helpers

PLAN = PlanStatus(
    model_preset="tiny", model_params=1000, batch_size=64, iterations=100,
    noise_multiplier=0.7000000001, noise_batch_ratio=0.01, sampling_rate=0.032,
    physical_batch_size=128, dataset_size=2000, sequence_length=64, clip_norm=1.0,
    learning_rate=1e-3, compute_flops=1.0, max_steps=31, epsilon_planned=2.0, accountant="rdp")


def honest(**changes):
    base = expected_fingerprint(PLAN, 1e-5, "sha256:abc")
    return base.model_copy(update=changes)


def test_an_honest_fingerprint_matches():
    assert mechanism_mismatches(PLAN, 1e-5, honest(), "sha256:abc") == []
    assert honest().noise_multiplier >= PLAN.noise_multiplier  # σ rounded up, never down


@pytest.mark.parametrize(("field", "value"), [
    ("sampling_rate", 0.0321), ("delta", 1e-4), ("dataset_size", 1999),
    ("physical_batch_size", 127), ("clip_norm", 2.0), ("accountant", "pld"),
    ("dataset_checksum", "sha256:other"),
])
def test_each_differing_field_is_named(field, value):
    problems = mechanism_mismatches(PLAN, 1e-5, honest(**{field: value}), "sha256:abc")
    camel = "".join(w.capitalize() if i else w for i, w in enumerate(field.split("_")))
    assert len(problems) == 1 and f"status.progress.mechanism.{camel}:" in problems[0]


def test_sigma_rounded_to_nearest_float32_below_the_plan_is_a_mismatch():
    nearest = float(np.float32(PLAN.noise_multiplier))
    assert nearest < PLAN.noise_multiplier  # round-to-nearest lowers this σ
    problems = mechanism_mismatches(PLAN, 1e-5, honest(noise_multiplier=nearest), None)
    assert len(problems) == 1 and "noiseMultiplier" in problems[0]
    assert round_up_to_float32(PLAN.noise_multiplier) == honest().noise_multiplier


def test_more_rows_than_planned_is_allowed_and_a_missing_fingerprint_is_not():
    assert mechanism_mismatches(PLAN, 1e-5, honest(physical_batch_size=130), None) == []
    assert "no mechanism fingerprint" in mechanism_mismatches(PLAN, 1e-5, None, None)[0]
    # Without a known checksum any checksum passes (the operator pins the first one).
    assert mechanism_mismatches(PLAN, 1e-5, honest(dataset_checksum="x"), None) == []


def test_config_differences_are_named_by_path():
    expected = {"spec": {"training": {"noiseMultiplier": 1.0}}, "status": {"plan": {"a": 1}}}
    observed = {"spec": {"training": {"noiseMultiplier": 0.5}}, "status": {"plan": {"a": 1}}}
    assert config_mismatches(expected, expected, True) == []
    problems = config_mismatches(expected, observed, True)
    assert problems == ["configMap.data.config.json: spec.training.noiseMultiplier"]
    assert any("immutable" in p for p in config_mismatches(expected, expected, False))
    assert config_mismatches(expected, None, True)


def test_the_record_wins_over_the_published_copy_and_counts_only_grow():
    record = LedgerRecord(ledger=PrivacyLedgerStatus(steps_charged=9, epsilon_spent=1.0,
                                                     epsilon_budget=2.0, delta=1e-5))
    lowered = record.ledger.model_copy(update={"steps_charged": 1})
    ledger, overwritten = authoritative(record, lowered)
    assert ledger == record.ledger and overwritten
    assert authoritative(record, record.ledger) == (record.ledger, False)
    assert authoritative(None, lowered) == (lowered, False)  # no record yet: upgrade path
    meta = {"annotations": {ANNOTATION_LEDGER: record.to_annotation()}}
    assert read_record(meta) == record
    assert read_record({"annotations": {ANNOTATION_LEDGER: "{not json"}}) is None
    assert merge_records(record.ledger, 3, 12, 5).steps_charged == 12
    assert merge_records(record.ledger, 3).steps_charged == 9


def test_decide_restores_an_overwritten_ledger_with_a_warning():
    from test_operator_decisions import FakeTools, body, merged, run
    from test_operator_decisions import honest as honest_status

    first = run(body())
    status = merged({}, first)
    record = first.ledger_annotation
    assert record is not None and json.loads(record)["ledger"]["stepsCharged"] == 0
    status["progress"] = {"stepsCharged": 6, "step": 6, "mechanism": honest_status(status)}
    b = body(status=status, applied=first.applied_spec)
    b["metadata"]["annotations"][ANNOTATION_LEDGER] = record
    charged = decide(b, Observed(workload=ChildState(name="job-train")),
                     dt.datetime(2026, 1, 1, tzinfo=dt.UTC), tools=FakeTools())
    status = merged(status, charged)
    assert status["privacy"]["stepsCharged"] == 6
    assert json.loads(charged.ledger_annotation)["ledger"]["stepsCharged"] == 6
    # The trainer lowers status.privacy; the annotation keeps 6.
    tampered = dict(status, privacy=dict(status["privacy"], stepsCharged=1))
    b = body(status=tampered, applied=first.applied_spec)
    b["metadata"]["annotations"][ANNOTATION_LEDGER] = charged.ledger_annotation
    again = decide(b, Observed(workload=ChildState(name="job-train")),
                   dt.datetime(2026, 1, 1, tzinfo=dt.UTC), tools=FakeTools())
    assert again.status["privacy"]["stepsCharged"] == 6
    assert [e.reason for e in again.events if e.type == "Warning"] == ["LedgerRestored"]


def test_a_report_before_any_charge_counts_as_started_and_observed_generation_follows():
    from test_operator_decisions import body, merged, run
    from test_operator_decisions import honest as honest_status

    first = run(body())
    status = merged({}, first)
    status["progress"] = {"stepsCharged": 3, "step": 3, "mechanism": honest_status(status)}
    edited = body(generation=2, status=status, applied=first.applied_spec,
                  training={"batchSize": 32})
    decision = run(edited, Observed(workload=ChildState(name="job-train")))
    new = merged(status, decision)
    refused = {c["type"]: c for c in new["conditions"]}["SpecAccepted"]
    assert refused["reason"] == "SpecChangeRefused" and "spec.training.batchSize" in \
        refused["message"]
    assert new["plan"] == status["plan"] and new["privacy"]["stepsCharged"] == 3
    assert new["observedGeneration"] == 2
    assert "workload" not in decision.delete
