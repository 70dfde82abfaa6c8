"""Object-storage URIs through the real operator: credentials reach the pods, nothing else does.

A job whose data and checkpoints are ``s3://``/``gs://`` URIs gets pods with no volume for them,
the ``secretRef`` as ``envFrom`` (or a GCP key file mounted and named by
``GOOGLE_APPLICATION_CREDENTIALS``), and a ConfigMap and status that never name the Secret.
"""

from __future__ import annotations

import base64
import json
import os

import kubernetes_validate
import pytest
from kube_samples import job_manifest
from kube_waiting import wait_for

from dptrain.api import CHECKPOINT_MOUNT, STORAGE_SECRET_DIR

pytestmark = pytest.mark.e2e
BUCKET = "dptrain-test"  # conftest.S3_TEST_BUCKET

S3_SPEC = {
    "data": {"builtin": None, "uri": "s3://corpus-bucket/docs/", "secretRef": {"name": "s3-creds"}},
    "checkpoint": {"uri": "s3://ckpt-bucket/runs/s3job", "secretRef": {"name": "s3-creds"}},
}


def _job(kube, name):
    return wait_for(lambda: kube.get("batch/v1/jobs", "default", name), timeout=30.0,
                    what=f"Job {name}")


def _validate(obj):
    clean = {k: v for k, v in obj.items() if k != "status"}
    meta = clean["metadata"]
    clean["metadata"] = {k: meta[k] for k in ("name", "namespace", "labels", "annotations",
                                               "ownerReferences") if k in meta}
    kubernetes_validate.validate(clean, "1.32", strict=True)


def test_s3_job_pods_get_the_secret_as_env_and_no_volume_for_the_uris(kube, start_operator):
    start_operator()
    kube.create_job(job_manifest("s3job", **S3_SPEC))
    kube.create_job(job_manifest("s3prep", **{**S3_SPEC, "data": {
        **S3_SPEC["data"], "numSequences": None}}))
    for name in ("s3job-train", "s3prep-prepare"):
        workload = _job(kube, name)
        _validate(workload)
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]  # once, not twice
        assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
        # The checkpoint mount is scratch only (orbax stages there before the upload).
        [scratch] = [v for v in pod["volumes"] if v["name"] == "checkpoints"]
        assert scratch == {"name": "checkpoints", "emptyDir": {}}
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {CHECKPOINT_MOUNT}
        assert not any(e["name"].startswith("AWS_") for e in container["env"])
    config_map = kube.get("v1/configmaps", "default", "s3job-config")
    text = json.dumps(config_map)
    assert "s3-creds" not in text and "secretRef" not in text
    config = json.loads(config_map["data"]["config.json"])
    assert config["spec"]["data"]["uri"] == "s3://corpus-bucket/docs/"
    assert config["spec"]["checkpoint"] == {"uri": "s3://ckpt-bucket/runs/s3job",
                                            "path": CHECKPOINT_MOUNT,  # the scratch (emptyDir)
                                            "intervalSteps": 100, "keep": 3}
    job = wait_for(lambda: (j := kube.get_job("s3job")) and j.get("status", {}).get("plan") and j,
                   timeout=30.0, what="s3job planned")
    assert "s3-creds" not in json.dumps(job["status"])


def test_gcs_key_file_is_mounted_and_named_not_put_in_the_environment(kube, start_operator):
    start_operator()
    ref = {"name": "gcs-sa", "keyFile": "key.json"}
    kube.create_job(job_manifest("gcsjob", data={"builtin": None, "uri": "gs://corpus-bucket/d",
                                                 "secretRef": ref},
                                 checkpoint={"uri": "gs://ckpt-bucket/gcsjob", "secretRef": ref}))
    workload = _job(kube, "gcsjob-train")
    _validate(workload)
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "envFrom" not in container
    [volume] = [v for v in pod["volumes"] if v["name"] == "storage-credentials"]
    assert volume["secret"]["secretName"] == "gcs-sa"
    assert volume["secret"]["items"] == [{"key": "key.json", "path": "key.json"}]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "storage-credentials"]
    assert mount == {"name": "storage-credentials", "mountPath": STORAGE_SECRET_DIR,
                     "readOnly": True}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == f"{STORAGE_SECRET_DIR}/key.json"


