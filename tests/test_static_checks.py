"""Layering, lint and types are part of the suite: CI fails when any of them does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_import_operator_is_the_standard_library_even_from_the_repo_root():
    for flags in ([], ["-S"]):
        out = _run(sys.executable, *flags, "-c", "import operator; print(operator.__file__)")
        assert out.returncode == 0, out.stderr
        assert "site-packages" not in out.stdout and str(ROOT / "operator") not in out.stdout
        assert out.stdout.strip().endswith("operator.py")


def test_no_init_py_in_source_roots():
    for root in ("operator", "trainer"):
        assert not (ROOT / root / "__init__.py").exists()
        assert not (ROOT / root / "dptrain" / "__init__.py").exists()


def test_import_contracts_hold():
    # grimp finds a namespace package through sys.path, not setuptools' editable finder.
    roots = [str(ROOT / "operator"), str(ROOT / "trainer")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(roots)}
    out = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_is_clean():
    out = _run(str(BIN / "ruff"), "check", "operator", "trainer", "tests", "bench")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_mypy_strict_on_api_privacy_operator():
    out = _run(str(BIN / "mypy"), "-p", "dptrain.api", "-p", "dptrain.privacy",
               "-p", "dptrain.operator")
    assert out.returncode == 0, out.stdout + out.stderr


def test_operator_import_path_has_no_jax():
    code = ("import sys, dptrain.cli, dptrain.operator, dptrain.planner, dptrain.privacy; "
            "heavy = {'jax', 'jaxlib', 'equinox', 'optax'}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    out = _run(sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = readme.split("```")
    commands = [line.strip() for line in blocks[1].splitlines()[1:]  # after the ```bash tag
                if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands
    assert "dptrain run manifests/samples/tiny-cpu.yaml" in commands[0]
    assert commands[1] in ci
