"""Status drafting: the status a reconcile will write, built up change by change.

:class:`StatusDraft` is a mutable copy of a job's status that records an event for every
condition or phase that changes, restores the authoritative ledger (the ``dptrain.io/ledger``
annotation) over a ``status.privacy`` written by anyone else, and :meth:`StatusDraft.finish`
turns it into a :class:`Decision` whose status patch holds only what changed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import posixpath
from collections.abc import Mapping
from typing import Any, Literal

import pydantic

from dptrain.api import (
    TERMINAL_PHASES,
    ArtifactsStatus,
    Condition,
    DatasetCharge,
    DatasetStatus,
    DPTrainingJobSpec,
    DPTrainingJobStatus,
    PlanStatus,
    PrivacyLedgerStatus,
)
from dptrain.operator._conditions import set_condition
from dptrain.operator._ledger_record import (
    ANNOTATION_LEDGER,
    LedgerRecord,
    authoritative,
    read_record,
)
from dptrain.operator._names import JobRef, checkpoint_dir

Child = Literal["config", "rbac", "service", "workload", "prepare", "export"]


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
        active_deadline_seconds: the new workload's ``activeDeadlineSeconds`` (from
            ``spec.compute.deadline``; None: no deadline).
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
    active_deadline_seconds: int | None = None
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


class StatusDraft:
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
        self.disruptions = status.disruptions
        self.observed_generation = status.observed_generation
        # The trainer reports evaluation and artifacts with its progress; the status shows the
        # latest of them (kept once reported: a later report without them changes nothing).
        progress = status.progress
        self.evaluation = (progress.evaluation if progress is not None
                           and progress.evaluation is not None else status.evaluation)
        self.artifacts = (progress.artifacts if progress is not None
                          and progress.artifacts is not None else status.artifacts)
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
            "conditions": [dump_model(c) for c in self.conditions],
            "plan": dump_model(self.plan),
            "privacy": dump_model(self.privacy),
            "workload": dump_model(self.workload),
            "restarts": self.restarts,
            "disruptions": self.disruptions,
            "observedGeneration": self.observed_generation,
            "evaluation": dump_model(self.evaluation),
            "artifacts": dump_model(self.artifacts),
        }
        old = self.original
        before: dict[str, Any] = {
            "phase": old.phase if "phase" in old.model_fields_set else None,
            "conditions": [dump_model(c) for c in old.conditions],
            "plan": dump_model(old.plan),
            "privacy": dump_model(old.privacy),
            "workload": dump_model(old.workload),
            "restarts": old.restarts if "restarts" in old.model_fields_set else None,
            "disruptions": old.disruptions if "disruptions" in old.model_fields_set else 0,
            "observedGeneration": old.observed_generation,
            "evaluation": dump_model(old.evaluation),
            "artifacts": dump_model(old.artifacts),
        }
        self.decision.status = {k: v for k, v in new.items() if before.get(k) != v}
        self.decision.phase = self.phase
        if requeue_after is not None:
            self.decision.requeue_after = requeue_after
        return self.decision


def locate_artifacts(artifacts: ArtifactsStatus | None, spec: DPTrainingJobSpec,
                     job: JobRef) -> ArtifactsStatus | None:
    """``artifacts`` with in-pod paths on the checkpoint volume as ``pvc://CLAIM/PATH``.

    The trainer reports paths inside its pod; what a user can find is the claim and the path in
    it. Idempotent (located paths are left alone); paths elsewhere are kept as reported.
    """
    volume = spec.checkpoint.volume
    if artifacts is None or volume is None:
        return artifacts
    mount = checkpoint_dir(spec, job)
    inside = posixpath.join(volume.sub_path or "", (spec.checkpoint.path or job.name).lstrip("/"))

    def locate(path: str | None) -> str | None:
        if path is None or not (path == mount or path.startswith(mount + "/")):
            return path
        rest = path[len(mount):].lstrip("/")
        return "pvc://" + posixpath.join(volume.claim_name, inside, rest).rstrip("/")

    return artifacts.model_copy(update={"checkpoint": locate(artifacts.checkpoint),
                                        "export": locate(artifacts.export),
                                        "report": locate(artifacts.report)})


def dump_model(model: pydantic.BaseModel | None) -> Any:
    """A model as it is written into a status (camelCase JSON, no nulls)."""
    return None if model is None else model.model_dump(mode="json", by_alias=True,
                                                      exclude_none=True)


def parse_status(raw: Any) -> DPTrainingJobStatus:
    """A job's status, or a fresh one keeping its ledger when it cannot be read."""
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
