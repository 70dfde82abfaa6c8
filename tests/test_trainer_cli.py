"""`dptrain run / train / prepare-data / audit memorization` from the command line."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from dptrain.cli import main
from dptrain.trainer import REPORT_KEYS

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CPU = ROOT / "manifests" / "samples" / "tiny-cpu.yaml"


def _manifest(tmp_path, **changes):
    job = yaml.safe_load(TINY_CPU.read_text())
    for dotted, value in changes.items():
        node = job
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_run_with_missing_data_stops_before_training(tmp_path, capsys):
    path = _manifest(tmp_path, **{"spec.data.builtin": None, "spec.data.path": "nope.jsonl"})
    assert main(["run", str(path), "--output", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert "spec.data.path: no such file or directory" in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_run_with_an_empty_corpus_stops_before_training(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    path = _manifest(tmp_path, **{"spec.data.builtin": None, "spec.data.path": "empty.jsonl"})
    assert main(["run", str(path), "--output", str(tmp_path / "out")]) == 3
    assert "is empty" in capsys.readouterr().err


def test_prepare_data_json_output(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n' * 10)
    code = main(["prepare-data", "--input", str(tmp_path / "d.jsonl"), "--output",
                 str(tmp_path / "p"), "--sequence-length", "16", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_sequences"] == 9 and result["sequence_length"] == 16
    assert result["location"] == str((tmp_path / "p").resolve())


def test_audit_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["audit", "memorization", "--checkpoint", str(tmp_path / "none"), "--json"]) == 3
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_dptrain_run_tiny_cpu_end_to_end(tmp_path):
    """The sample finishes with a falling loss, within budget, and writes the report."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # measure the real thing, optimised
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dptrain.cli._main", "run", str(TINY_CPU),
                           "--output", str(out), "--json"], capture_output=True, text=True,
                          env=env, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    report = json.loads((out / "report.json").read_text())
    assert set(REPORT_KEYS) <= set(report)
    assert report["end_state"] == "Succeeded" and report["steps"] == 80
    assert report["epsilon_spent"] <= report["epsilon_budget"] == 8.0
    assert report["final_loss"] < report["initial_loss"] - 1.0
    assert (out / "loss.png").stat().st_size > 1000 and (out / "epsilon.png").is_file()
    assert result["exit_code"] == 0
    # The audit reads the checkpoint and the data it names.
    audit = subprocess.run([sys.executable, "-m", "dptrain.cli._main", "audit", "memorization",
                            "--checkpoint", str(out), "--samples", "8", "--json"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert audit.returncode == 3 or audit.returncode == 0, audit.stderr[-2000:]
