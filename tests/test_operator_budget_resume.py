"""A job halts at its budget, the budget is raised, and the real trainer resumes its checkpoint.

The real operator runs against the API emulator; the test plays the kubelet (``kube_kubelet``) and
runs each trainer Job as a local ``dptrain train`` process whose requests are RBAC-checked as the
job's ServiceAccount. Checkpoints lie on a "PersistentVolumeClaim" directory shared by both pods.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from kube_kubelet import Kubelet, finish_job
from kube_ledger import JOBS, TERMINAL, LedgerWatch, checkpoint_records, status_of
from kube_samples import job_manifest
from kube_waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "raise"
WORKLOAD = f"{NAME}-train"


def test_budget_raise_resumes_from_the_checkpoint_and_the_ledger_continues(
        kube, kube_api, start_operator, micro_dataset, planner_cache_dir, tmp_path):
    start_operator("--restart-backoff", "0.2", "--stall-timeout", "600")
    kubelet = Kubelet(kube, kube_api.url, tmp_path / "kubelet", grant=kube_api.grant_token, env={
        "JAX_COMPILATION_CACHE_DIR": str(planner_cache_dir / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    })
    shutil.copytree(micro_dataset.directory, kubelet.claim_dir("data") / "prepared")
    checkpoints = kubelet.claim_dir("ckpt") / NAME
    kube.create_job(job_manifest(
        NAME, privacy={"epsilon": 0.8, "delta": 1e-5, "accountant": "rdp"},
        data={"builtin": None, "path": "prepared", "volume": {"claimName": "data"},
              "format": "prepared", "sequenceLength": 16,
              "numSequences": micro_dataset.num_sequences},
        training={"batchSize": 16, "iterations": 24, "noiseMultiplier": 1.5},
        checkpoint={"path": NAME, "volume": {"claimName": "ckpt", "readOnly": False},
                    "intervalSteps": 4, "keep": 3}))

    def describe() -> str:
        pods = "\n".join(f"--- pod {i} rc={p.returncode}\n{p.log(1500)}"
                         for i, p in enumerate(kubelet.pods))
        return json.dumps(status_of(kube, NAME)) + "\n" + pods

    def run_to_the_end() -> dict:
        """Run the workload's pod until it exits; play the Job controller; wait for a halt."""
        job = wait_for(lambda: kube.get("batch/v1/jobs", "default", WORKLOAD), timeout=60,
                       what="a workload", describe=describe)
        pod = kubelet.run(WORKLOAD, extra_args=("--metrics-port", "0"))
        wait_for(lambda: pod.returncode is not None or status_of(kube, NAME).get("phase")
                 in TERMINAL, timeout=240, what="the trainer to end", describe=describe)
        pod.stop()
        finish_job(kube, WORKLOAD, pod.returncode or 0, uid=job["metadata"]["uid"])
        return wait_for(lambda: (s := status_of(kube, NAME)).get("phase") in TERMINAL and s,
                        timeout=30, what="a terminal phase", describe=describe)

    with LedgerWatch(kube, [NAME]) as watch:
        try:
            first = run_to_the_end()
            assert first["phase"] == "BudgetExhausted", describe()
            halted_at = first["privacy"]["stepsCharged"]
            assert 0 < halted_at < 24 and halted_at == first["plan"]["maxSteps"]
            saved = max(step for step, _ in checkpoint_records(checkpoints))
            assert saved == halted_at  # the trainer checkpointed where it stopped
            wait_for(lambda: kube.get("batch/v1/jobs", "default", WORKLOAD) is None,
                     what="the workload deleted")
            # The budget is raised: the operator accepts it and starts the workload again.
            kube.merge_patch(JOBS, "default", NAME, {"spec": {"privacy": {"epsilon": 1.6}}})
            resumed = wait_for(lambda: (s := status_of(kube, NAME)).get("phase") == "Running"
                               and s, timeout=30, what="Running again", describe=describe)
            assert resumed["observedGeneration"] == 2
            assert resumed["plan"]["maxSteps"] > halted_at
            second = run_to_the_end()
        finally:
            kubelet.stop_all()
    log = kubelet.pods[-1].log(200000)
    # Resumed from the checkpoint (not refused as "another configuration", not from scratch):
    # the progress bar starts at the checkpoint's step.
    first_bar = re.search(r"(\d+)/24 \[", log)
    assert first_bar is not None, log[-3000:]
    assert int(first_bar.group(1)) == saved
    assert "another configuration" not in log
    privacy = second["privacy"]
    assert second["phase"] in ("BudgetExhausted", "Succeeded"), describe()
    # The ledger continued from where it was: one charge per step run after the checkpoint.
    assert privacy["stepsCharged"] == halted_at + second["progress"]["step"] - saved > halted_at
    assert privacy["epsilonBudget"] == 1.6 and privacy["epsilonSpent"] <= 1.6
    assert max(step for step, _ in checkpoint_records(checkpoints)) > saved
    assert not watch.decreases(), watch.seen
    verified = {c["type"]: c for c in second["conditions"]}["MechanismVerified"]
    assert verified["status"] == "True"  # the real trainer's fingerprint matches the plan
