"""The operator plans a pretrained job with the checkpoint's shape.

The operator cannot mount the checkpoint: the data-preparation pod reads its ``config.json``
and reports ``status.pretrained``; the plan then fixes the model to it (as ``dptrain plan``
does locally), and the trainer refuses a plan made for another model.
"""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import sys

import pytest
from kube_kubelet import Kubelet, finish_job
from kube_ledger import status_of
from kube_samples import job_manifest
from kube_waiting import wait_for

from dptrain.api import DPTrainingJobStatus, InvalidJobError, PlanStatus, parse_job
from dptrain.operator import ChildState, Observed, decide
from dptrain.planner import FIXED_BY_PRETRAINED, make_plan, pretrained_shape, pretrained_status
from dptrain.trainer import check_plan_model, pretrained_model, pretrained_report

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from hf_checkpoints import make_checkpoint

FINETUNE_MODEL = {"preset": None, "pretrained": {
    "path": "gemma-tiny", "volume": {"claimName": "weights", "subPath": "models"}}}


def _hf_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied lm_head counted once


def _job(directory, **overrides):
    manifest = job_manifest("ft", model={"preset": None, "pretrained": {"path": str(directory)}},
                            **overrides)
    return parse_job(manifest)


@pytest.mark.parametrize("model_type", ["vaultgemma", "gemma2"])
def test_report_reads_the_shape_and_counts_parameters_exactly(tmp_path, model_type):
    hf = make_checkpoint(tmp_path / "ckpt", model_type)
    report = pretrained_report(_job(tmp_path / "ckpt"), base_dir=tmp_path)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (report.model_type, report.layers, report.width, report.heads, report.kv_heads,
            report.head_dim, report.mlp_width, report.vocab_size,
            report.max_position_embeddings) == (
        model_type, config["num_hidden_layers"], config["hidden_size"],
        config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
        config["intermediate_size"], config["vocab_size"], config["max_position_embeddings"])
    # Gemma 2's post-norms included: the count is transformers' own.
    assert report.parameters == _hf_params(hf)
    assert report.preset == f"hf-{model_type}"
    assert report.config_checksum.startswith("sha256:") and len(report.config_checksum) == 71
    # The round trip through the status is the shape the CLI plans with.
    shape, _, _ = pretrained_model(_job(tmp_path / "ckpt"), base_dir=tmp_path)
    status = DPTrainingJobStatus.model_validate(
        {"pretrained": report.model_dump(mode="json", by_alias=True)})
    assert status.pretrained is not None
    assert pretrained_shape(status.pretrained) == shape


def test_a_tampered_parameter_count_is_refused():
    shape = make_plan(parse_job(job_manifest("j")).spec, dataset_size=2000).model_shape
    good = pretrained_status(shape, model_type="vaultgemma", path="/p", config_checksum="sha256:0")
    assert pretrained_shape(good) == shape
    bad = good.model_copy(update={"parameters": good.parameters + 1})
    with pytest.raises(ValueError, match=r"status\.pretrained\.parameters"):
        pretrained_shape(bad)


def test_an_unsupported_config_is_rejected_naming_the_key(tmp_path):
    make_checkpoint(tmp_path / "ckpt", "vaultgemma")
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "hidden_activation": "silu"}))
    with pytest.raises(InvalidJobError) as raised:
        pretrained_report(_job(tmp_path / "ckpt"), base_dir=tmp_path)
    assert raised.value.errors[0].field == "spec.model.pretrained.path: config.json " \
                                           "hidden_activation"


def test_the_trainer_refuses_a_plan_for_another_model(tmp_path):
    make_checkpoint(tmp_path / "ckpt", "vaultgemma")
    job = _job(tmp_path / "ckpt")
    shape, _, directory = pretrained_model(job, base_dir=tmp_path)
    fixed = make_plan(job.spec, dataset_size=2000, model=shape).to_status()
    check_plan_model(fixed, shape, directory)  # the checkpoint's own plan passes
    searched = make_plan(parse_job(job_manifest("j", model={"preset": None})).spec,
                         dataset_size=2000).to_status()
    assert searched.model_params != shape.param_count
    with pytest.raises(InvalidJobError) as raised:
        check_plan_model(searched, shape, directory)
    assert raised.value.errors[0].field == "status.plan.modelParams"
    assert str(shape.param_count) in raised.value.errors[0].rule


def test_prepare_data_refuses_a_tokenizer_of_another_vocabulary(tmp_path):
    from dptrain.trainer import PrepareRequest, prepare_data

    make_checkpoint(tmp_path / "ckpt", "vaultgemma", vocab_size=300)
    manifest = job_manifest("ft", model={"preset": None, "pretrained": {
        "path": str(tmp_path / "ckpt")}}, data={"sequenceLength": 32})
    (tmp_path / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidJobError) as raised:
        prepare_data(PrepareRequest(output=tmp_path / "out", config=tmp_path / "config.json",
                                    progress=False))
    assert raised.value.errors[0].field == "spec.data.tokenizer"
    assert "259" in str(raised.value) and "300" in str(raised.value)
    assert not (tmp_path / "out").exists()  # refused before any work


