"""A trainer that writes what it should not: the ledger, another mechanism, another config.

The real operator runs against the API emulator. The "trainer" is plain HTTP with the token of the
job's own ServiceAccount: the emulator authorises its requests against the Role and RoleBinding
the operator created (RBAC as the API server applies it), so each test uses exactly the rights a
trainer pod has — ``get`` on its job, ``get``/``patch`` on its job's ``/status``.
"""

from __future__ import annotations

import json

import pytest
from kube_client import ApiError, KubeHTTP
from kube_ledger import JOBS, honest_mechanism, privacy_of, report, status_of
from kube_samples import job_manifest
from kube_waiting import wait_for

from dptrain.operator._ledger_record import ANNOTATION_LEDGER

pytestmark = pytest.mark.e2e


def wait_phase(kube, name, *phases, timeout=30.0):
    return wait_for(lambda: (s := status_of(kube, name)).get("phase") in phases and s,
                    timeout=timeout, what=f"{name} in {phases}",
                    describe=lambda: json.dumps(status_of(kube, name)))


def condition(status, type_):
    return {c["type"]: c for c in status.get("conditions", [])}.get(type_)


def trainer_client(kube_api, name: str) -> KubeHTTP:
    """A client holding the job's ServiceAccount token (RBAC-checked as the trainer)."""
    token = f"trainer-token-{name}"
    kube_api.grant_token(token, "default", f"{name}-trainer")
    return KubeHTTP(kube_api.url, token=token)


def record_of(kube, name) -> dict:
    raw = (kube.get_job(name) or {})["metadata"].get("annotations", {}).get(ANNOTATION_LEDGER)
    return json.loads(raw)["ledger"] if raw else {}


def test_a_trainer_cannot_lower_the_ledger_it_is_restored_and_evented(kube, kube_api,
                                                                      start_operator):
    start_operator()
    kube.create_job(job_manifest("tamper"))
    wait_phase(kube, "tamper", "Running")
    trainer = trainer_client(kube_api, "tamper")
    report(trainer, "tamper", stepsCharged=9, step=9, mechanism=honest_mechanism(kube, "tamper"))
    honest = wait_for(lambda: (p := privacy_of(kube, "tamper")).get("stepsCharged") == 9 and p,
                      what="9 steps charged")
    assert record_of(kube, "tamper") == honest  # the authoritative record, then its copy
    # The trainer's Role lets it patch /status, so it can overwrite status.privacy ...
    trainer.merge_patch(JOBS, "default", "tamper", {"status": {"privacy": {
        "stepsCharged": 1, "epsilonSpent": 0.01}}}, "status")
    # ... which the operator ignores, restores and reports.
    wait_for(lambda: privacy_of(kube, "tamper") == honest, what="status.privacy restored",
             describe=lambda: json.dumps(status_of(kube, "tamper")))
    warning = wait_for(lambda: [e for e in kube.events_for("tamper")
                                if e["reason"] == "LedgerRestored"], what="a LedgerRestored event")
    assert warning[0]["type"] == "Warning" and "9 steps" in warning[0]["message"]
    # It cannot reach the record: no patch on the job itself, and /status ignores metadata.
    forged = {"metadata": {"annotations": {ANNOTATION_LEDGER: json.dumps(
        {"ledger": {**honest, "stepsCharged": 0}})}}}
    with pytest.raises(ApiError) as refused:
        trainer.merge_patch(JOBS, "default", "tamper", forged)
    assert refused.value.status == 403
    trainer.merge_patch(JOBS, "default", "tamper", forged, "status")
    assert record_of(kube, "tamper") == honest
    with pytest.raises(ApiError) as refused:
        trainer.delete(JOBS, "default", "tamper")
    assert refused.value.status == 403
    # The ledger continues from the record: the next report is charged on top of 9, not 1.
    report(trainer, "tamper", stepsCharged=11, step=11)
    wait_for(lambda: privacy_of(kube, "tamper").get("stepsCharged") == 11, what="11 charged")
    assert record_of(kube, "tamper")["stepsCharged"] == 11
    assert status_of(kube, "tamper")["phase"] == "Running"


