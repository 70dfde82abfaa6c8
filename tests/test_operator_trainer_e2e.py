"""End to end: the test plays the kubelet for the pods the operator creates.

It runs the data-preparation Job's command and then the trainer Job's command as local
processes with those Jobs' environment (volumes mapped to temporary directories, the API server
to the emulator). The real trainer reports to the emulated API, and the real operator halts the
job when ε is exhausted.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kube_samples import job_manifest
from kube_waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The kubelet projects the ServiceAccount token into the pod at a fixed path that a test cannot
# write; this entry point points the trainer's reporter at the token file the test projects.
ENTRY = """
import dataclasses, os, pathlib, sys
from dptrain.trainer import _reporters
_from_env = _reporters.KubernetesTarget.from_env.__func__
def _projected(cls, env=None):
    target = _from_env(cls, env)
    return dataclasses.replace(target, token_path=pathlib.Path(os.environ["TEST_TOKEN_FILE"]),
                               ca_path=None)
_reporters.KubernetesTarget.from_env = classmethod(_projected)
from dptrain.cli import main
sys.exit(main())
"""


def run_pod(kube, kube_api, job_name: str, root: Path) -> subprocess.Popen[bytes]:
    """Start the container of Job ``job_name`` as a local process (completion index 0)."""
    job = kube.get("batch/v1/jobs", "default", job_name)
    assert job is not None
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        local = root / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        source = volumes[mount["name"]]
        if "configMap" in source:
            data = kube.get("v1/configmaps", "default", source["configMap"]["name"])["data"]
            for key, value in data.items():
                (local / key).write_text(value)
        if "secret" in source:  # the job's key, decoded as the kubelet writes it
            data = kube.get("v1/secrets", "default", source["secret"]["secretName"])["data"]
            for item in source["secret"]["items"]:
                (local / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
        mounts[mount["mountPath"]] = local

    pattern = re.compile(r"(?<![\w./-])(" + "|".join(
        re.escape(m) for m in sorted(mounts, key=len, reverse=True)) + r')(?=/|$|"|\s)')

    def local_path(text: str) -> str:
        # One pass, at path boundaries: a mapped path is never rewritten again.
        return pattern.sub(lambda match: str(mounts[match.group(1)]), text)

    for key in list((mounts["/etc/dptrain"]).iterdir()):
        key.write_text(local_path(key.read_text()))
    env = dict(os.environ)
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = local_path(item["value"])
        else:  # the completion index, as the Job controller would set it
            assert "job-completion-index" in item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = "0"
    env["DPTRAIN_API_SERVER"] = kube_api.url  # what kubernetes.default.svc resolves to here
    token = root / "token"
    token.write_text("projected-service-account-token")
    env["TEST_TOKEN_FILE"] = str(token)
    env.setdefault("JAX_PLATFORMS", "cpu")
    command = [local_path(arg) for arg in container["command"]]
    assert command[0] == "dptrain"
    log = open(root / f"{job_name}.log", "wb")  # noqa: SIM115 - the process owns it
    return subprocess.Popen([sys.executable, "-c", ENTRY, *command[1:]], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=root)


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # the kubelet's graceful stop of a deleted pod
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return int(process.returncode)


def test_operator_halts_a_real_trainer_when_epsilon_is_exhausted(kube, kube_api, start_operator,
                                                                  tmp_path):
    operator = start_operator("--stall-timeout", "600")
    name = "e2e"
    manifest = job_manifest(name, privacy={"epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"},
                            data={"numSequences": None}, training={"noiseMultiplier": 0.7})
    kube.create_job(manifest)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # Data preparation: N is not in the spec.
        wait_for(lambda: kube.get("batch/v1/jobs", "default", f"{name}-prepare"),
                 what="the data-preparation Job", timeout=30)
        prepare = run_pod(kube, kube_api, f"{name}-prepare", tmp_path / "prepare")
        processes.append(prepare)
        assert prepare.wait(240) == 0, (tmp_path / "prepare" / f"{name}-prepare.log").read_text()
        job = wait_for(lambda: (j := kube.get_job(name)) and j["status"].get("phase") == "Running"
                       and j, what="planning after data preparation", timeout=120,
                       describe=lambda: json.dumps((kube.get_job(name) or {}).get("status")))
        n = job["status"]["dataset"]["numSequences"]
        plan = job["status"]["plan"]
        assert plan["datasetSize"] == n > 0
        assert 1 <= plan["maxSteps"] < plan["iterations"]  # the budget, not the plan, binds

        trainer = run_pod(kube, kube_api, f"{name}-train", tmp_path / "train")
        processes.append(trainer)
        train_log = tmp_path / "train" / f"{name}-train.log"

        def halted_or_exited():
            job = kube.get_job(name) or {}
            if job.get("status", {}).get("phase") in ("BudgetExhausted", "Failed", "Succeeded"):
                return job
            if trainer.poll() is not None:
                return {"exited": trainer.returncode}
            return None

        def context():
            status = json.dumps((kube.get_job(name) or {}).get("status"))
            return status + train_log.read_text()[-2000:]

        outcome = wait_for(halted_or_exited, what="the trainer to stop or be halted",
                           timeout=300, describe=context)
        if "exited" in outcome and kube.get("batch/v1/jobs", "default", f"{name}-train"):
            # Play the Job controller: the only pod ended (exit 4 fails the Job by policy).
            condition = ({"type": "Complete", "status": "True"} if outcome["exited"] == 0 else
                         {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                          "message": f"container exited with {outcome['exited']}"})
            kube.merge_patch("batch/v1/jobs", "default", f"{name}-train",
                             {"status": {"conditions": [condition]}}, "status")
        job = wait_for(lambda: (j := kube.get_job(name)) and j["status"].get("phase") in
                       ("BudgetExhausted", "Failed", "Succeeded") and j,
                       what="a terminal phase", timeout=60,
                       describe=lambda: json.dumps((kube.get_job(name) or {}).get("status"))
                       + train_log.read_text()[-2000:])
        wait_for(lambda: kube.get("batch/v1/jobs", "default", f"{name}-train") is None,
                 what="the workload deleted")
        code = stop(trainer)
    finally:
        for process in processes:
            stop(process)
    status = job["status"]
    assert status["phase"] == "BudgetExhausted", json.dumps(status) + train_log.read_text()[-3000:]
    privacy = status["privacy"]
    assert 1 <= privacy["stepsCharged"] <= plan["maxSteps"]
    assert privacy["epsilonSpent"] <= privacy["epsilonBudget"] == 2.0
    assert status["progress"]["stepsCharged"] <= privacy["stepsCharged"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["BudgetExhausted"]["status"] == "True"
    assert code in (0, 4, 128 + signal.SIGTERM, -signal.SIGTERM), train_log.read_text()[-3000:]
    assert kube.get("v1/services", "default", f"{name}-hosts") is None
    _assert_nothing_published_holds_the_key(kube, operator, name, job, tmp_path)


def _assert_nothing_published_holds_the_key(kube, operator, name, job, tmp_path):
    """Issue 10: the key is in its Secret only, never in what the job publishes."""
    from key_leaks import all_files, find_key

    (secret,) = [s for s in kube.list("v1/secrets", "default")
                 if s["metadata"]["labels"]["dptrain.io/job"] == name]
    assert secret["immutable"] is True
    assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    key = base64.b64decode(secret["data"]["key"])
    assert len(key) == 32
    texts = {"job": json.dumps(kube.get_job(name)),
             "configmaps": json.dumps(kube.list("v1/configmaps", "default")),
             "events": json.dumps(kube.list("v1/events", "default")),
             "operator log": operator.log_path.read_text(errors="replace"),
             "operator metrics": operator.metrics()}
    # Everything the pods wrote (checkpoints, ledger, progress, report, logs), except the
    # mounted key itself.
    files = all_files(tmp_path / "prepare", tmp_path / "train",
                      exclude=[tmp_path / "train" / "job-key" / "key"])
    assert any(f.name == "ledger.json" for f in files)
    assert find_key(key, files, texts) == []
    assert find_key(key, [tmp_path / "train" / "job-key" / "key"]) != []  # the search can fail
    # The trainer's Role grants nothing on Secrets, and no env var carries the key.
    role = kube.get("rbac.authorization.k8s.io/v1/roles", "default", f"{name}-trainer")
    assert role is not None and not any("secrets" in r["resources"] for r in role["rules"])
