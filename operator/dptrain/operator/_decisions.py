"""Pure reconciliation decisions: (job body, observed children, now) → what to do.

:func:`decide` is level-triggered: it looks at the whole current state and returns the status to
write, the children to create or delete, the events to post and when to look again. It performs
no I/O; planning and ε look-ups come in through :class:`Tools` (deterministic functions), so the
same inputs always give the same decision and re-running it never duplicates anything.

Formal guarantees (each checked by a test in ``tests/test_operator_decisions.py``):
    1. Steps charged only grow: a progress report below the ledger is ignored (and reported by
       the ``ProgressReport`` condition); ε spent is the operator's accountant's, from the plan
       and the steps charged, never the trainer's number.
    2. No workload is asked for when steps charged ≥ the plan's maximum or ε spent ≥ budget; such
       a job is halted (workload deleted, ``BudgetExhausted``) and a terminal job never gets a
       workload again, except after an explicit budget raise that leaves room for more steps.
    3. After training has started, a spec change that would need more ε than the budget, or
       that changes how steps are accounted, is refused (``SpecAccepted=False``) and the
       running plan is kept.
    4. A spec that fails validation gets ``phase: Failed`` and nothing is created.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import pydantic

from dptrain.api import (
    TERMINAL_PHASES,
    Condition,
    DatasetCharge,
    DatasetStatus,
    DPDatasetSpec,
    DPTrainingJobSpec,
    DPTrainingJobStatus,
    InvalidJobError,
    PlanStatus,
    PrivacyLedgerStatus,
    WorkloadRef,
    parse_job,
    semantic_errors,
)
from dptrain.operator import _dataset_budget as dataset_budget
from dptrain.operator._children import ChildNames, JobRef, trainer_config
from dptrain.operator._conditions import find, parse_time, set_condition, timestamp
from dptrain.operator._ledger_record import (
    ANNOTATION_LEDGER,
    LedgerRecord,
    authoritative,
    read_record,
)
from dptrain.operator._verification import config_mismatches, mechanism_mismatches

ANNOTATION_APPLIED_SPEC = "dptrain.io/applied-spec"

Child = Literal["config", "rbac", "service", "workload", "prepare"]

#: Spec fields that may change after training has started (they do not touch the accounting).
MUTABLE_AFTER_START = frozenset({
    ("suspend",), ("maxRestarts",), ("image",), ("privacy", "epsilon"),
    ("training", "iterations"), ("checkpoint", "intervalSteps"), ("checkpoint", "keep"),
})

RECOVERABLE_FAILURES = frozenset({"InvalidSpec", "InfeasibleBudget", "PlanningFailed"})


class Tools(Protocol):
    """The deterministic, possibly slow functions a decision needs."""

    def plan(self, spec: DPTrainingJobSpec, dataset_size: int) -> PlanStatus:
        """The planner's plan (raises ValueError, e.g. InfeasibleBudgetError, if none fits)."""
        ...

    def enforce(self, plan: PlanStatus, budget: float, delta: float, *,
                iterations: int | None = None) -> PlanStatus:
        """The plan with maxSteps/epsilonPlanned from the operator's own accountant."""
        ...

    def epsilon_spent(self, plan: PlanStatus, delta: float, steps: int) -> float:
        """ε after ``steps`` steps of the plan (never below the true value)."""
        ...

    def epsilon_exact(self, plan: PlanStatus, delta: float, steps: int) -> float:
        """The exact ε of ``steps`` steps of the plan's mechanism."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Timing knobs of the decisions (seconds)."""

    stall_timeout: float = 900.0
    restart_backoff: float = 10.0
    max_restart_backoff: float = 300.0
    report_grace: float = 30.0
    workload_api_version: str = "batch/v1"
    workload_kind: str = "Job"

    def backoff(self, restarts: int) -> float:
        """Delay before restart number ``restarts`` (1-based): exponential, capped."""
        return float(min(self.max_restart_backoff,
                         self.restart_backoff * 2.0 ** max(0, restarts - 1)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChildState:
    """What the operator observed of a child Job (or JobSet)."""

    name: str
    complete: bool = False
    failed: bool = False
    deleting: bool = False
    message: str = ""
    created: dt.datetime | None = None
    finished: dt.datetime | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConfigState:
    """The trainer's ConfigMap as observed.

    Attributes:
        config: its parsed ``config.json`` (None: missing or not JSON).
        immutable: whether it is marked ``immutable: true``.
    """

    config: Mapping[str, Any] | None
    immutable: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetView:
    """The DPDataset a job refers to, as read for this reconcile.

    Attributes:
        name: the dataset's name.
        spec: its spec (None: it does not exist, or its spec is unreadable).
        charges: its ledger of charges (``status.charges``).
    """

    name: str
    spec: DPDatasetSpec | None = None
    charges: tuple[DatasetCharge, ...] = ()
    uid: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Observed:
    """The children that exist now (None: absent).

    ``config`` is looked at only when ``config_observed`` (the reconciler read the ConfigMap).
    """

    workload: ChildState | None = None
    prepare: ChildState | None = None
    config: ConfigState | None = None
    config_observed: bool = False
    dataset: DatasetView | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event:
    """A Kubernetes event to post on the job."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclasses.dataclass(kw_only=True)
class Decision:
    """Everything one reconcile should do, in order: delete, create, write status, post events.

    Attributes:
        status: merge-patch of ``status`` (only changed keys; empty: nothing to write).
        applied_spec: the spec now in force, to record on the job (None: unchanged).
        spec: the spec the children are built from (None when nothing is built).
        plan: the plan the children follow.
        dataset: the prepared dataset, if known.
        restart: the restart count to stamp on a new workload.
        create: children to ensure (created if absent).
        update_config: the trainer config changed: rewrite the ConfigMap.
        delete: children to delete.
        events: events to post.
        warnings: lines for the operator's log.
        requeue_after: look again after this many seconds (None: on the next change).
        halted: the reason of a transition into a terminal phase (for metrics).
        ledger_annotation: the new value of the authoritative ledger annotation (None: unchanged).
        reserve: a reservation to write into the job's DPDataset before the workload is created
            (the reconciler re-checks it under the dataset's lock).
        dataset_events: events to post on the job's DPDataset.
    """

    status: dict[str, Any] = dataclasses.field(default_factory=dict)
    applied_spec: dict[str, Any] | None = None
    spec: DPTrainingJobSpec | None = None
    plan: PlanStatus | None = None
    dataset: DatasetStatus | None = None
    restart: int = 0
    create: list[Child] = dataclasses.field(default_factory=list)
    update_config: bool = False
    delete: list[Child] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    requeue_after: float | None = None
    halted: str | None = None
    phase: str = "Pending"
    ledger_annotation: str | None = None
    reserve: DatasetCharge | None = None
    dataset_events: list[Event] = dataclasses.field(default_factory=list)


class _Draft:
    """A mutable copy of the status that records events as it changes."""

    def __init__(self, status: DPTrainingJobStatus, now: dt.datetime, generation: int,
                 meta: Mapping[str, Any]) -> None:
        self.original = status
        self.original_meta = meta
        self.phase: str = status.phase
        self.conditions: list[Condition] = list(status.conditions)
        self.plan = status.plan
        self.privacy = status.privacy
        self.workload = status.workload
        self.restarts = status.restarts
        self.observed_generation = status.observed_generation
        self.now = now
        self.generation = generation
        self.decision = Decision()
        self.record = read_record(meta)
        self.privacy, overwritten = authoritative(self.record, status.privacy)
        self.pinned_checksum = self.record.dataset_checksum if self.record else None
        if overwritten:
            # The trainer's Role may patch /status: a status.privacy the operator did not write
            # is ignored and restored from the annotation (finish() writes the difference).
            published = status.privacy
            assert published is not None and self.privacy is not None
            self.event("Warning", "LedgerRestored",
                       f"status.privacy was overwritten ({published.steps_charged} steps, ε "
                       f"{published.epsilon_spent:.4g}); restored the operator's ledger "
                       f"({self.privacy.steps_charged} steps, ε "
                       f"{self.privacy.epsilon_spent:.4g})")

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.decision.events.append(Event(type=type_, reason=reason, message=message))

    def condition(self, type_: str, status: str, reason: str, message: str = "", *,
                  event: Literal["Normal", "Warning"] | None = None) -> None:
        self.conditions, changed = set_condition(
            self.conditions, type_=type_, status=status, reason=reason, message=message,
            now=self.now, generation=self.generation)
        if changed and event is not None:
            self.event(event, reason, message or f"{type_}={status}")

    def set_phase(self, phase: str, reason: str, message: str) -> None:
        if phase == self.phase:
            return
        bad = phase in ("Failed", "BudgetExhausted")
        self.event("Warning" if bad else "Normal", phase, message or reason)
        if phase in TERMINAL_PHASES:
            self.decision.halted = reason
        self.phase = phase

    def finish(self, requeue_after: float | None = None) -> Decision:
        # Every reconcile observes the generation it read, refused changes included (kstatus).
        self.observed_generation = self.generation
        if self.privacy is not None:
            record = LedgerRecord(ledger=self.privacy, dataset_checksum=self.pinned_checksum)
            value = record.to_annotation()
            if value != (self.original_meta.get("annotations") or {}).get(ANNOTATION_LEDGER):
                self.decision.ledger_annotation = value
        new: dict[str, Any] = {
            "phase": self.phase,
            "conditions": [_dump(c) for c in self.conditions],
            "plan": _dump(self.plan),
            "privacy": _dump(self.privacy),
            "workload": _dump(self.workload),
            "restarts": self.restarts,
            "observedGeneration": self.observed_generation,
        }
        old = self.original
        before: dict[str, Any] = {
            "phase": old.phase if "phase" in old.model_fields_set else None,
            "conditions": [_dump(c) for c in old.conditions],
            "plan": _dump(old.plan),
            "privacy": _dump(old.privacy),
            "workload": _dump(old.workload),
            "restarts": old.restarts if "restarts" in old.model_fields_set else None,
            "observedGeneration": old.observed_generation,
        }
        self.decision.status = {k: v for k, v in new.items() if before.get(k) != v}
        self.decision.phase = self.phase
        if requeue_after is not None:
            self.decision.requeue_after = requeue_after
        return self.decision


def _dump(model: pydantic.BaseModel | None) -> Any:
    return None if model is None else model.model_dump(mode="json", by_alias=True,
                                                      exclude_none=True)


def _parse_status(raw: Any) -> DPTrainingJobStatus:
    try:
        return DPTrainingJobStatus.model_validate(raw or {})
    except pydantic.ValidationError:
        # A status we cannot read (hand-edited) is rebuilt; the ledger part is tried alone so
        # that charged steps are never forgotten.
        privacy = None
        if isinstance(raw, Mapping) and isinstance(raw.get("privacy"), Mapping):
            try:
                privacy = PrivacyLedgerStatus.model_validate(raw["privacy"])
            except pydantic.ValidationError:
                privacy = None
        return DPTrainingJobStatus(privacy=privacy)


def validated_spec(body: Mapping[str, Any], dataset_size: int | None
                   ) -> tuple[DPTrainingJobSpec | None, list[str]]:
    """The job's spec if it passes schema and semantic validation, else the problems."""
    manifest = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
    metadata = dict(manifest.get("metadata") or {})
    manifest["metadata"] = {k: metadata[k] for k in ("name", "namespace", "labels", "annotations")
                            if k in metadata}
    try:
        job = parse_job(manifest)
    except InvalidJobError as error:
        return None, [str(e) for e in error.errors]
    problems = semantic_errors(job.spec, dataset_size=dataset_size)
    return (job.spec, []) if not problems else (None, [str(e) for e in problems])


def _applied(body: Mapping[str, Any]) -> DPTrainingJobSpec | None:
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_APPLIED_SPEC)
    if not raw:
        return None
    try:
        return DPTrainingJobSpec.model_validate(json.loads(raw))
    except (ValueError, pydantic.ValidationError):
        return None


def spec_json(spec: DPTrainingJobSpec) -> dict[str, Any]:
    """The spec as recorded in the applied-spec annotation."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def changed_fields(old: DPTrainingJobSpec, new: DPTrainingJobSpec) -> list[tuple[str, ...]]:
    """Leaf paths (camelCase) whose values differ between two specs."""
    out: list[tuple[str, ...]] = []

    def walk(a: Any, b: Any, path: tuple[str, ...]) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), (*path, key))
        elif a != b:
            out.append(path)

    walk(spec_json(old), spec_json(new), ())
    return out


def _ledger_for(spec: DPTrainingJobSpec, plan: PlanStatus,
                ledger: PrivacyLedgerStatus | None) -> PrivacyLedgerStatus:
    if ledger is None:
        return PrivacyLedgerStatus(epsilon_budget=spec.privacy.epsilon, delta=spec.privacy.delta,
                                   accountant=plan.accountant)
    return ledger


def decide(body: Mapping[str, Any], observed: Observed, now: dt.datetime, *, tools: Tools,
           settings: Settings = Settings()) -> Decision:
    """Decide one reconcile of a DPTrainingJob (see the module docstring)."""
    meta = body.get("metadata") or {}
    generation = int(meta.get("generation") or 1)
    status = _parse_status(body.get("status"))
    d = _Draft(status, now, generation, meta)
    out = d.decision
    ledger = d.privacy
    progress = status.progress
    # Started: anything charged, or anything the trainer reported (a report may arrive in the
    # same reconcile as a spec change, before it is charged).
    started = ((ledger is not None and ledger.steps_charged > 0)
               or (progress is not None and (progress.steps_charged > 0 or progress.step > 0)))
    known_n = (status.dataset.num_sequences if status.dataset is not None else None)

    # ------------------------------------------------------------------ terminal phases
    spec, problems = validated_spec(body, known_n)
    reopened = False
    if d.phase in TERMINAL_PHASES:
        failed = find(d.conditions, "Failed")
        if (d.phase == "Failed" and failed is not None and failed.reason in RECOVERABLE_FAILURES
                and generation != status.observed_generation and spec is not None):
            reopened = True  # the user fixed a spec that never ran: start over
            d.condition("Failed", "False", "SpecChanged", "the spec changed; retrying")
            d.set_phase("Pending", "SpecChanged", "the spec was fixed; planning again")
            d.plan = None
        elif (d.phase == "BudgetExhausted" and spec is not None and ledger is not None
              and status.plan is not None and spec.privacy.epsilon > ledger.epsilon_budget):
            reopened = True  # an explicit budget raise; the amendment below decides
        else:
            _delete_existing(out, observed)
            return d.finish()

    # ------------------------------------------------------------------ validation
    applied = _applied(body)
    if spec is None:
        message = "; ".join(problems)
        if started and applied is not None and status.plan is not None:
            d.condition("SpecAccepted", "False", "InvalidSpec", message, event="Warning")
            spec = applied  # keep running what was accepted
        else:
            d.condition("SpecValid", "False", "InvalidSpec", message, event="Warning")
            d.condition("Failed", "True", "InvalidSpec", message)
            d.observed_generation = generation
            d.set_phase("Failed", "InvalidSpec", message)
            _delete_existing(out, observed)
            return d.finish()
    else:
        d.condition("SpecValid", "True", "Valid")
    out.spec = spec

    # ------------------------------------------------------------------ suspend (before prep)
    n = spec.data.num_sequences or known_n
    out.dataset = status.dataset
    if n is None:
        return _prepare(d, spec, observed, settings)
    if observed.prepare is not None and not observed.prepare.deleting:
        out.delete.append("prepare")
    d.condition("DataPrepared", "True",
                "Given" if spec.data.num_sequences else "Prepared", f"N = {n} sequences")

    # ------------------------------------------------------------------ plan
    plan = d.plan
    if plan is None or plan.spec_generation != generation:
        if plan is None or not started:
            try:
                fresh = tools.plan(spec, n)
                enforced = tools.enforce(fresh, spec.privacy.epsilon, spec.privacy.delta)
            except ValueError as error:
                return _fail(d, out, observed, "InfeasibleBudget", str(error), "Planned")
            if enforced.max_steps < 1:
                return _fail(d, out, observed, "InfeasibleBudget",
                             f"spec.privacy.epsilon: {spec.privacy.epsilon:g} does not afford "
                             "a single step of the plan", "Planned")
            plan = enforced.model_copy(update={"spec_generation": generation})
            ledger = PrivacyLedgerStatus(
                epsilon_budget=spec.privacy.epsilon, delta=spec.privacy.delta,
                accountant=plan.accountant, steps_charged=0, epsilon_spent=0.0)
            if observed.workload is not None and d.plan is not None:
                out.delete.append("workload")  # a new plan before any step: restart cleanly
            d.plan = plan
            out.update_config = True
            out.applied_spec = spec_json(spec)
            d.observed_generation = generation
            d.condition("Planned", "True", "Planned",
                        f"{plan.model_preset}, batch {plan.batch_size}, σ "
                        f"{plan.noise_multiplier:.4g}, {plan.max_steps} of {plan.iterations} "
                        f"steps within ε = {spec.privacy.epsilon:g}", event="Normal")
            d.condition("SpecAccepted", "True", "Accepted")
            if d.phase in ("Pending", "Preparing"):
                d.set_phase("Planned", "Planned", "plan written to status.plan")
        else:
            amended = _amend(d, spec, applied, plan, ledger, tools)
            if amended is None:
                spec = applied if applied is not None else spec
                out.spec = spec
            else:
                if observed.workload is not None and _trainer_relevant(plan, amended):
                    out.delete.append("workload")  # restart with the new config, not a failure
                plan, ledger = amended
                out.update_config = True
                out.applied_spec = spec_json(spec)
                d.observed_generation = generation
    assert plan is not None
    out.plan = plan
    ledger = _ledger_for(spec, plan, ledger if ledger is not None else d.privacy)

    # ------------------------------------------------------------------ the ledger
    ledger = _charge(d, plan, ledger, status, tools)
    d.privacy = ledger

    # ------------------------------------------------------------------ the mechanism run
    if progress is not None and (progress.steps_charged > 0 or progress.step > 0):
        known = status.dataset.checksum if status.dataset is not None else None
        view = observed.dataset
        if known is None and view is not None and view.spec is not None:
            known = view.spec.checksum
        expected_checksum = known or d.pinned_checksum
        problems = mechanism_mismatches(plan, ledger.delta, progress.mechanism,
                                        expected_checksum)
        if problems:
            return _fail(d, out, observed, "MechanismMismatch", "; ".join(problems),
                         "MechanismVerified")
        d.condition("MechanismVerified", "True", "Matches",
                    "the trainer runs the accounted mechanism")
        if expected_checksum is None and progress.mechanism is not None:
            d.pinned_checksum = progress.mechanism.dataset_checksum  # trust on first use
    if (observed.config_observed and observed.config is not None and not out.update_config
            and "config" not in out.create):
        expected = trainer_config(spec, JobRef(name=str(meta.get("name", "")),
                                               namespace=str(meta.get("namespace", "")),
                                               uid=str(meta.get("uid", ""))),
                                  plan, out.dataset)
        problems = config_mismatches(expected, observed.config.config,
                                     observed.config.immutable)
        if problems:
            out.delete.append("config")
            return _fail(d, out, observed, "MechanismMismatch",
                         "the trainer's ConfigMap differs from the plan: " + "; ".join(problems),
                         "MechanismVerified")

    if ledger.steps_charged >= plan.max_steps or ledger.epsilon_spent >= ledger.epsilon_budget:
        trained = status.progress.step if status.progress is not None else 0
        _halt(d, out, observed, plan, ledger, trained_steps=trained)
        return d.finish()
    if reopened and d.phase == "BudgetExhausted":
        d.condition("BudgetExhausted", "False", "BudgetRaised",
                    f"budget raised to ε = {ledger.epsilon_budget:g}")
        d.set_phase("Planned", "BudgetRaised", "the budget was raised; training resumes")

    # ------------------------------------------------------------------ suspend
    if spec.suspend:
        if observed.workload is not None and not observed.workload.deleting:
            out.delete.append("workload")
        d.condition("Suspended", "True", "Suspended", "the workload is deleted; the ledger kept",
                    event="Normal")
        d.condition("Running", "False", "Suspended")
        d.workload = None
        d.set_phase("Suspended", "Suspended", "suspended by spec.suspend")
        return d.finish()
    if find(d.conditions, "Suspended") is not None:
        d.condition("Suspended", "False", "Resumed", "resumed from the last checkpoint",
                    event="Normal")

    if spec.data.dataset_ref is not None:
        held = _dataset_gate(d, out, spec, plan, ledger, status, observed)
        if held is not None:
            return held
    return _run(d, out, spec, plan, ledger, status, observed, settings)


# Waiting jobs are poked when their dataset's ledger changes; this is only the safety net.
DATASET_RETRY_SECONDS = 30.0


def _dataset_gate(d: _Draft, out: Decision, spec: DPTrainingJobSpec, plan: PlanStatus,
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
        return _wait_for_dataset(d, "DatasetNotFound", message)
    checksum = status.dataset.checksum if status.dataset is not None else None
    mismatch = dataset_budget.data_mismatch(spec, view.spec, checksum)
    if mismatch is not None:
        return _fail(d, out, observed, "DatasetMismatch", f"DPDataset {ref}: {mismatch}",
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
        return _wait_for_dataset(d, "InsufficientBudget", message)
    message = (f"DPDataset {ref}: admitted; composed ε {admission.composed:.4g} of "
               f"{admission.budget:g}")
    before = find(d.conditions, "DatasetBudget")
    d.condition("DatasetBudget", "True", "Admitted", message, event="Normal")
    if before is None or before.reason != "Admitted":
        out.dataset_events.append(Event(type="Normal", reason="Admitted",
                                        message=f"{name}: {message}"))
    out.reserve = candidate
    return None


def _wait_for_dataset(d: _Draft, reason: str, message: str) -> Decision:
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


def _delete_existing(out: Decision, observed: Observed) -> None:
    if observed.workload is not None and not observed.workload.deleting:
        out.delete.append("workload")
    if observed.prepare is not None and not observed.prepare.deleting:
        out.delete.append("prepare")


def _fail(d: _Draft, out: Decision, observed: Observed, reason: str, message: str,
          condition: str | None = None) -> Decision:
    if condition is not None:
        d.condition(condition, "False", reason, message, event="Warning")
    d.condition("Failed", "True", reason, message)
    d.condition("Running", "False", reason)
    d.observed_generation = d.generation
    d.set_phase("Failed", reason, message)
    d.workload = None
    _delete_existing(out, observed)
    return d.finish()


def _prepare(d: _Draft, spec: DPTrainingJobSpec, observed: Observed, settings: Settings
             ) -> Decision:
    """N is unknown: run (or wait for) the data-preparation Job."""
    out = d.decision
    prep = observed.prepare
    if spec.suspend:
        if prep is not None and not prep.deleting:
            out.delete.append("prepare")
        d.set_phase("Suspended", "Suspended", "suspended by spec.suspend")
        return d.finish()
    if prep is not None and prep.failed:
        return _fail(d, out, observed, "DataPreparationFailed",
                     prep.message or "the data-preparation Job failed", "DataPrepared")
    if prep is not None and prep.complete:
        finished = prep.finished or prep.created or d.now
        waited = (d.now - finished).total_seconds()
        if waited > settings.report_grace:
            return _fail(d, out, observed, "DatasetNotReported",
                         "data preparation finished without reporting status.dataset",
                         "DataPrepared")
        return d.finish(requeue_after=max(1.0, settings.report_grace - waited))
    if prep is None:
        out.create += ["config", "rbac", "prepare"]
    d.condition("DataPrepared", "False", "Preparing",
                "measuring the dataset size N and preparing sequences", event="Normal")
    d.set_phase("Preparing", "Preparing", "running data preparation")
    return d.finish()


def _trainer_relevant(old: PlanStatus, new: tuple[PlanStatus, PrivacyLedgerStatus]) -> bool:
    plan, _ = new
    return (plan.max_steps, plan.iterations) != (old.max_steps, old.iterations)


def _amend(d: _Draft, spec: DPTrainingJobSpec, applied: DPTrainingJobSpec | None,
           plan: PlanStatus, ledger: PrivacyLedgerStatus | None, tools: Tools
           ) -> tuple[PlanStatus, PrivacyLedgerStatus] | None:
    """Apply a spec change to a running plan, or refuse it (None) with a condition."""
    assert ledger is not None
    if applied is None:
        changed: list[tuple[str, ...]] = []
    else:
        changed = changed_fields(applied, spec)
    frozen = [path for path in changed if path not in MUTABLE_AFTER_START]
    if frozen:
        fields = ", ".join("spec." + ".".join(p) for p in frozen)
        d.condition("SpecAccepted", "False", "SpecChangeRefused",
                    f"{fields}: cannot change after training has started (steps are charged "
                    "under the current plan)", event="Warning")
        return None
    iterations = spec.training.iterations or plan.iterations
    budget, delta = spec.privacy.epsilon, ledger.delta
    if iterations != plan.iterations:
        needed = tools.epsilon_exact(plan, delta, iterations)
        if needed > budget:
            d.condition("SpecAccepted", "False", "SpecChangeRefused",
                        f"spec.training.iterations: {iterations} steps would need ε = "
                        f"{needed:.4g} > budget {budget:g}", event="Warning")
            return None
    new_plan = tools.enforce(plan, budget, delta, iterations=iterations)
    new_plan = new_plan.model_copy(update={"spec_generation": d.generation})
    if budget != ledger.epsilon_budget:
        raised = budget > ledger.epsilon_budget
        d.event("Normal" if raised else "Warning", "BudgetRaised" if raised else "BudgetLowered",
                f"ε budget {ledger.epsilon_budget:g} → {budget:g}; maxSteps "
                f"{plan.max_steps} → {new_plan.max_steps}")
        ledger = ledger.model_copy(update={"epsilon_budget": budget})
    d.plan = new_plan
    d.condition("SpecAccepted", "True", "Accepted")
    d.condition("Planned", "True", "Amended",
                f"{new_plan.max_steps} of {new_plan.iterations} steps within ε = {budget:g}")
    return new_plan, ledger


def _charge(d: _Draft, plan: PlanStatus, ledger: PrivacyLedgerStatus,
            status: DPTrainingJobStatus, tools: Tools) -> PrivacyLedgerStatus:
    """Charge the trainer's report to the ledger: it only ever grows."""
    report = status.progress.steps_charged if status.progress is not None else None
    steps = ledger.steps_charged
    if report is not None and report > steps:
        steps = report
        if report > plan.max_steps:
            d.decision.warnings.append(
                f"trainer reported {report} steps, beyond the plan's maximum {plan.max_steps}")
            d.condition("ProgressReport", "False", "BeyondPlan",
                        f"reported {report} steps, beyond the plan's maximum {plan.max_steps}; "
                        "charged", event="Warning")
        else:
            d.condition("ProgressReport", "True", "Charged")
        ledger = ledger.model_copy(update={"steps_charged": steps,
                                           "last_charged_time": timestamp(d.now)})
    elif report is not None and report < steps:
        d.decision.warnings.append(
            f"ignored a progress report of {report} steps: {steps} are already charged")
        d.condition("ProgressReport", "False", "Regressed",
                    f"reported {report} steps, below the {steps} already charged: ignored",
                    event="Warning")
    elif report is not None:
        d.condition("ProgressReport", "True", "Charged")
    spent = tools.epsilon_spent(plan, ledger.delta, steps)
    if spent != ledger.epsilon_spent:
        ledger = ledger.model_copy(update={"epsilon_spent": spent})
    return ledger


def _halt(d: _Draft, out: Decision, observed: Observed, plan: PlanStatus,
          ledger: PrivacyLedgerStatus, *, trained_steps: int) -> None:
    """Stop for good: the budget (or the plan) is used up.

    ``Succeeded`` needs the model to have done all its iterations (the trainer's own step count),
    not just the ledger to reach them: restarts charge repeated steps again, so the ledger can
    reach ``iterations`` before the model does. Such a job is ``BudgetExhausted``
    (``MaxStepsReached``): it may not run another step, but it did not finish.
    """
    _delete_existing(out, observed)
    d.workload = None
    message = (f"ε spent {ledger.epsilon_spent:.4g} of {ledger.epsilon_budget:g} after "
               f"{ledger.steps_charged} steps (plan maximum {plan.max_steps})")
    d.condition("Running", "False", "Halted", message)
    if (ledger.steps_charged >= plan.iterations and plan.max_steps >= plan.iterations
            and trained_steps >= plan.iterations):
        d.condition("Succeeded", "True", "Completed", message)
        d.set_phase("Succeeded", "Completed", message)
        return
    reason = ("EpsilonBudgetReached" if ledger.epsilon_spent >= ledger.epsilon_budget
              else "MaxStepsReached")
    d.condition("BudgetExhausted", "True", reason, message)
    d.set_phase("BudgetExhausted", reason, message)


def _run(d: _Draft, out: Decision, spec: DPTrainingJobSpec, plan: PlanStatus,
         ledger: PrivacyLedgerStatus, status: DPTrainingJobStatus, observed: Observed,
         settings: Settings) -> Decision:
    """Keep the workload running: create it, restart it after failures, watch for stalls."""
    work = observed.workload
    work_name = ChildNames.of(str((d.original_meta or {}).get("name", ""))).workload
    end_state = status.progress.end_state if status.progress is not None else None
    out.restart = d.restarts
    if work is not None and work.deleting:
        return d.finish(requeue_after=2.0)
    if work is not None and (work.complete or work.failed):
        out.delete.append("workload")
        d.workload = None
        if end_state == "BudgetExhausted":
            message = f"the trainer stopped at the budget after {ledger.steps_charged} steps"
            d.condition("BudgetExhausted", "True", "TrainerBudgetExhausted", message)
            d.condition("Running", "False", "Halted", message)
            d.set_phase("BudgetExhausted", "TrainerBudgetExhausted", message)
            return d.finish()
        if work.complete:
            message = f"training finished after {ledger.steps_charged} steps"
            d.condition("Succeeded", "True", "Completed", message)
            d.condition("Running", "False", "Completed", message)
            d.set_phase("Succeeded", "Completed", message)
            return d.finish()
        if d.restarts >= spec.max_restarts:
            return _fail(d, out, observed, "BackoffLimitExceeded",
                         f"the trainer failed {d.restarts + 1} times "
                         f"({work.message or 'no reason'})"
                         f"; spec.maxRestarts is {spec.max_restarts}")
        d.restarts += 1
        delay = settings.backoff(d.restarts)
        d.condition("Restarting", "True", "TrainerFailed",
                    f"{work.message or 'the trainer failed'}; restart {d.restarts} of "
                    f"{spec.max_restarts} in {delay:g}s from the ledger", event="Warning")
        d.condition("Running", "False", "Restarting")
        return d.finish(requeue_after=delay)
    if work is None:
        restarting = find(d.conditions, "Restarting")
        if restarting is not None and restarting.status == "True":
            since = parse_time(restarting.last_transition_time) or d.now
            wait = settings.backoff(d.restarts) - (d.now - since).total_seconds()
            if wait > 0:
                return d.finish(requeue_after=wait)
            d.condition("Restarting", "False", "Restarted", f"restart {d.restarts}")
        out.create += ["config", "rbac", "service", "workload"]
        d.workload = WorkloadRef(api_version=settings.workload_api_version,
                                 kind=settings.workload_kind, name=work_name)
        d.condition("Running", "True", "WorkloadCreated",
                    f"resuming at {ledger.steps_charged} steps charged" if ledger.steps_charged
                    else "the trainer workload was created", event="Normal")
        if find(d.conditions, "Stalled") is not None:
            d.condition("Stalled", "False", "Started")
        d.set_phase("Running", "WorkloadCreated", "the trainer workload was created")
        return d.finish(requeue_after=settings.stall_timeout)
    # The workload exists and runs: only watch for stalls.
    running = find(d.conditions, "Running")
    if running is None or running.status != "True":
        d.condition("Running", "True", "WorkloadCreated", "the trainer workload is running")
    if d.workload is None:
        d.workload = WorkloadRef(api_version=settings.workload_api_version,
                                 kind=settings.workload_kind, name=work.name)
    d.set_phase("Running", "WorkloadCreated", "the trainer workload is running")
    last = max(filter(None, [
        parse_time(status.progress.last_update) if status.progress else None,
        parse_time(ledger.last_charged_time), work.created,
        parse_time(getattr(find(d.conditions, "Running"), "last_transition_time", None)),
    ]), default=d.now)
    quiet = (d.now - last).total_seconds()
    if quiet > settings.stall_timeout:
        d.condition("Stalled", "True", "NoProgress",
                    f"no progress report for {quiet:.0f}s (timeout {settings.stall_timeout:g}s)",
                    event="Warning")
        return d.finish(requeue_after=settings.stall_timeout)
    stalled = find(d.conditions, "Stalled")
    if stalled is not None and stalled.status == "True":
        d.condition("Stalled", "False", "ProgressResumed", "progress reports resumed",
                    event="Normal")
    return d.finish(requeue_after=settings.stall_timeout - quiet)