def test_a_trainer_running_another_mechanism_is_halted_and_the_ledger_kept(kube, kube_api,
                                                                           start_operator):
    start_operator()
    kube.create_job(job_manifest("drift"))
    status = wait_phase(kube, "drift", "Running")
    trainer = trainer_client(kube_api, "drift")
    mechanism = honest_mechanism(kube, "drift")
    report(trainer, "drift", stepsCharged=3, step=3, mechanism=mechanism)
    wait_for(lambda: privacy_of(kube, "drift").get("stepsCharged") == 3, what="3 charged")
    verified = condition(status_of(kube, "drift"), "MechanismVerified")
    assert verified["status"] == "True"
    # Less noise than planned (σ as used must be the plan's σ rounded up to float32).
    low = dict(mechanism, noiseMultiplier=mechanism["noiseMultiplier"] * 0.9)
    report(trainer, "drift", stepsCharged=5, step=5, mechanism=low)
    final = wait_phase(kube, "drift", "Failed")
    mismatch = condition(final, "MechanismVerified")
    assert mismatch["status"] == "False" and mismatch["reason"] == "MechanismMismatch"
    assert "status.progress.mechanism.noiseMultiplier" in mismatch["message"]
    assert condition(final, "Failed")["reason"] == "MechanismMismatch"
    assert final["privacy"]["stepsCharged"] == 5  # what ran is charged: never undercount
    assert final["plan"] == status["plan"]
    wait_for(lambda: kube.get("batch/v1/jobs", "default", "drift-train") is None,
             what="the workload deleted")
    assert any(e["reason"] == "MechanismMismatch" and e["type"] == "Warning"
               for e in kube.events_for("drift"))


def test_an_immutable_config_map_replaced_with_another_plan_fails_the_job(kube, kube_api,
                                                                          start_operator):
    start_operator("--timer-interval", "1")
    kube.create_job(job_manifest("swap"))
    wait_phase(kube, "swap", "Running")
    config_map = kube.get("v1/configmaps", "default", "swap-config")
    assert config_map["immutable"] is True
    config = json.loads(config_map["data"]["config.json"])
    config["status"]["plan"]["noiseMultiplier"] = 0.25  # a quarter of the accounted noise
    edited = {"data": {"config.json": json.dumps(config)}}
    with pytest.raises(ApiError) as refused:  # immutable: the API server refuses the edit
        kube.merge_patch("v1/configmaps", "default", "swap-config", edited)
    assert refused.value.status == 422
    # Replaced instead: deleted and created again with the other σ.
    kube.delete("v1/configmaps", "default", "swap-config")
    replacement = {key: config_map[key] for key in ("apiVersion", "kind", "immutable")}
    replacement["metadata"] = {k: config_map["metadata"][k] for k in ("name", "labels",
                                                                      "ownerReferences")}
    replacement["data"] = edited["data"]
    kube.create("v1/configmaps", "default", replacement)
    final = wait_phase(kube, "swap", "Failed", timeout=20)
    mismatch = condition(final, "MechanismVerified")
    assert mismatch["reason"] == "MechanismMismatch"
    assert "status.plan.noiseMultiplier" in mismatch["message"]
    wait_for(lambda: kube.get("batch/v1/jobs", "default", "swap-train") is None,
             what="the workload deleted")


def test_a_report_and_a_spec_change_seen_together_keep_the_plan_and_observed_generation_moves(
        kube, kube_api, start_operator):
    first = start_operator()
    kube.create_job(job_manifest("both"))
    status = wait_phase(kube, "both", "Running")
    assert status["observedGeneration"] == 1
    first.kill()
    # While the operator is down: the first report (nothing charged yet) and a spec change
    # that may not happen once training has started.
    report(kube, "both", stepsCharged=4, step=4)
    kube.merge_patch(JOBS, "default", "both", {"spec": {"training": {"batchSize": 32}}})
    start_operator()
    final = wait_for(lambda: (s := status_of(kube, "both")).get("observedGeneration") == 2
                     and (s.get("privacy") or {}).get("stepsCharged") == 4 and s,
                     what="the change observed and the report charged",
                     describe=lambda: json.dumps(status_of(kube, "both")))
    refused = condition(final, "SpecAccepted")
    assert refused["status"] == "False" and refused["reason"] == "SpecChangeRefused"
    assert "spec.training.batchSize" in refused["message"]
    assert final["plan"] == status["plan"]  # not re-planned, the ledger not reset
    assert final["phase"] == "Running"
