"""Checkpoints store the plan as it is; resuming compares it, old flat records included."""

from __future__ import annotations

from dptrain.trainer._resume import same_run as _same_run

PLAN = {"modelPreset": "tiny", "batchSize": 8, "iterations": 12, "noiseMultiplier": 1.0,
        "samplingRate": 0.02, "physicalBatchSize": 32, "datasetSize": 400, "clipNorm": 1.0,
        "learningRate": 0.01, "maxSteps": 12, "epsilonPlanned": 3.0, "computeFlops": 1e9,
        "accountant": "rdp", "specGeneration": 1}
TRAINING = {"optimizer": "adamw", "epsilon_budget": 8.0, "delta": 1e-5}


def meta(plan=None, **training):
    return {"plan": {**PLAN, **(plan or {})}, "training": {**TRAINING, **training}}


def test_budget_and_iterations_may_change_on_resume():
    changed = meta({"iterations": 20, "maxSteps": 18, "epsilonPlanned": 4.0,
                    "computeFlops": 2e9, "specGeneration": 3}, epsilon_budget=12.0)
    assert _same_run(changed, meta())


def test_anything_that_changes_the_mechanism_or_the_training_refuses_the_resume():
    for plan in ({"noiseMultiplier": 1.1}, {"batchSize": 9}, {"physicalBatchSize": 40},
                 {"clipNorm": 2.0}, {"learningRate": 0.02}, {"accountant": "pld"},
                 {"samplingRate": 0.03}, {"datasetSize": 401}):
        assert not _same_run(meta(plan), meta()), plan
    assert not _same_run(meta(optimizer="sgd"), meta())
    assert not _same_run(meta(delta=1e-6), meta())


def test_a_checkpoint_with_the_older_flat_plan_record_still_resumes():
    legacy = {"plan": {"batch_size": 8, "iterations": 10, "noise_multiplier": 1.0,
                       "clip_norm": 1.0, "physical_batch_size": 32, "learning_rate": 0.01,
                       "optimizer": "adamw", "epsilon_budget": 5.0, "delta": 1e-5,
                       "accountant": "rdp"}}
    assert _same_run(legacy, meta())
    legacy["plan"]["noise_multiplier"] = 0.9
    assert not _same_run(legacy, meta())
