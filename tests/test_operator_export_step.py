"""The operator's export step (pure): when an export Job is created, waited for, cleaned up,
and never re-run; where status.artifacts says the outputs lie."""

from __future__ import annotations

import datetime as dt

import pytest

from dptrain.api import ArtifactsStatus, DPTrainingJobSpec, DPTrainingJobStatus
from dptrain.operator import ChildState, Observed, Settings
from dptrain.operator._draft import StatusDraft, locate_artifacts
from dptrain.operator._names import JobRef
from dptrain.operator._phases import export_step

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
JOB = JobRef(name="ft", namespace="default", uid="u")


def _spec(volume=True):
    raw = {"privacy": {"epsilon": 2.0, "delta": 1e-6}, "data": {"builtin": "stdlib-docs"},
           "model": {"preset": "tiny"}, "training": {"batchSize": 8, "iterations": 10}}
    if volume:
        raw["checkpoint"] = {"path": "runs/ft", "volume": {"claimName": "ckpt",
                                                           "subPath": "team"}}
    return DPTrainingJobSpec.model_validate(raw)


def _draft(phase="BudgetExhausted", **status):
    parsed = DPTrainingJobStatus.model_validate({"phase": phase, **status})
    return StatusDraft(parsed, NOW, 1, {"name": "ft"})


NOTHING = Observed()
DEFAULTS = Settings()


def _step(draft, observed=NOTHING, spec=None, settings=DEFAULTS):
    out = draft.decision
    requeue = export_step(draft, out, _spec() if spec is None else spec, observed, settings)
    conditions = {c.type: (c.status, c.reason) for c in draft.conditions}
    return out, requeue, conditions.get("Exported")


def test_a_finished_job_gets_one_export_job_after_its_workload_is_gone():
    out, requeue, exported = _step(_draft(), Observed(workload=ChildState(name="ft-train",
                                                                         deleting=True)))
    assert out.create == [] and requeue == 2.0 and exported is None
    for phase in ("Succeeded", "BudgetExhausted"):
        out, requeue, exported = _step(_draft(phase))
        assert out.create == ["export"] and out.spec is not None
        assert exported == ("Unknown", "Exporting") and requeue == 5.0


@pytest.mark.parametrize(("draft", "spec", "settings"), [
    (_draft("Failed"), None, Settings()),
    (_draft("Running"), None, Settings()),
    (_draft(), _spec(volume=False), Settings()),  # an emptyDir went with the pod
    (_draft(), None, Settings(export=False)),  # the operator configuration turned it off
])
def test_no_export_without_a_final_model_on_a_volume_or_when_off(draft, spec, settings):
    out, requeue, exported = _step(draft, spec=spec, settings=settings)
    assert out.create == [] and requeue is None and exported is None


def test_reported_artifacts_end_the_step_and_the_job_is_deleted():
    draft = _draft(artifacts={"checkpoint": "pvc://ckpt/team/runs/ft",
                              "export": "pvc://ckpt/team/runs/ft/export"},
                   conditions=[{"type": "Exported", "status": "Unknown", "reason": "Exporting"}])
    out, requeue, exported = _step(draft, Observed(export=ChildState(name="ft-export",
                                                                     complete=True)))
    assert out.delete == ["export"] and out.create == [] and requeue is None
    assert exported == ("True", "Exported")
    assert any(e.reason == "Exported" for e in out.events)


def test_a_failed_export_is_reported_and_never_retried():
    running = [{"type": "Exported", "status": "Unknown", "reason": "Exporting"}]
    out, _, exported = _step(_draft(conditions=running), Observed(export=ChildState(
        name="ft-export", failed=True, message="BackoffLimitExceeded")))
    assert out.delete == ["export"] and exported == ("False", "ExportFailed")
    failed = [{"type": "Exported", "status": "False", "reason": "ExportFailed"}]
    out, requeue, exported = _step(_draft(conditions=failed))
    assert out.create == [] and requeue is None and exported == ("False", "ExportFailed")
    # An export pod that reported its error: the same, with its message.
    draft = _draft(conditions=running, artifacts={"exportError": "ExportError: no checkpoint"})
    out, _, exported = _step(draft, Observed(export=ChildState(name="ft-export", complete=True)))
    assert exported == ("False", "ExportFailed") and out.delete == ["export"]


def test_artifacts_on_the_checkpoint_volume_are_located_idempotently():
    spec = _spec()
    reported = ArtifactsStatus(checkpoint="/checkpoints/runs/ft",
                               export="/checkpoints/runs/ft/export",
                               report="/checkpoints/runs/ft/report.json")
    located = locate_artifacts(reported, spec, JOB)
    assert located == ArtifactsStatus(checkpoint="pvc://ckpt/team/runs/ft",
                                      export="pvc://ckpt/team/runs/ft/export",
                                      report="pvc://ckpt/team/runs/ft/report.json")
    assert locate_artifacts(located, spec, JOB) == located
    # Elsewhere, or without a volume, paths are kept as reported.
    assert locate_artifacts(ArtifactsStatus(export="/tmp/x"), spec, JOB).export == "/tmp/x"
    assert locate_artifacts(reported, _spec(volume=False), JOB) == reported