class _Tools:
    """The real planner, recording the fixed model it was asked to use."""

    def __init__(self):
        from dptrain.operator._tools import OperatorTools
        self.real = OperatorTools()
        self.models = []

    def plan(self, spec, dataset_size, *, model=None):
        self.models.append(model)
        return self.real.plan(spec, dataset_size, model=model)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_decide_prepares_then_plans_with_the_reported_shape(tmp_path, planner_cache_dir):
    make_checkpoint(tmp_path / "ckpt", "vaultgemma")
    report = pretrained_report(_job(tmp_path / "ckpt"), base_dir=tmp_path)
    manifest = job_manifest("ft", model=FINETUNE_MODEL)  # numSequences given: N is known
    manifest["metadata"].update(uid="uid-1", generation=1)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    tools = _Tools()
    tools.real = type(tools.real)(cache_dir=planner_cache_dir)
    first = decide(manifest, Observed(), now, tools=tools)
    assert "prepare" in first.create and first.plan is None  # the shape is not known yet
    assert tools.models == []
    # The prepare pod finished without reporting the shape: a clear failure, later.
    late = decide(manifest, Observed(prepare=ChildState(name="ft-prepare", complete=True,
                                                        finished=now)),
                  now + dt.timedelta(hours=1), tools=tools)
    assert late.phase == "Failed" and "status.pretrained" in json.dumps(late.status)
    manifest["status"] = {"pretrained": report.model_dump(mode="json", by_alias=True)}
    planned = decide(manifest, Observed(prepare=ChildState(name="ft-prepare", complete=True)),
                     now, tools=tools)
    assert planned.plan is not None
    assert planned.plan.model_params == report.parameters
    assert planned.plan.model_preset == "hf-vaultgemma"
    assert planned.plan.model_fixed_by == FIXED_BY_PRETRAINED
    assert tools.models[-1] == pretrained_shape(report)


@pytest.mark.e2e
def test_operator_plans_with_the_checkpoint_the_prepare_pod_reports(kube, kube_api,
                                                                   start_operator, tmp_path):
    start_operator()
    kubelet = Kubelet(kube, kube_api.url, tmp_path / "kubelet")
    hf = make_checkpoint(kubelet.claim_dir("weights") / "models" / "gemma-tiny", "vaultgemma")
    kube.create_job(job_manifest("ft", model=FINETUNE_MODEL,
                                 data={"numSequences": None, "sequenceLength": 32}))
    prepare = wait_for(lambda: kube.get("batch/v1/jobs", "default", "ft-prepare"), timeout=60,
                       what="the data-preparation Job",
                       describe=lambda: json.dumps(status_of(kube, "ft")))
    mounts = {m["mountPath"]: m for m in
              prepare["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/pretrained"]["readOnly"] is True
    assert status_of(kube, "ft").get("plan") is None  # never planned with a guessed model
    pod = kubelet.run("ft-prepare", env={"JAX_PLATFORMS": "cpu"})
    try:
        code = pod.process.wait(180)
    finally:
        kubelet.stop_all()
    assert code == 0, pod.log()
    finish_job(kube, "ft-prepare", 0)
    status = wait_for(lambda: s if (s := status_of(kube, "ft")).get("plan") else None,
                      timeout=60, what="status.plan",
                      describe=lambda: json.dumps(status_of(kube, "ft")))
    reported = status["pretrained"]
    assert reported["parameters"] == _hf_params(hf)
    assert (reported["modelType"], reported["layers"], reported["width"], reported["kvHeads"]) \
        == ("vaultgemma", 2, 64, 2)
    assert reported["path"].endswith("models/gemma-tiny")
    plan = status["plan"]
    assert plan["modelParams"] == _hf_params(hf)  # exactly the checkpoint's
    assert plan["modelPreset"] == "hf-vaultgemma"
    assert plan["modelFixedBy"] == "spec.model.pretrained"
    planned = next(c for c in status["conditions"] if c["type"] == "Planned")
    assert "fixed by spec.model.pretrained" in planned["message"]
    # The trainer accepts the operator's plan for this checkpoint and the prepared data (the
    # pod's own paths are local here) ...
    from dptrain.trainer import config_from_plan, load_dataset

    local = _job(kubelet.claim_dir("weights") / "models" / "gemma-tiny",
                 data={"numSequences": None, "sequenceLength": 32})
    dataset = load_dataset(status["dataset"]["location"])
    accepted = PlanStatus.model_validate(plan)
    config = config_from_plan(local, accepted, dataset=dataset, output_dir=tmp_path / "run",
                              base_dir=tmp_path)
    assert config.shape.param_count == plan["modelParams"]
    # ... and refuses one made for another model (what the operator planned before it knew).
    guessed = accepted.model_copy(update={"model_preset": "scaled-L1", "model_params": 123_456})
    with pytest.raises(InvalidJobError) as raised:
        config_from_plan(local, guessed, dataset=dataset, output_dir=tmp_path / "run",
                         base_dir=tmp_path)
    assert raised.value.errors[0].field == "status.plan.modelParams"
