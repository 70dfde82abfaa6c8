"""The operator–trainer pod contract: defined once (dptrain.api._contract), used by both sides."""

from __future__ import annotations

import pathlib
import re

import pytest

from dptrain.api import (
    EXIT_BUDGET_EXHAUSTED,
    GROUP,
    IN_CLUSTER_API_SERVER,
    PLURAL,
    VERSION,
    status_path,
    steps_charged_of,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "operator" / "dptrain" / "api" / "_contract.py"


def sources() -> list[pathlib.Path]:
    files = sorted([*(ROOT / "operator").rglob("*.py"), *(ROOT / "trainer").rglob("*.py")])
    assert len(files) > 50  # the scan really looks at the package sources
    return files


def files_matching(pattern: str) -> dict[pathlib.Path, int]:
    regex = re.compile(pattern, re.MULTILINE)
    found = {}
    for path in sources():
        hits = regex.findall(path.read_text(encoding="utf-8"))
        if hits:
            found[path] = len(hits)
    return found


def test_the_in_cluster_api_url_is_written_once():
    assert files_matching(re.escape("kubernetes.default.svc")) == {CONTRACT: 1}
    assert IN_CLUSTER_API_SERVER == "https://kubernetes.default.svc"


def test_exit_codes_are_defined_once():
    definitions = files_matching(r"^\s*EXIT_[A-Z_]+\s*(?::[^=\n]+)?=\s*\d+")
    assert definitions == {CONTRACT: 6}
    # No literal "exit 4" elsewhere: a bare 4 returned or compared as an exit code.
    literal = files_matching(
        r"(?:return|exit_code\s*==?|sys\.exit\()\s*(?:0\s+if\s+.*\s+else\s+)?4\b")
    assert literal == {}


def test_the_status_path_is_built_once():
    # The job's REST path is written down only by the status-path builder.
    assert files_matching(r"namespaces/\{[a-z_.]+\}/\{PLURAL\}") == {CONTRACT: 1}
    assert files_matching(re.escape("apis/dptrain.io")) == {}
    assert files_matching(r'"dptrainingjobs"') == {
        ROOT / "operator" / "dptrain" / "api" / "_base.py": 1}


def test_status_path_follows_the_api_group_version_and_plural():
    assert status_path("research", "tiny") == (
        f"/apis/{GROUP}/{VERSION}/namespaces/research/{PLURAL}/tiny/status")
    assert status_path("a", "b") == "/apis/dptrain.io/v1alpha1/namespaces/a/dptrainingjobs/b/status"


@pytest.mark.parametrize(("status", "expected"), [
    (None, 0),
    ({}, 0),
    ({"privacy": {"stepsCharged": 7}}, 7),
    ({"progress": {"stepsCharged": 9}}, 9),
    ({"privacy": {"stepsCharged": 12}, "progress": {"stepsCharged": 9}}, 12),
    ({"privacy": {"stepsCharged": None}, "progress": {}}, 0),
])
def test_steps_charged_of_a_status_is_the_larger_record(status, expected):
    assert steps_charged_of(status) == expected


def test_both_sides_use_the_contract():
    from dptrain.api import PlanStatus, parse_job
    from dptrain.operator import JobRef, PodSizing, build_trainer_job
    from dptrain.trainer import KubernetesTarget

    target = KubernetesTarget(name="tiny", namespace="research", api_server="https://k:6443/")
    assert target.status_url == "https://k:6443" + status_path("research", "tiny")
    assert KubernetesTarget(name="x", namespace="y").api_server == IN_CLUSTER_API_SERVER

    from kube_samples import job_manifest
    job = parse_job(job_manifest("tiny"))
    plan = PlanStatus(
        model_preset="tiny", model_params=90624, batch_size=64, iterations=100,
        noise_multiplier=1.0, noise_batch_ratio=1 / 64, sampling_rate=0.032,
        physical_batch_size=128, dataset_size=2000, sequence_length=64, clip_norm=1.0,
        learning_rate=3e-3, compute_flops=2.2e12, hosts=1, chips_per_host=0, max_steps=31,
        epsilon_planned=1.99, accountant="rdp", spec_generation=1)
    workload = build_trainer_job(job.spec, JobRef(name="tiny", namespace="research", uid="u"),
                                 plan, PodSizing())
    rules = workload["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["onExitCodes"]["values"] == [EXIT_BUDGET_EXHAUSTED]
    env = {e["name"]: e.get("value") for e in
           workload["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DPTRAIN_API_SERVER"] == IN_CLUSTER_API_SERVER
