"""spec.podTemplateOverrides: validated against Kubernetes' schemas, applied last, owned fields
refused by name; a given serviceAccountName gets the job's status Role (cloud identity)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
from kube_client import ApiError
from kube_samples import job_manifest
from kube_waiting import wait_for

from dptrain.api import InvalidJobError, PlanStatus, _crd, load_job, parse_job, semantic_errors
from dptrain.api._pod_overrides import (
    OPERATOR_ENV,
    OPERATOR_MOUNTS,
    OPERATOR_VOLUMES,
    RESERVED_KEY_PREFIXES,
    RESERVED_KEYS,
)
from dptrain.operator import JobRef, PodSizing
from dptrain.operator._children import build_role_binding, labels
from dptrain.operator._overrides import apply_overrides
from dptrain.operator._workloads import build_jobset, build_prepare_job, build_trainer_job

ROOT = Path(__file__).resolve().parent.parent
JOB = JobRef(name="ov", namespace="research", uid="0b6c3c1e-0000-4000-8000-0000000000aa")
PLAN = PlanStatus(
    model_preset="tiny",
    model_params=90624,
    batch_size=64,
    iterations=1000,
    noise_multiplier=1.0,
    noise_batch_ratio=1 / 64,
    sampling_rate=0.032,
    physical_batch_size=128,
    dataset_size=2000,
    sequence_length=64,
    clip_norm=1.0,
    learning_rate=3e-3,
    compute_flops=2.2e12,
    hosts=2,
    chips_per_host=8,
    max_steps=31,
    epsilon_planned=1.99,
    accountant="rdp",
    spec_generation=1,
)
GPU = PodSizing(
    hosts=2,
    resources={
        "requests": {"nvidia.com/gpu": "8", "cpu": "90", "memory": "900Gi"},
        "limits": {"nvidia.com/gpu": "8", "memory": "900Gi"},
    },
    tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
)

# What a platform team sets on EKS: IRSA, a node group, a priority, S3 credentials via env, a
# scratch volume, more memory than the planner asked for, a non-default user.
OVERRIDES = {
    "metadata": {
        "labels": {"team": "nlp", "cost-center": "c42"},
        "annotations": {"karpenter.sh/do-not-disrupt": "true"},
    },
    "spec": {
        "nodeSelector": {"eks.amazonaws.com/nodegroup": "p5-training"},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "topology.kubernetes.io/zone",
                                    "operator": "In",
                                    "values": ["us-east-1a"],
                                }
                            ]
                        }
                    ]
                }
            }
        },
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}
        ],
        "priorityClassName": "training-high",
        "imagePullSecrets": [{"name": "ecr-mirror"}],
        "serviceAccountName": "dptrain-irsa",
        "volumes": [
            {
                "name": "scratch",
                "ephemeral": {
                    "volumeClaimTemplate": {
                        "spec": {
                            "accessModes": ["ReadWriteOnce"],
                            "storageClassName": "gp3",
                            "resources": {"requests": {"storage": "500Gi"}},
                        }
                    }
                },
            },
            {"name": "s3-config", "configMap": {"name": "s3-endpoints"}},
        ],
        "containers": [
            {
                "name": "trainer",
                "env": [
                    {"name": "AWS_REGION", "value": "us-east-1"},
                    {"name": "HOME", "value": "/scratch/home"},
                    {
                        "name": "AWS_ACCESS_KEY_ID",
                        "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}},
                    },
                ],
                "envFrom": [{"configMapRef": {"name": "proxy-env"}}],
                "volumeMounts": [
                    {"name": "scratch", "mountPath": "/scratch"},
                    {"name": "s3-config", "mountPath": "/etc/s3", "readOnly": True},
                ],
                "resources": {
                    "requests": {"memory": "1000Gi", "vpc.amazonaws.com/efa": "32"},
                    "limits": {"memory": "1000Gi", "vpc.amazonaws.com/efa": "32"},
                },
                "securityContext": {"runAsUser": 2000, "capabilities": {"drop": ["NET_RAW"]}},
            },
            {"name": "prepare", "resources": {"requests": {"cpu": "4"}}},
        ],
    },
}


def spec(overrides=OVERRIDES, **fields):
    return parse_job(
        job_manifest("ov", namespace="research", podTemplateOverrides=overrides, **fields)
    ).spec


def validate(workload):
    """kubernetes-validate (strict) on a Job, or on the Job template of a JobSet."""
    if workload["kind"] == "JobSet":
        workload = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": workload["metadata"]["name"]},
            "spec": workload["spec"]["replicatedJobs"][0]["template"]["spec"],
        }
    kubernetes_validate.validate(workload, "1.32", strict=True)


def pod_of(workload):
    if workload["kind"] == "JobSet":
        return workload["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    return workload["spec"]["template"]


def test_overrides_reach_trainer_pods_last_and_stay_valid_kubernetes():
    s = spec()
    plain = build_trainer_job(s, JOB, PLAN, GPU)
    for workload in (build_trainer_job(s, JOB, PLAN, GPU), build_jobset(s, JOB, PLAN, GPU)):
        out = apply_overrides(workload, s.pod_template_overrides)
        validate(out)
        template = pod_of(out)
        assert template["metadata"]["labels"] == {
            **labels(JOB, "trainer"),
            "team": "nlp",
            "cost-center": "c42",
        }
        assert template["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
        pod = template["spec"]
        assert pod["nodeSelector"] == {"eks.amazonaws.com/nodegroup": "p5-training"}
        assert pod["affinity"] == OVERRIDES["spec"]["affinity"]
        assert pod["tolerations"] == [dict(GPU.tolerations[0]), OVERRIDES["spec"]["tolerations"][0]]
        assert pod["priorityClassName"] == "training-high"
        assert pod["serviceAccountName"] == "dptrain-irsa"
        assert pod["imagePullSecrets"] == [{"name": "ecr-mirror"}]
        assert [v["name"] for v in pod["volumes"]][-2:] == ["scratch", "s3-config"]
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["HOME"]["value"] == "/scratch/home"  # an operator default, replaced
        assert env["DPTRAIN_REPORT"]["value"] == "kubernetes"  # the contract, untouched
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3"
        assert container["envFrom"] == [{"configMapRef": {"name": "proxy-env"}}]
        assert container["volumeMounts"][-2:] == OVERRIDES["spec"]["containers"][0]["volumeMounts"]
        # Planner's resources replaced entry by entry: memory and EFA from the override,
        # the GPUs and CPU from the planner.
        assert container["resources"] == {
            "requests": {
                "nvidia.com/gpu": "8",
                "cpu": "90",
                "memory": "1000Gi",
                "vpc.amazonaws.com/efa": "32",
            },
            "limits": {"nvidia.com/gpu": "8", "memory": "1000Gi", "vpc.amazonaws.com/efa": "32"},
        }
        context = container["securityContext"]
        assert context["runAsUser"] == 2000
        assert context["capabilities"]["drop"] == ["ALL", "NET_RAW"]
        assert context["allowPrivilegeEscalation"] is False and context["runAsNonRoot"] is True
        # What the operator owns is unchanged.
        original = pod_of(plain)["spec"]["containers"][0]
        assert container["command"] == original["command"]
        assert container["image"] == original["image"]
    assert pod_of(plain)["spec"]["serviceAccountName"] == "ov-trainer"  # input not mutated


def test_prepare_pod_gets_the_trainer_entry_but_its_own_resources():
    s = spec()
    out = apply_overrides(build_prepare_job(s, JOB), s.pod_template_overrides)
    validate(out)
    (container,) = out["spec"]["template"]["spec"]["containers"]
    assert {"AWS_REGION", "AWS_ACCESS_KEY_ID"} <= {e["name"] for e in container["env"]}
    assert container["envFrom"] == [{"configMapRef": {"name": "proxy-env"}}]
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "2Gi"}
    assert "vpc.amazonaws.com/efa" not in str(container["resources"])
    assert out["spec"]["template"]["spec"]["serviceAccountName"] == "dptrain-irsa"


def test_a_given_service_account_gets_the_status_role():
    binding = build_role_binding(JOB, "dptrain-irsa")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "dptrain-irsa", "namespace": "research"}
    ]
    assert build_role_binding(JOB)["subjects"][0]["name"] == "ov-trainer"


def _container(**fields):
    return {"spec": {"containers": [{"name": "trainer", **fields}]}}


BAD = [
    (
        _container(command=["sh"]),
        "spec.podTemplateOverrides.spec.containers[0].command",
        "owned by the operator",
    ),
    (
        _container(args=["-c"]),
        "spec.podTemplateOverrides.spec.containers[0].args",
        "owned by the operator",
    ),
    (
        _container(image="evil:1"),
        "spec.podTemplateOverrides.spec.containers[0].image",
        "spec.image",
    ),
    (
        {"spec": {"restartPolicy": "Always"}},
        "spec.podTemplateOverrides.spec.restartPolicy",
        "owned by the operator",
    ),
    (
        _container(env=[{"name": "JAX_PROCESS_ID", "value": "0"}]),
        "spec.podTemplateOverrides.spec.containers[0].env",
        "[0].name: JAX_PROCESS_ID",
    ),
    (
        _container(env=[{"name": "A", "value": "1"}, {"name": "DPTRAIN_API_SERVER", "value": "x"}]),
        "spec.podTemplateOverrides.spec.containers[0].env",
        "[1].name: DPTRAIN_API_SERVER",
    ),
    (
        _container(env=[{"name": "A", "valu": "1"}]),
        "spec.podTemplateOverrides.spec.containers[0].env[0]",
        "valu: is not a known field",
    ),
    (
        _container(volumeMounts=[{"name": "config", "mountPath": "/x"}]),
        "spec.podTemplateOverrides.spec.containers[0].volumeMounts",
        "'config'",
    ),
    (
        _container(volumeMounts=[{"name": "v", "mountPath": "/var/run/secrets/dptrain.io/k"}]),
        "spec.podTemplateOverrides.spec.containers[0].volumeMounts",
        "operator's mount",
    ),
    (
        _container(resources={"limits": {"cpu": [2]}}),
        "spec.podTemplateOverrides.spec.containers[0].resources",
        "limits.cpu",
    ),
    (
        _container(securityContext={"privileged": True}),
        "spec.podTemplateOverrides.spec.containers[0].securityContext",
        "privileged",
    ),
    (
        _container(securityContext={"runAsUser": 0}),
        "spec.podTemplateOverrides.spec.containers[0].securityContext",
        "runAsUser",
    ),
    (
        _container(securityContext={"capabilities": {"add": ["SYS_ADMIN"]}}),
        "spec.podTemplateOverrides.spec.containers[0].securityContext",
        "capabilities.add",
    ),
    (
        {"spec": {"containers": [{"name": "sidecar"}]}},
        "spec.podTemplateOverrides.spec.containers[0].name",
        "'trainer'",
    ),
    (
        {"spec": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}},
        "spec.podTemplateOverrides.spec.volumes",
        "hostPath",
    ),
    (
        {"spec": {"volumes": [{"name": "job-key", "emptyDir": {}}]}},
        "spec.podTemplateOverrides.spec.volumes",
        "'job-key'",
    ),
    (
        {
            "spec": {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": "zone-a"
                        }
                    }
                }
            }
        },
        "spec.podTemplateOverrides.spec.affinity",
        "nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms",
    ),
    (
        {"spec": {"tolerations": [{"key": "a", "operatr": "Exists"}]}},
        "spec.podTemplateOverrides.spec.tolerations[0]",
        "operatr: is not a known field",
    ),
    (
        {"spec": {"hostNetwork": True}},
        "spec.podTemplateOverrides.spec.hostNetwork",
        "is not a known field",
    ),
    (
        {"metadata": {"labels": {"dptrain.io/job": "other"}}},
        "spec.podTemplateOverrides.metadata.labels",
        "dptrain.io/job",
    ),
    (
        {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "q"}}},
        "spec.podTemplateOverrides.metadata.labels",
        "DPTrainingJob's metadata.labels",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "field", "rule"),
    BAD,
    ids=[b[1].rsplit(".", 1)[-1] + f"-{i}" for i, b in enumerate(BAD)],
)
def test_bad_overrides_are_refused_naming_the_field(overrides, field, rule):
    with pytest.raises(InvalidJobError) as caught:
        spec(overrides)
    lines = caught.value.lines
    assert any(line.startswith(field + ":") and rule in line for line in lines), lines


def test_a_mount_of_an_undeclared_volume_is_a_semantic_error():
    s = spec(_container(volumeMounts=[{"name": "nowhere", "mountPath": "/x"}]))
    (error,) = semantic_errors(s)
    assert error.field == "spec.podTemplateOverrides.spec.containers[0].volumeMounts[0].name"
    assert "'nowhere'" in error.rule


def test_the_reserved_names_cover_what_the_builders_use():
    s = parse_job(
        job_manifest(
            "ov",
            data={"volume": {"claimName": "docs"}, "path": "d", "builtin": None},
            checkpoint={"volume": {"claimName": "ck"}, "path": "c"},
        )
    ).spec
    for workload in (build_trainer_job(s, JOB, PLAN, GPU), build_prepare_job(s, JOB)):
        pod = workload["spec"]["template"]["spec"]
        assert {v["name"] for v in pod["volumes"]} <= OPERATOR_VOLUMES
        (container,) = pod["containers"]
        assert {m["mountPath"] for m in container["volumeMounts"]} <= set(OPERATOR_MOUNTS)
        contract = {
            e["name"] for e in container["env"] if e["name"].startswith(("DPTRAIN_", "JAX_"))
        }
        assert contract <= OPERATOR_ENV
        for key in workload["spec"]["template"]["metadata"]["labels"]:
            assert key in RESERVED_KEYS or key.startswith(RESERVED_KEY_PREFIXES)


def test_the_crd_carries_the_kubernetes_schemas():
    schema = _crd.validating_schema(strict=True)
    validator = jsonschema.Draft4Validator(schema)
    good = job_manifest("ov", podTemplateOverrides=OVERRIDES)
    assert list(validator.iter_errors(good)) == []
    crd_spec = _crd.crd_schema()["properties"]["spec"]["properties"]["podTemplateOverrides"]
    container = crd_spec["properties"]["spec"]["properties"]["containers"]["items"]
    assert "command" not in container["properties"]  # refused as an unknown field
    quantity = container["properties"]["resources"]["properties"]["limits"]["additionalProperties"]
    assert quantity == {"x-kubernetes-int-or-string": True}
    for bad, where in [
        (_container(command=["sh"]), "command"),
        (
            {
                "spec": {
                    "affinity": {
                        "nodeAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": {"weight": 1}
                        }
                    }
                }
            },
            "preferredDuringSchedulingIgnoredDuringExecution",
        ),
    ]:
        errors = list(validator.iter_errors(job_manifest("ov", podTemplateOverrides=bad)))
        assert errors and any(where in (str(list(e.absolute_path)) + e.message) for e in errors), (
            errors
        )


def test_vendored_schemas_match_kubernetes_validate():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/vendor-pod-schemas.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_the_cli_validates_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    import yaml

    path.write_text(
        yaml.safe_dump(
            job_manifest(
                "ov",
                podTemplateOverrides=_container(env=[{"name": "JAX_NUM_PROCESSES", "value": "9"}]),
            )
        )
    )
    with pytest.raises(
        InvalidJobError,
        match=r"containers\[0\]\.env: \[0\]\.name: "
        "JAX_NUM_PROCESSES",
    ):
        load_job(path)


# ------------------------------------------------------------------------------ over HTTP


@pytest.mark.e2e
def test_operator_applies_overrides_and_binds_the_given_account(kube, start_operator):
    start_operator()
    kube.create_job(job_manifest("irsa", podTemplateOverrides=OVERRIDES))
    # Data preparation first (no numSequences): its pod gets the overrides too.
    kube.create_job(
        job_manifest("irsaprep", podTemplateOverrides=OVERRIDES, data={"numSequences": None})
    )
    # Refused by the API server's schema (the emulator applies the generated CRD): 422 naming
    # the field; nothing is stored.
    with pytest.raises(ApiError) as refused:
        kube.create_job(job_manifest("cmd", podTemplateOverrides=_container(command=["sh"])))
    assert refused.value.status == 422 and "command" in str(refused.value.body)
    # Passes the schema but breaks the pod contract: the operator fails it, naming the field.
    kube.create_job(
        job_manifest(
            "wiring",
            podTemplateOverrides=_container(
                env=[{"name": "JAX_COORDINATOR_ADDRESS", "value": "evil:1"}]
            ),
        )
    )

    job = wait_for(
        lambda: kube.get("batch/v1/jobs", "default", "irsa-train"),
        what="the trainer Job",
        describe=lambda: repr(kube.get_job("irsa")),
    )
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "dptrain-irsa"
    assert pod["nodeSelector"] == {"eks.amazonaws.com/nodegroup": "p5-training"}
    assert pod["priorityClassName"] == "training-high"
    assert job["spec"]["template"]["metadata"]["labels"]["team"] == "nlp"
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["memory"] == "1000Gi"
    assert {"name": "scratch", "mountPath": "/scratch"} in container["volumeMounts"]
    clean = {k: v for k, v in job.items() if k != "status"}
    clean["metadata"] = {k: job["metadata"][k] for k in ("name", "namespace", "labels")}
    kubernetes_validate.validate(clean, "1.32", strict=True)
    # The status Role is bound to the pods' own account; no per-job account is made.
    binding = kube.get("rbac.authorization.k8s.io/v1/rolebindings", "default", "irsa-trainer")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "dptrain-irsa", "namespace": "default"}
    ]
    assert kube.get("v1/serviceaccounts", "default", "irsa-trainer") is None

    prep = wait_for(
        lambda: kube.get("batch/v1/jobs", "default", "irsaprep-prepare"),
        what="the data-preparation Job",
    )
    (prep_container,) = prep["spec"]["template"]["spec"]["containers"]
    assert prep_container["resources"]["requests"]["cpu"] == "4"
    assert "AWS_REGION" in {e["name"] for e in prep_container["env"]}

    failed = wait_for(
        lambda: (
            (j := kube.get_job("wiring")) and (j.get("status") or {}).get("phase") == "Failed" and j
        ),
        what="wiring Failed",
    )
    message = (
        failed["status"]["message"]
        if "message" in failed["status"]
        else str(failed["status"]["conditions"])
    )
    assert (
        "spec.podTemplateOverrides.spec.containers[0].env: [0].name: JAX_COORDINATOR_ADDRESS"
    ) in message
    assert kube.get("batch/v1/jobs", "default", "wiring-train") is None


def test_the_embedded_kubernetes_schemas_are_structural():
    """What the API server requires of a CRD schema: every node typed (or int-or-string),
    arrays with items, no $ref/oneOf/nullable-type lists, objects with properties or a map."""
    root = _crd.crd_schema()["properties"]["spec"]["properties"]["podTemplateOverrides"]
    seen = 0

    def walk(node, path):
        nonlocal seen
        seen += 1
        assert not {"$ref", "oneOf", "anyOf", "allOf", "$defs"} & set(node), path
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            return
        assert isinstance(node.get("type"), str), path
        if node["type"] == "array":
            walk(node["items"], f"{path}[]")
        if node["type"] == "object":
            assert "properties" in node or isinstance(node.get("additionalProperties"), dict), path
            assert not ("properties" in node and "additionalProperties" in node), path
            for key, child in node.get("properties", {}).items():
                walk(child, f"{path}.{key}")
            if isinstance(node.get("additionalProperties"), dict):
                walk(node["additionalProperties"], f"{path}{{}}")

    walk(root, "podTemplateOverrides")
    assert seen > 300  # the Kubernetes types are inlined, not left free-form
