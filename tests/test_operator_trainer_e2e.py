"""End to end: the test plays the kubelet for the pods the operator creates.

It runs the data-preparation Job's command and then the trainer Job's command as local
processes with those Jobs' environment (volumes mapped to temporary directories, the API server
to the emulator). The real trainer reports to the emulated API, and the real operator halts the
job when ε is exhausted.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess

import pytest
from kube_pods import run_pod, stop
from kube_samples import job_manifest
from kube_waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


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
