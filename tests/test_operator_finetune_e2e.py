"""Fine-tuning jobs through the real operator over HTTP (kmock emulator): the pretrained
checkpoint's volume mounted read-only, the evaluation data's volume, the export setting, and
status.evaluation / status.artifacts / the eval gauge from the trainer's reports."""

from __future__ import annotations

import json

import kube_ledger
import kubernetes_validate
import pytest
from kube_samples import job_manifest
from kube_waiting import wait_for

pytestmark = pytest.mark.e2e

FINETUNE = {
    "model": {"preset": None, "pretrained": {
        "path": "gemma-tiny", "volume": {"claimName": "weights", "subPath": "models",
                                         "readOnly": False}}},
    "evaluation": {"data": {"path": "eval/held.jsonl", "volume": {"claimName": "eval-docs"}},
                   "intervalSteps": 5, "maxRows": 32},
    "checkpoint": {"path": "runs/ft", "volume": {"claimName": "ckpt", "subPath": "team"}},
}


def _trainer_job(kube, name):
    return wait_for(lambda: kube.get("batch/v1/jobs", "default", f"{name}-train"), timeout=60,
                    what=f"the trainer Job of {name}",
                    describe=lambda: repr((kube.get_job(name) or {}).get("status")))


def test_finetune_job_mounts_rewrites_and_reports(kube, start_operator):
    operator = start_operator()
    kube.create_job(job_manifest("ft", **FINETUNE))
    workload = _trainer_job(kube, "ft")
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    # Read-only even though the spec's volume says readOnly: false (weights are never written).
    assert volumes["pretrained"]["persistentVolumeClaim"] == {"claimName": "weights",
                                                              "readOnly": True}
    assert mounts["pretrained"] == {"name": "pretrained", "mountPath": "/pretrained",
                                    "readOnly": True, "subPath": "models"}
    assert volumes["eval-data"]["persistentVolumeClaim"] == {"claimName": "eval-docs",
                                                             "readOnly": True}
    assert mounts["eval-data"]["mountPath"] == "/eval-data"
    assert mounts["eval-data"]["readOnly"] is True
    # The automatic export is on by default (the operator configuration's trainer.export).
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DPTRAIN_EXPORT"] == "huggingface"
    clean = {k: v for k, v in workload.items() if k != "status"}
    clean["metadata"] = {k: workload["metadata"][k] for k in ("name", "namespace", "labels",
                                                              "annotations")}
    kubernetes_validate.validate(clean, "1.32", strict=True)
    # The trainer's config names the checkpoint and the evaluation data by their in-pod paths.
    config_map = kube.get("v1/configmaps", "default", "ft-config")
    config = json.loads(config_map["data"]["config.json"])
    assert config["spec"]["model"]["pretrained"] == {"format": "huggingface",
                                                     "path": "/pretrained/gemma-tiny"}
    assert config["spec"]["evaluation"]["data"]["path"] == "/eval-data/eval/held.jsonl"
    assert "volume" not in config["spec"]["evaluation"]["data"]

    # --- what the trainer reports: status.evaluation, the gauge, status.artifacts
    _reports_reach_status_and_metrics(kube, operator, "ft")


def test_export_can_be_turned_off_in_the_operator_config(kube, start_operator, tmp_path):
    config = tmp_path / "operator.yaml"
    config.write_text("trainer:\n  export: none\n")
    start_operator("--config", str(config))
    kube.create_job(job_manifest("noexport"))
    pod = _trainer_job(kube, "noexport")["spec"]["template"]["spec"]
    names = {e["name"] for e in pod["containers"][0]["env"]}
    assert "DPTRAIN_EXPORT" not in names


def _reports_reach_status_and_metrics(kube, operator, name):
    evaluation = {"step": 5, "loss": 2.5, "perplexity": 12.182493960703473, "rows": 32,
                  "tokens": 900, "source": "separate",
                  "privacy": "not covered by the job's (ε, δ)"}
    kube_ledger.report(kube, name, stepsCharged=5, step=5, loss=2.7,
                       evaluation=evaluation)
    status = wait_for(lambda: (kube_ledger.status_of(kube, name)
                               if kube_ledger.status_of(kube, name).get("evaluation")
                               else None), timeout=30, what="status.evaluation")
    assert status["evaluation"] == evaluation
    assert status["privacy"]["stepsCharged"] == 5  # evaluation charges nothing beyond the steps
    labels = f'{{name="{name}",namespace="default"}}'
    metrics = wait_for(lambda: (m if f"dptrain_job_eval_loss{labels}"
                                in (m := operator.metrics()) else None),
                       timeout=30, what="the eval gauge")
    assert f"dptrain_job_eval_loss{labels} 2.5\n" in metrics
    assert f"dptrain_job_eval_perplexity{labels} 12.18" in metrics

    # The final report names the outputs by their in-pod paths; the status says where they lie.
    kube_ledger.report(kube, name, stepsCharged=5, step=5, artifacts={
        "checkpoint": "/checkpoints/runs/ft", "export": "/checkpoints/runs/ft/export",
        "report": "/checkpoints/runs/ft/report.json"})
    status = wait_for(lambda: (kube_ledger.status_of(kube, name)
                               if kube_ledger.status_of(kube, name).get("artifacts")
                               else None), timeout=30, what="status.artifacts")
    assert status["artifacts"] == {"checkpoint": "pvc://ckpt/team/runs/ft",
                                   "export": "pvc://ckpt/team/runs/ft/export",
                                   "report": "pvc://ckpt/team/runs/ft/report.json"}
    # A later progress report without them keeps them (the latest known).
    kube_ledger.report(kube, name, stepsCharged=6, step=6, loss=2.6)
    wait_for(lambda: kube_ledger.charged(kube, name) >= 6 or None, timeout=30,
             what="6 steps charged")
    status = kube_ledger.status_of(kube, name)
    assert status["evaluation"] == evaluation
    assert status["artifacts"]["export"] == "pvc://ckpt/team/runs/ft/export"
