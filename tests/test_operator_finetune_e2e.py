"""Fine-tuning jobs through the real operator over HTTP (kmock emulator): the pretrained
checkpoint's volume mounted read-only, the evaluation data's volume, the export setting, and
status.evaluation / status.artifacts / the eval gauge from the trainer's reports."""

from __future__ import annotations

import json

import kube_ledger
import kubernetes_validate
import pytest
from kube_kubelet import finish_job
from kube_pods import run_pod, stop
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


def _report_pretrained(kube, name):
    """What the data-preparation pod reports (test_operator_pretrained_plan runs the real one):
    the shape of a VaultGemma-like checkpoint."""
    from dptrain.planner import ModelShape, pretrained_status

    shape = ModelShape(name="hf-vaultgemma", vocab_size=259, d_model=64, n_layers=2, n_heads=4,
                       n_kv_heads=2, head_dim=16, d_ff=128, max_seq_len=128)
    wait_for(lambda: kube.get("batch/v1/jobs", "default", f"{name}-prepare"), timeout=60,
             what=f"the data-preparation Job of {name}")
    report = pretrained_status(shape, model_type="vaultgemma", path="/pretrained/gemma-tiny",
                               config_checksum="sha256:" + "0" * 64)
    kube.merge_patch(kube_ledger.JOBS, "default", name, {"status": {
        "pretrained": report.model_dump(mode="json", by_alias=True)}}, "status")
    finish_job(kube, f"{name}-prepare", 0)
    return shape


def test_finetune_job_mounts_rewrites_and_reports(kube, start_operator):
    operator = start_operator()
    kube.create_job(job_manifest("ft", **FINETUNE))
    shape = _report_pretrained(kube, "ft")
    workload = _trainer_job(kube, "ft")
    # kopf patches the status when the handler returns, just after the Job is created: poll.
    plan = wait_for(lambda: kube_ledger.status_of(kube, "ft").get("plan"), timeout=30,
                    what="the plan in the job's status")
    assert (plan["modelPreset"], plan["modelParams"]) == ("hf-vaultgemma", shape.param_count)
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


def _halt_at_max_steps(kube, name):
    """Report what an honest trainer reports up to the plan's maximum: the operator halts."""
    plan = wait_for(lambda: kube_ledger.status_of(kube, name).get("plan"), timeout=60,
                    what=f"the plan of {name}")
    kube_ledger.report(kube, name, stepsCharged=plan["maxSteps"], step=plan["maxSteps"],
                       loss=3.0)
    return wait_for(lambda: (s if (s := kube_ledger.status_of(kube, name)).get("phase")
                             == "BudgetExhausted" else None), timeout=60,
                    what=f"{name} halted", describe=lambda: repr(kube_ledger.status_of(kube, name)))


@pytest.mark.slow
def test_finished_job_is_exported_by_the_export_job(kube, kube_api, start_operator, tmp_path,
                                                    micro_config):
    """The export step for real: the operator's export Job runs `dptrain export` on the final
    checkpoint (a micro model trained here, on the emulated checkpoint volume), the pod
    reports status.progress.artifacts, the status says where the export lies, and
    transformers loads it with our logits."""
    from dptrain.trainer import train

    start_operator()
    kube.create_job(job_manifest("exp", checkpoint=FINETUNE["checkpoint"]))
    _trainer_job(kube, "exp")
    # What the trainer left on the checkpoint volume (in-pod /checkpoints/runs/ft).
    volume = tmp_path / "export-pod" / "checkpoints"
    train(micro_config(iterations=2, checkpoint_interval=2,
                       checkpoint_dir=volume / "runs" / "ft", output_dir=volume / "runs" / "ft"))
    _halt_at_max_steps(kube, "exp")
    export = _export_job(kube, "exp")
    assert export["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "dptrain", "export", "/checkpoints/runs/ft", "--format", "huggingface", "--output",
        "/checkpoints/runs/ft/export", "--overwrite", "--report", "kubernetes"]
    mounted = {m["mountPath"] for m in export["spec"]["template"]["spec"]["containers"][0][
        "volumeMounts"]}
    assert "/var/run/secrets/dptrain.io" not in mounted  # the export never sees the key
    pod = run_pod(kube, kube_api, "exp-export", tmp_path / "export-pod")
    try:
        assert pod.wait(240) == 0, (tmp_path / "export-pod" / "exp-export.log").read_text()
    finally:
        stop(pod)
    def exported():
        status = kube_ledger.status_of(kube, "exp")
        done = any(c["type"] == "Exported" and c["status"] == "True"
                   for c in status.get("conditions", []))
        return status if done else None

    status = wait_for(exported, timeout=60, what="Exported=True",
                      describe=lambda: repr(kube_ledger.status_of(kube, "exp")))
    # The pod reports its own paths (here the harness's local mapping of /checkpoints; in a
    # cluster they are located as pvc://CLAIM/PATH, as test_finetune_job_... checks).
    assert status["artifacts"]["export"] == str(volume / "runs" / "ft" / "export")
    assert status["artifacts"]["checkpoint"] == str(volume / "runs" / "ft")
    assert status["phase"] == "BudgetExhausted"
    wait_for(lambda: kube.get("batch/v1/jobs", "default", "exp-export") is None or None,
             timeout=30, what="the finished export Job deleted")

    # The export is a Hugging Face model with our logits.
    import torch
    import transformers

    from dptrain.trainer._export import load_checkpoint_model
    out = volume / "runs" / "ft" / "export"
    assert (out / "README.md").read_text().count("ε") >= 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ours, _ = load_checkpoint_model(volume / "runs" / "ft")
    ids = [1, 40, 50, 60, 70, 80, 90, 100]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    import numpy as np
    np.testing.assert_allclose(np.asarray(ours(np.asarray(ids))), theirs, atol=1e-4, rtol=0)


def _export_job(kube, name):
    return wait_for(lambda: kube.get("batch/v1/jobs", "default", f"{name}-export"), timeout=60,
                    what=f"the export Job of {name}",
                    describe=lambda: repr(kube_ledger.status_of(kube, name)))


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
