"""The trainer is SIGKILLed again and again; the ledger never undercounts and ε stays in budget.

The real operator runs against the API emulator; the test plays the kubelet and the Job
controller (``kube_kubelet``): it runs each trainer Job the operator creates as a local
``dptrain train`` process (tiny model, CPU, checkpoints on a "PersistentVolumeClaim" directory
that survives restarts), kills it with SIGKILL at points chosen by a seeded RNG — while a step is
in flight, in the middle of a checkpoint save (written, not yet renamed into place), right after
a progress report reached the API server, or after a random delay — then fails the Job as the
Job controller would. The operator restarts the trainer from the ledger (its real restart path:
``status.privacy`` and ``ledger.json`` → ``DurableLedger.resume``) until the job finishes.

After every kill, once the operator has charged every report, the test reads from disk:

- every complete checkpoint's step and the ledger count it was saved with, and
- the execution log (one line written before each DP step is dispatched, by any process),

and asserts that the operator's ``status.privacy.stepsCharged`` is at least each of them: no
step whose result could be in a checkpoint, and no step that ever ran, is missing from the ledger.
At the end: a terminal, non-Failed phase, ε spent ≤ budget (and ≥ the exact ε of the steps
charged), the workload gone, and the ledger never observed going down.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
from kube_faults import FaultyEmulatorServer
from kube_kubelet import Kubelet, Pod, finish_job
from kube_ledger import (
    TERMINAL,
    LedgerWatch,
    checkpoint_records,
    status_of,
    unfinished_saves,
)
from kube_samples import job_manifest
from kube_waiting import wait_for

from dptrain.privacy import DpSgdMechanism, epsilon

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 20240607
KILLS = 4
NAME = "killme"
WORKLOAD = f"{NAME}-train"
BUDGET = 1.45
ITERATIONS = 60
INTERVAL = 4


@pytest.fixture()
def kube_api():
    """The emulator without faults, but with kmock's request history bounded: thousands of
    progress reports otherwise make every read scan the whole history (quadratic)."""
    server = FaultyEmulatorServer(seed=SEED).start()
    try:
        yield server
    finally:
        server.stop()


def fault_schedule(rng: random.Random) -> list[tuple[str, float]]:
    """KILLS faults: each named kind at least once, the rest drawn; positions drawn too."""
    kinds = ["step", "save", "report"] + [rng.choice(["step", "save", "report", "external"])
                                          for _ in range(KILLS - 3)]
    rng.shuffle(kinds)
    out: list[tuple[str, float]] = []
    for kind in kinds:
        if kind == "step":
            out.append((kind, rng.randint(1, 6)))
        elif kind == "save":
            out.append((kind, rng.randint(1, 2)))
        elif kind == "report":
            out.append((kind, rng.randint(1, 6)))
        else:
            out.append((kind, rng.uniform(0.0, 0.4)))
    return out


def executions(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def test_sigkilled_trainer_never_undercounts_and_finishes_within_budget(
        kube, kube_api, start_operator, micro_dataset, planner_cache_dir, tmp_path):
    rng = random.Random(SEED)
    schedule = fault_schedule(rng)
    start_operator("--restart-backoff", "0.2", "--stall-timeout", "600")
    exec_log = tmp_path / "executions.log"
    kubelet = Kubelet(kube, kube_api.url, tmp_path / "kubelet", env={
        "DPTRAIN_TEST_EXEC_LOG": str(exec_log),
        # A node-level compilation cache: restarted trainers skip XLA compilation.
        "JAX_COMPILATION_CACHE_DIR": str(planner_cache_dir / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    })
    checkpoints = kubelet.claim_dir("ckpt") / NAME
    # The prepared sequences lie on a data volume (the pod's /tmp is its own emptyDir).
    shutil.copytree(micro_dataset.directory, kubelet.claim_dir("data") / "prepared")
    manifest = job_manifest(
        NAME,
        privacy={"epsilon": BUDGET, "delta": 1e-5, "accountant": "rdp"},
        data={"builtin": None, "path": "prepared", "volume": {"claimName": "data"},
              "format": "prepared",
              "sequenceLength": 16, "numSequences": micro_dataset.num_sequences},
        training={"batchSize": 16, "iterations": ITERATIONS, "noiseMultiplier": 1.5},
        checkpoint={"path": NAME, "volume": {"claimName": "ckpt", "readOnly": False},
                    "intervalSteps": INTERVAL, "keep": 3},
        maxRestarts=KILLS + 3)
    kube.create_job(manifest)

    def describe() -> str:
        pods = "\n".join(f"--- pod {i} rc={p.returncode}\n{p.log(1500)}"
                         for i, p in enumerate(kubelet.pods))
        return json.dumps(status_of(kube, NAME)) + "\n" + pods

    kills: list[tuple[str, float, int | None]] = []
    max_checkpoint = (0, 0)
    last_uid = None
    with LedgerWatch(kube, [NAME]) as watch:
        try:
            for attempt in range(KILLS + 3):
                def next_workload(last_uid: str | None = last_uid) -> dict | None:
                    status = status_of(kube, NAME)
                    if status.get("phase") in TERMINAL:
                        return {"terminal": status["phase"]}
                    job = kube.get("batch/v1/jobs", "default", WORKLOAD)
                    if job is not None and job["metadata"]["uid"] != last_uid:
                        return job
                    return None

                found = wait_for(next_workload, timeout=90, interval=0.1,
                                 what="a new trainer workload or a terminal phase",
                                 describe=describe)
                if "terminal" in found:
                    break
                last_uid = found["metadata"]["uid"]
                if attempt == 0:
                    # The status patch lands just after the workload is created: poll.
                    plan = wait_for(lambda: status_of(kube, NAME).get("plan"), timeout=30,
                                    what="the plan in the job's status")
                    # The budget binds before the plan does, leaving room for the kills.
                    assert 28 <= plan["maxSteps"] < ITERATIONS, plan
                kind, where = schedule[attempt] if attempt < len(schedule) else ("none", 0)
                env = {"DPTRAIN_TEST_FAULT": f"{kind}:{int(where)}"} if kind in (
                    "step", "save", "report") else {}
                before = int((status_of(kube, NAME).get("progress") or {}).get("step") or 0)
                pod = kubelet.run(WORKLOAD, env=env,
                                  extra_args=("--metrics-port", "0", "--no-progress"))
                if kind == "external":
                    wait_for(lambda pod=pod, before=before: pod.returncode is not None or int(
                        (status_of(kube, NAME).get("progress") or {}).get("step") or 0) > before,
                        timeout=120, interval=0.02, what="the trainer's first step",
                        describe=describe)
                    time.sleep(where)  # the random kill point itself, not a wait for a state
                    pod.kill()
                rc = run_until_exit_or_halt(kube, pod, describe)
                if kind != "none":
                    kills.append((kind, where, rc))
                if rc is not None:
                    finish_job(kube, WORKLOAD, rc, uid=last_uid)
                # Once the operator has charged every report, nothing on disk may exceed it.
                (ledger,) = wait_for(lambda: caught_up(kube), timeout=30, interval=0.1,
                                     what="the operator to charge every report",
                                     describe=describe)
                records = checkpoint_records(checkpoints)
                if kind == "save":
                    assert unfinished_saves(checkpoints), "the save fault left no partial save"
                if records:
                    max_checkpoint = max(max_checkpoint, max(records))
                    assert ledger >= max(step for step, _ in records), (ledger, records)
                    assert ledger >= max(count for _, count in records), (ledger, records)
                assert ledger >= executions(exec_log), (ledger, executions(exec_log))
            final = wait_for(lambda: (s := status_of(kube, NAME)).get("phase") in TERMINAL and s,
                             timeout=60, what="a terminal phase", describe=describe)
            wait_for(lambda: kube.get("batch/v1/jobs", "default", WORKLOAD) is None,
                     timeout=30, what="the workload deleted", describe=describe)
        finally:
            kubelet.stop_all()

    # Every planned kill happened, and each was a SIGKILL (or the kill landed after exit 4).
    assert len(kills) == KILLS, (kills, describe())
    assert all(rc == -9 for _, _, rc in kills), (kills, describe())
    assert final["phase"] in ("BudgetExhausted", "Succeeded"), describe()
    assert final["restarts"] == KILLS
    plan, privacy = final["plan"], final["privacy"]
    steps = privacy["stepsCharged"]
    ran = executions(exec_log)
    # The ledger counts every execution, repeated steps included, and no more than the plan.
    assert ran <= steps <= plan["maxSteps"], (ran, steps, plan["maxSteps"])
    assert steps >= max_checkpoint[0] and steps >= max_checkpoint[1]
    for step, count in checkpoint_records(checkpoints):
        assert count <= steps and step <= steps
    # ε: within the budget, and never below the exact ε of the steps charged (1e-9 ε slack).
    mechanism = DpSgdMechanism(
        sampling_rate=plan["samplingRate"], noise_multiplier=plan["noiseMultiplier"],
        delta=privacy["delta"], accountant=plan["accountant"], dataset_size=plan["datasetSize"],
        physical_batch_size=plan["physicalBatchSize"])
    exact = epsilon(mechanism, steps)
    assert exact - 1e-9 <= privacy["epsilonSpent"] <= privacy["epsilonBudget"] == BUDGET
    assert not watch.decreases(), watch.seen
    # Steps were really repeated after restarts: the ledger charged more than the model holds.
    progress_step = int((final.get("progress") or {}).get("step") or 0)
    assert ran > progress_step


def caught_up(kube) -> tuple[int] | None:
    """(steps charged,) once the operator has charged the latest progress report."""
    status = status_of(kube, NAME)
    reported = int((status.get("progress") or {}).get("stepsCharged") or 0)
    charged = int((status.get("privacy") or {}).get("stepsCharged") or 0)
    return (charged,) if charged >= reported else None


def run_until_exit_or_halt(kube, pod: Pod, describe) -> int | None:
    """Wait until the pod exits (its code) or the operator deletes its Job (SIGTERM; None)."""
    def ended() -> tuple[str, int | None] | None:
        if pod.returncode is not None:
            return ("exited", pod.returncode)
        job = kube.get("batch/v1/jobs", "default", WORKLOAD)
        if job is None or job["metadata"]["uid"] != pod.job_uid:
            return ("deleted", None)
        return None

    how, rc = wait_for(ended, timeout=180, interval=0.05, what="the trainer to exit or be halted",
                       describe=describe)
    if how == "deleted":
        pod.stop()
        return None
    return rc
