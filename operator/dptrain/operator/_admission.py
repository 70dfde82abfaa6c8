"""Admission on a job's DPDataset: run only with a reservation the dataset's budget covers."""

from __future__ import annotations

from dptrain.api import (
    DPTrainingJobSpec,
    DPTrainingJobStatus,
    PlanStatus,
    PrivacyLedgerStatus,
)
from dptrain.operator import _dataset_budget as dataset_budget
from dptrain.operator._conditions import find
from dptrain.operator._draft import Decision, Event, StatusDraft
from dptrain.operator._observed import Observed
from dptrain.operator._phases import fail

# Waiting jobs are poked when their dataset's ledger changes; this is only the safety net.
DATASET_RETRY_SECONDS = 30.0


def dataset_gate(d: StatusDraft, out: Decision, spec: DPTrainingJobSpec, plan: PlanStatus,
                  ledger: PrivacyLedgerStatus, status: DPTrainingJobStatus,
                  observed: Observed) -> Decision | None:
    """Admission on the job's DPDataset: None lets the job run, else the decision to wait/fail.

    A workload is only asked for with a reservation on the dataset (``out.reserve``) when the
    composition of the dataset's committed charges and this plan fits its budget.
    """
    name = str(d.original_meta.get("name", ""))
    uid = str(d.original_meta.get("uid", ""))
    view = observed.dataset
    ref = spec.data.dataset_ref
    if view is None or view.spec is None:
        if observed.workload is not None:
            return None  # running on an admitted reservation: the record stays with the dataset
        message = f"DPDataset {ref} does not exist in this namespace"
        return wait_for_dataset(d, "DatasetNotFound", message)
    checksum = status.dataset.checksum if status.dataset is not None else None
    mismatch = dataset_budget.data_mismatch(spec, view.spec, checksum)
    if mismatch is not None:
        return fail(d, out, observed, "DatasetMismatch", f"DPDataset {ref}: {mismatch}",
                     "DatasetBudget")
    if observed.workload is not None or not dataset_budget.needs_admission(
            view.charges, uid, plan):
        return None
    candidate = dataset_budget.charge_for(name, uid, plan).model_copy(
        update={"steps_charged": ledger.steps_charged})
    admission = dataset_budget.admit(view.spec, view.charges, candidate)
    if not admission.fits:
        message = (f"DPDataset {ref}: composed ε {admission.composed:.4g} with this job would "
                   f"exceed its budget {admission.budget:g} (remaining ε "
                   f"{max(0.0, admission.remaining):.4g}); waiting for budget to free")
        return wait_for_dataset(d, "InsufficientBudget", message)
    message = (f"DPDataset {ref}: admitted; composed ε {admission.composed:.4g} of "
               f"{admission.budget:g}")
    before = find(d.conditions, "DatasetBudget")
    d.condition("DatasetBudget", "True", "Admitted", message, event="Normal")
    if before is None or before.reason != "Admitted":
        out.dataset_events.append(Event(type="Normal", reason="Admitted",
                                        message=f"{name}: {message}"))
    out.reserve = candidate
    return None


def wait_for_dataset(d: StatusDraft, reason: str, message: str) -> Decision:
    """Hold the job ``Pending`` on its dataset's budget (and tell the dataset, once)."""
    before = find(d.conditions, "DatasetBudget")
    d.condition("DatasetBudget", "False", reason, message, event="Warning")
    if before is None or (before.reason, before.message) != (reason, message):
        d.decision.dataset_events.append(Event(
            type="Warning", reason="AdmissionRefused",
            message=f"{d.original_meta.get('name', '')}: {message}"))
    d.condition("Running", "False", "DatasetBudget", message)
    d.workload = None
    d.set_phase("Pending", "DatasetBudget", message)
    return d.finish(requeue_after=DATASET_RETRY_SECONDS)
