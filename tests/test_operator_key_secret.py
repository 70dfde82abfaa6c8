"""The job's secret key on Kubernetes (issue 10): an immutable owned Secret, mounted read-only."""

from __future__ import annotations

import base64
import json
import os

import kubernetes_validate
from kube_samples import job_manifest

from dptrain.api import KEY_PATH, PlanStatus, parse_job
from dptrain.operator import JobRef, PodSizing, build_prepare_job, build_role, build_trainer_job
from dptrain.operator._children import (
    build_config_map,
    build_key_secret,
    key_secret_name,
)
from dptrain.operator._workloads import (
    build_jobset,
)

JOB = JobRef(name="tiny", namespace="research", uid="0b6c3c1e-0000-4000-8000-000000000001")
PLAN = PlanStatus(
    model_preset="tiny", model_params=90624, batch_size=64, iterations=1000,
    noise_multiplier=1.0, noise_batch_ratio=1 / 64, sampling_rate=0.032,
    physical_batch_size=128, dataset_size=2000, sequence_length=64, clip_norm=1.0,
    learning_rate=3e-3, compute_flops=2.2e12, hosts=2, chips_per_host=0, max_steps=31,
    epsilon_planned=1.99, accountant="rdp", spec_generation=1)


def _spec():
    return parse_job(job_manifest("tiny", namespace="research")).spec


def test_key_secret_is_immutable_labelled_owned_and_holds_the_key():
    key = os.urandom(32)
    secret = build_key_secret(JOB, key)
    kubernetes_validate.validate(secret, "1.32", strict=True)
    assert secret["immutable"] is True and secret["type"] == "Opaque"
    assert base64.b64decode(secret["data"]["key"]) == key
    meta = secret["metadata"]
    assert meta["labels"]["dptrain.io/job"] == "tiny"
    assert meta["ownerReferences"][0]["uid"] == JOB.uid
    # A job re-created under the same name (new uid) never inherits the old key.
    other = JobRef(name="tiny", namespace="research", uid="ffffffff-0000-4000-8000-000000000001")
    assert key_secret_name(other) != meta["name"] and len(meta["name"]) <= 63


def test_trainer_pods_mount_the_key_read_only_and_never_see_it_in_env_or_config():
    spec = _spec()
    for workload in (build_trainer_job(spec, JOB, PLAN, PodSizing(hosts=2)),
                     build_jobset(spec, JOB, PLAN, PodSizing(hosts=2))):
        text = json.dumps(workload)
        template = (workload["spec"].get("template")
                    or workload["spec"]["replicatedJobs"][0]["template"]["spec"]["template"])
        pod = template["spec"]
        (volume,) = [v for v in pod["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == key_secret_name(JOB)
        assert volume["secret"]["defaultMode"] & 0o077 == 0o040  # group (fsGroup) read only
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] is True and KEY_PATH.startswith(mount["mountPath"] + "/")
        assert container["command"][-2:] == ["--key-file", KEY_PATH]
        assert "secretKeyRef" not in text and "envFrom" not in text
    # Data preparation has no use for the key: not mounted there.
    assert "secret" not in json.dumps(build_prepare_job(spec, JOB)["spec"]["template"])
    assert "key-" not in json.dumps(build_config_map(spec, JOB, PLAN, None)["data"])


def test_no_role_the_operator_creates_grants_anything_on_secrets():
    for rule in build_role(JOB)["rules"]:
        assert not any(r.startswith("secrets") for r in rule["resources"])
