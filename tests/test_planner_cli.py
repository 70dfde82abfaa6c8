"""`dptrain plan`: human table, --json keys, --plot PNG, one-line errors with exit codes."""

from __future__ import annotations

import json
import pathlib

import pytest

from dptrain.cli import main

JOB = """\
apiVersion: dptrain.io/v1alpha1
kind: DPTrainingJob
metadata: {name: demo}
spec:
  privacy: {epsilon: 4, delta: 1.0e-6, accountant: rdp}
  data: {builtin: stdlib-docs, sequenceLength: 128, numSequences: 100000}
  compute: {flops: 1.0e+15, accelerator: nvidia-h100-80gb}
"""
JSON_KEYS = {"model_params", "batch_size", "iterations", "noise_multiplier", "noise_batch_ratio",
             "sampling_rate", "physical_batch_size", "predicted_loss", "compute_flops", "hosts",
             "chips_per_host"}


@pytest.fixture()
def job(tmp_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("DPTRAIN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "planner-cache"))
    path = tmp_path / "job.yaml"
    path.write_text(JOB)
    return path


def test_plan_json_has_the_documented_keys(job: pathlib.Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(job), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= JSON_KEYS
    assert out["compute_flops"] <= 1e15
    assert out["pod"]["resources"]["limits"]["nvidia.com/gpu"] == str(out["chips_per_host"])
    assert out["bound"] in ("compute", "data", "privacy")


def test_plan_prints_a_table_and_writes_the_frontier_png(
        job: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "frontier.png"
    # 1e13 FLOPs: within the measured table's reach, so the plan has measured runners-up.
    job.write_text(JOB.replace("flops: 1.0e+15", "flops: 1.0e+13"))
    assert main(["plan", str(job), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Plan (")
    assert "Runners-up" in text
    assert "rests on: the measured loss table" in text
    assert "noise-batch ratio regime:" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_infeasible_budget_exits_3_with_one_line(job: pathlib.Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    job.write_text(JOB.replace("flops: 1.0e+15", "flops: 1.0e+3"))
    assert main(["plan", str(job)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spec.compute.flops" in err and "nearest feasible" in err


def test_missing_dataset_size_names_the_field(job: pathlib.Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    job.write_text(JOB.replace(", numSequences: 100000", ""))
    assert main(["plan", str(job)]) == 3
    assert "spec.data.numSequences" in capsys.readouterr().err
    assert main(["plan", str(job), "--dataset-size", "100000", "--json"]) == 0