def test_a_bad_uri_fails_the_job_naming_the_field(kube, start_operator):
    start_operator()
    kube.create_job(job_manifest("badbucket", checkpoint={"uri": "s3://Bad_Bucket/x"}))
    job = wait_for(lambda: (j := kube.get_job("badbucket")) and
                   j.get("status", {}).get("phase") == "Failed" and j,
                   timeout=30.0, what="badbucket failed")
    messages = " ".join(c.get("message", "") for c in job["status"].get("conditions", []))
    assert "spec.checkpoint.uri" in messages and "bucket" in messages
    assert kube.get("batch/v1/jobs", "default", "badbucket-train") is None


@pytest.mark.slow
def test_real_pods_read_s3_with_the_secret_and_checkpoint_there(kube, kube_api, start_operator,
                                                               s3_server, tmp_path, monkeypatch):
    """The data-preparation and trainer pods run as local processes (the test plays the kubelet):
    their only S3 credentials are the Secret's keys, which they get through envFrom."""
    from kube_kubelet import Kubelet

    client, s3_env = s3_server
    for key in list(os.environ):
        if key.startswith("AWS_"):  # nothing but the Secret may give the pods credentials
            monkeypatch.delenv(key)
    lines = [json.dumps({"text": f"record {i}: " + "private words " * (3 + i % 7)})
             for i in range(300)]
    client.put_object(Bucket=BUCKET, Key="e2e/corpus/docs.jsonl", Body="\n".join(lines).encode())
    kube.create("v1/secrets", "default", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in s3_env.items()}})
    start_operator("--stall-timeout", "600")
    name = "s3e2e"
    ref = {"name": "s3-creds"}
    kube.create_job(job_manifest(
        name, data={"builtin": None, "uri": f"s3://{BUCKET}/e2e/corpus", "secretRef": ref,
                    "numSequences": None, "sequenceLength": 32},
        training={"batchSize": 16, "iterations": 4, "noiseMultiplier": 1.0},
        checkpoint={"uri": f"s3://{BUCKET}/e2e/ckpt", "secretRef": ref, "intervalSteps": 2}))
    kubelet = Kubelet(kube, kube_api.url, tmp_path / "kubelet")
    try:
        _job(kube, f"{name}-prepare")
        prepare = kubelet.run(f"{name}-prepare")
        assert prepare.process.wait(240) == 0, prepare.log()
        job = wait_for(lambda: (j := kube.get_job(name)) and j["status"].get("plan") and j,
                       what="planning after data preparation", timeout=120)
        _job(kube, f"{name}-train")
        trainer = kubelet.run(f"{name}-train", extra_args=("--metrics-port", "0"))
        assert trainer.process.wait(300) == 0, trainer.log()
    finally:
        kubelet.stop_all()
    # Data preparation published the sequences beside the checkpoints; the trainer fetched them
    # instead of tokenizing the corpus again.
    assert job["status"]["dataset"]["location"] == f"s3://{BUCKET}/e2e/ckpt/prepared"
    assert "tokenizing" in prepare.log() and "tokenizing" not in trainer.log(100_000)
    checksum = job["status"]["dataset"]["checksum"]
    progress = kube.get_job(name)["status"]["progress"]
    assert progress["stepsCharged"] == 4 and progress["mechanism"]["datasetChecksum"] == checksum
    found = client.list_objects_v2(Bucket=BUCKET, Prefix="e2e/ckpt/")["Contents"]
    keys = {o["Key"].removeprefix("e2e/ckpt/") for o in found}
    assert {"2/_DPTRAIN_COMMITTED", "4/_DPTRAIN_COMMITTED", "ledger.json", "metrics.jsonl",
            "report.json", "prepared/manifest.json", "prepared/sequences.npy"} <= keys
    ledger = json.loads(client.get_object(Bucket=BUCKET, Key="e2e/ckpt/ledger.json")["Body"]
                        .read())
    assert ledger["steps_charged"] == 4
    # The spec names the Secret (the user wrote it); what the operator publishes does not, and
    # its values appear nowhere.
    job = kube.get_job(name)
    derived = json.dumps([job["status"], kube.list("v1/configmaps", "default")])
    assert "s3-creds" not in derived
    for value in (s3_env["AWS_SECRET_ACCESS_KEY"], s3_env["AWS_ACCESS_KEY_ID"]):
        assert value not in json.dumps([job, kube.list("v1/configmaps", "default"),
                                        kube.list("v1/events", "default")])
