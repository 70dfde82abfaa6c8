"""`dptrain run --dataset-ledger PATH`: the dataset budget across local runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from dptrain.api import DPDatasetSpec, DPTrainingJobSpec, PlanStatus
from dptrain.cli import _dataset_ledger

PLAN = PlanStatus(
    model_preset="micro", model_params=1, batch_size=8, iterations=20, noise_multiplier=1.0,
    noise_batch_ratio=0.1, sampling_rate=8 / 300, physical_batch_size=32, dataset_size=300,
    sequence_length=16, clip_norm=1.0, learning_rate=1e-2, compute_flops=1.0, max_steps=20,
    epsilon_planned=1.0, accountant="rdp")


def dataset_spec(epsilon: float) -> DPDatasetSpec:
    return DPDatasetSpec.model_validate({"privacy": {"epsilon": epsilon, "delta": 1e-5,
                                                     "accountant": "rdp"},
                                         "checksum": "sha256:docs"})


def job_spec() -> DPTrainingJobSpec:
    return DPTrainingJobSpec.model_validate({
        "privacy": {"epsilon": 5.0, "delta": 1e-5, "accountant": "rdp"},
        "data": {"builtin": "stdlib-docs", "datasetRef": "docs"}})


def test_runs_are_admitted_by_composition_and_a_run_that_trained_stays_charged(tmp_path):
    ledger = tmp_path / "ledger.json"
    from dptrain.operator._dataset_budget import composed_epsilon

    group = (PLAN.sampling_rate, PLAN.noise_multiplier, 300, 32)
    budget = (composed_epsilon([(group, 40)], 1e-5, "rdp")
              + composed_epsilon([(group, 60)], 1e-5, "rdp")) / 2  # two runs fit, not three
    spec = dataset_spec(budget)
    for run in ("a", "b"):
        _dataset_ledger.admit(ledger, "docs", spec, job_spec(), run, run, PLAN)
    with pytest.raises(_dataset_ledger.DatasetBudgetError, match="composed ε"):
        _dataset_ledger.admit(ledger, "docs", None, job_spec(), "c", "c", PLAN)
    stored = json.loads(ledger.read_text())["datasets"]["docs"]
    assert [c["uid"] for c in stored["charges"]] == ["a", "b"]
    # Run a stopped after 5 steps: the rest of its reservation frees, and c now fits.
    _dataset_ledger.record(ledger, "docs", "a", 5)
    _dataset_ledger.admit(ledger, "docs", None, job_spec(), "c", "c", PLAN)
    charges = {c["uid"]: c for c in json.loads(ledger.read_text())["datasets"]["docs"]["charges"]}
    assert charges["a"]["stepsCharged"] == 5 and charges["a"]["state"] == "Charged"
    assert set(charges) == {"a", "b", "c"}


def test_dptrain_run_refuses_a_job_that_does_not_fit_before_training(tmp_path, micro_dataset):
    manifest = [
        {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPDataset", "metadata": {"name": "micro"},
         "spec": {"privacy": {"epsilon": 0.05, "delta": 1e-5, "accountant": "rdp"},
                  "checksum": "sha256:micro"}},
        {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob",
         "metadata": {"name": "toomuch"},
         "spec": {"privacy": {"epsilon": 5.0, "delta": 1e-5, "accountant": "rdp"},
                  "data": {"path": str(micro_dataset.directory), "format": "prepared",
                           "sequenceLength": 16, "datasetRef": "micro"},
                  "model": {"preset": "tiny"},
                  "training": {"batchSize": 8, "iterations": 20, "noiseMultiplier": 1.0}}},
    ]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all(manifest))
    ledger = tmp_path / "ledger.json"
    out = subprocess.run([sys.executable, "-m", "dptrain.cli._main", "run", str(path),
                          "--output", str(tmp_path / "run"), "--dataset-ledger", str(ledger),
                          "--json", "--no-progress"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 4, out.stderr[-2000:]
    assert "DPDataset micro" in out.stderr and "composed ε" in out.stderr
    assert not (tmp_path / "run" / "report.json").exists()  # nothing trained
    assert not ledger.exists() or json.loads(ledger.read_text())["datasets"] == {}
