"""The foundation's CLI: --json everywhere, one-line errors, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dptrain.api import crd_manifest

ROOT = Path(__file__).resolve().parents[1]


def dptrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dptrain.cli._main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_epsilon_json():
    out = dptrain("epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "1",
                  "--steps", "1000", "--delta", "1e-5", "--accountant", "rdp", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["epsilon"] == pytest.approx(2.101, abs=5e-4)


def test_calibrate_json_gives_noise_multiplier_or_steps():
    sigma = dptrain("calibrate", "--epsilon", "1", "--delta", "1e-6", "--sampling-rate", "0.1",
                    "--steps", "512", "--json")
    assert sigma.returncode == 0, sigma.stderr
    assert json.loads(sigma.stdout)["noise_multiplier"] == pytest.approx(9.66, abs=0.01)
    steps = dptrain("calibrate", "--epsilon", "2", "--delta", "1e-6", "--sampling-rate", "0.1",
                    "--noise-multiplier", "3", "--json")
    assert steps.returncode == 0, steps.stderr
    assert json.loads(steps.stdout)["steps"] == 155


@pytest.mark.parametrize("args", [
    ["epsilon", "--sampling-rate", "2", "--noise-multiplier", "1", "--steps", "10",
     "--delta", "1e-5"],
    ["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "nan", "--steps", "10",
     "--delta", "1e-5"],
    ["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "0",
     "--delta", "1e-5"],
    ["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "ten",
     "--delta", "1e-5"],
    ["calibrate", "--epsilon", "-1", "--delta", "1e-5", "--sampling-rate", "0.1", "--steps", "9"],
    ["nonsense"],
])
def test_bad_arguments_exit_nonzero_with_one_line_and_no_traceback(args):
    out = dptrain(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2  # argparse prints usage + one error line
    assert "error" in out.stderr


def test_crd_prints_the_generated_crd_in_yaml_and_json():
    assert yaml.safe_load(dptrain("crd").stdout) == crd_manifest()
    assert json.loads(dptrain("crd", "--json").stdout) == crd_manifest()


def test_validate_reports_each_problem_on_its_own_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob", "metadata": {"name": "b"},
        "spec": {"privacy": {"epsilon": -1, "delta": 2}, "data": {"builtin": "stdlib-docs"}}}))
    out = dptrain("validate", str(bad))
    assert out.returncode == 3
    lines = out.stderr.strip().splitlines()
    assert any("spec.privacy.epsilon: must be > 0" in line for line in lines)
    assert any("spec.privacy.delta: must be < 1" in line for line in lines)
    report = json.loads(dptrain("validate", "--json", str(bad)).stdout)
    assert report["valid"] is False and len(report["files"][0]["problems"]) == 2


def test_validate_accepts_the_samples():
    samples = sorted(str(p) for p in (ROOT / "manifests" / "samples").glob("*.yaml"))
    out = dptrain("validate", "--json", *samples)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["valid"] is True


def test_every_command_has_help():
    top = dptrain("--help")
    assert top.returncode == 0
    commands = [c for c in ("epsilon", "calibrate", "crd", "validate") if c in top.stdout]
    assert len(commands) == 4
    for command in commands:
        out = dptrain(command, "--help")
        assert out.returncode == 0 and "--json" in out.stdout, command
