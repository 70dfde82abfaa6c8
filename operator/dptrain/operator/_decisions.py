"""Pure reconciliation decisions: (job body, observed children, now) → what to do.

:func:`decide` is level-triggered: it looks at the whole current state and returns the status to
write, the children to create or delete, the events to post and when to look again. It performs
no I/O; planning and ε look-ups come in through :class:`Tools` (deterministic functions), so the
same inputs always give the same decision and re-running it never duplicates anything.

Its parts, one concern each: ``_observed`` (what it reads), ``_draft`` (the status it writes),
``_spec_changes`` (validation and changes after start), ``_phases`` (charging, halting, the
workload), ``_admission`` (the DPDataset gate).

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
from collections.abc import Mapping
from typing import Any

from dptrain.api import (
    TERMINAL_PHASES,
    DPTrainingJobSpec,
    PlanStatus,
    PrivacyLedgerStatus,
)
from dptrain.operator._admission import dataset_gate
from dptrain.operator._children import JobRef, trainer_config
from dptrain.operator._conditions import find
from dptrain.operator._draft import (
    Child,
    Decision,
    Event,
    StatusDraft,
    locate_artifacts,
    parse_status,
)
from dptrain.operator._fit import PodsDoNotFitError
from dptrain.operator._observed import (
    ChildState,
    ConfigState,
    DatasetView,
    Observed,
    Settings,
    Tools,
)
from dptrain.operator._phases import (
    charge,
    delete_existing,
    export_step,
    fail,
    halt,
    prepare,
    run_workload,
)
from dptrain.operator._spec_changes import (
    ANNOTATION_APPLIED_SPEC,
    MUTABLE_AFTER_START,
    amend,
    applied_spec,
    changed_fields,
    spec_json,
    trainer_relevant,
    validated_spec,
)
from dptrain.operator._verification import config_mismatches, mechanism_mismatches

__all__ = [
    "ANNOTATION_APPLIED_SPEC",
    "MUTABLE_AFTER_START",
    "Child",
    "ChildState",
    "ConfigState",
    "DatasetView",
    "Decision",
    "Event",
    "Observed",
    "Settings",
    "Tools",
    "changed_fields",
    "decide",
    "spec_json",
    "validated_spec",
]


DEFAULT_SETTINGS = Settings()

RECOVERABLE_FAILURES = frozenset({"InvalidSpec", "InfeasibleBudget", "PlanningFailed",
                                  "PodsDoNotFit"})


def _ledger_for(spec: DPTrainingJobSpec, plan: PlanStatus,
                ledger: PrivacyLedgerStatus | None) -> PrivacyLedgerStatus:
    if ledger is None:
        return PrivacyLedgerStatus(epsilon_budget=spec.privacy.epsilon, delta=spec.privacy.delta,
                                   accountant=plan.accountant)
    return ledger


def decide(body: Mapping[str, Any], observed: Observed, now: dt.datetime, *, tools: Tools,
           settings: Settings = DEFAULT_SETTINGS) -> Decision:
    """Decide one reconcile of a DPTrainingJob (see the module docstring)."""
    meta = body.get("metadata") or {}
    generation = int(meta.get("generation") or 1)
    status = parse_status(body.get("status"))
    d = StatusDraft(status, now, generation, meta)
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
    if spec is not None:
        d.artifacts = locate_artifacts(d.artifacts, spec, JobRef(
            name=str(meta.get("name", "")), namespace=str(meta.get("namespace", "")),
            uid=str(meta.get("uid", ""))))
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
            delete_existing(out, observed)
            return d.finish(requeue_after=export_step(d, out, spec, observed, settings))
        work = observed.workload
        if work is not None and (work.complete or work.failed) and not work.deleting:
            # The previous run's workload was kept for its logs; a new run needs its name.
            out.delete.append("workload")
            observed = dataclasses.replace(
                observed, workload=dataclasses.replace(work, deleting=True))

    # ------------------------------------------------------------------ validation
    applied = applied_spec(body)
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
            delete_existing(out, observed)
            return d.finish()
    else:
        d.condition("SpecValid", "True", "Valid")
    out.spec = spec

    # ------------------------------------------------------------------ suspend (before prep)
    n = spec.data.num_sequences or known_n
    out.dataset = status.dataset
    if n is None:
        return prepare(d, spec, observed, settings)
    if (observed.prepare is not None and not observed.prepare.deleting
            and not (observed.prepare.complete or observed.prepare.failed)):
        out.delete.append("prepare")  # a finished one stays for its TTL (its logs)
    d.condition("DataPrepared", "True",
                "Given" if spec.data.num_sequences else "Prepared", f"N = {n} sequences")

    # ------------------------------------------------------------------ plan
    plan = d.plan
    if plan is None or plan.spec_generation != generation:
        if plan is None or not started:
            try:
                fresh = tools.plan(spec, n)
                enforced = tools.enforce(fresh, spec.privacy.epsilon, spec.privacy.delta)
            except PodsDoNotFitError as error:
                return fail(d, out, observed, "PodsDoNotFit", str(error), "Planned")
            except ValueError as error:
                return fail(d, out, observed, "InfeasibleBudget", str(error), "Planned")
            if enforced.max_steps < 1:
                return fail(d, out, observed, "InfeasibleBudget",
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
            amended = amend(d, spec, applied, plan, ledger, tools)
            if amended is None:
                spec = applied if applied is not None else spec
                out.spec = spec
            else:
                if observed.workload is not None and trainer_relevant(plan, amended):
                    out.delete.append("workload")  # restart with the new config, not a failure
                plan, ledger = amended
                out.update_config = True
                out.applied_spec = spec_json(spec)
                d.observed_generation = generation
    assert plan is not None
    out.plan = plan
    ledger = _ledger_for(spec, plan, ledger if ledger is not None else d.privacy)

    # ------------------------------------------------------------------ the ledger
    ledger = charge(d, plan, ledger, status, tools)
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
            return fail(d, out, observed, "MechanismMismatch", "; ".join(problems),
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
            return fail(d, out, observed, "MechanismMismatch",
                         "the trainer's ConfigMap differs from the plan: " + "; ".join(problems),
                         "MechanismVerified")

    if ledger.steps_charged >= plan.max_steps or ledger.epsilon_spent >= ledger.epsilon_budget:
        trained = status.progress.step if status.progress is not None else 0
        halt(d, out, observed, plan, ledger, trained_steps=trained)
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

    if plan.pods is None:
        # A plan written before pods were sized with it: size them once, now, and keep them.
        try:
            sized = tools.plan(spec, plan.dataset_size).pods
        except ValueError as error:
            reason = "PodsDoNotFit" if isinstance(error, PodsDoNotFitError) else "PodSizingFailed"
            return fail(d, out, observed, reason,
                         f"the trainer pods of the running plan cannot be sized: {error}",
                         "Planned")
        if sized is not None:
            plan = plan.model_copy(update={"pods": sized})
            d.plan = out.plan = plan
    if spec.data.dataset_ref is not None:
        held = dataset_gate(d, out, spec, plan, ledger, status, observed)
        if held is not None:
            return held
    return run_workload(d, out, spec, plan, ledger, status, observed, settings)
