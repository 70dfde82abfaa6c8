"""The phase machine: charging the ledger, halting at the budget, running the workload.

Pure steps of :func:`dptrain.operator._decisions.decide` once a job has a plan: :func:`charge`
takes the trainer's report into the ledger (counts only grow), :func:`halt` stops a job for good
when its plan or budget is used up, :func:`run_workload` keeps the workload running (create,
restart with backoff, watch for stalls), :func:`prepare` runs data preparation while N is
unknown, and :func:`fail` ends a job that cannot go on.
"""

from __future__ import annotations

import math

from dptrain.api import (
    DPTrainingJobSpec,
    DPTrainingJobStatus,
    PlanStatus,
    PrivacyLedgerStatus,
    WorkloadRef,
)
from dptrain.operator import _kueue as kueue
from dptrain.operator._children import ChildNames
from dptrain.operator._conditions import find, parse_time, timestamp
from dptrain.operator._draft import Decision, StatusDraft
from dptrain.operator._observed import Observed, Settings, Tools


def delete_existing(out: Decision, observed: Observed) -> None:
    """Ask to delete the workload and the data-preparation Job where they still run.

    Finished and failed ones stay (their pods' logs with them) until their
    ``ttlSecondsAfterFinished`` runs out: Kubernetes' TTL controller deletes them.
    """
    for child, state in (("workload", observed.workload), ("prepare", observed.prepare)):
        if state is not None and not state.deleting and not (state.complete or state.failed):
            out.delete.append(child)  # type: ignore[arg-type]


EXPORTABLE_PHASES = ("Succeeded", "BudgetExhausted")


def export_step(d: StatusDraft, out: Decision, spec: DPTrainingJobSpec | None,
                observed: Observed, settings: Settings) -> float | None:
    """After a job ends with a final model: export it once with an export Job.

    Only with a checkpoint volume (an emptyDir went with the pod), only after the workload is
    gone or finished (its last checkpoint written), never again once it succeeded or failed
    (condition ``Exported``). The export pod reports ``status.progress.artifacts``. Returns a
    requeue delay while waiting, else None.
    """
    if (not settings.export or spec is None or d.phase not in EXPORTABLE_PHASES
            or spec.checkpoint.volume is None):
        return None
    job = observed.export
    exported = find(d.conditions, "Exported")
    if d.artifacts is not None and (d.artifacts.export or d.artifacts.export_error):
        if job is not None and not job.deleting:
            out.delete.append("export")
        if d.artifacts.export:
            d.condition("Exported", "True", "Exported",
                        f"Hugging Face export at {d.artifacts.export}", event="Normal")
        else:
            d.condition("Exported", "False", "ExportFailed", d.artifacts.export_error or "",
                        event="Warning")
        return None
    if exported is not None and exported.status != "Unknown":
        return None  # done, or failed for good: never re-run
    if job is None:
        work = observed.workload
        if work is not None and not (work.complete or work.failed):
            return 2.0  # the trainer's last checkpoint first (a finished one is kept for logs)
        out.spec = spec
        out.create.append("export")
        d.condition("Exported", "Unknown", "Exporting", "exporting the final model",
                    event="Normal")
        return 5.0
    if job.failed:
        out.delete.append("export")
        d.condition("Exported", "False", "ExportFailed", job.message or "the export Job failed",
                    event="Warning")
        return None
    if job.complete:  # finished without reporting: nothing more will come
        out.delete.append("export")
        d.condition("Exported", "False", "ExportFailed",
                    "the export Job finished without reporting status.progress.artifacts",
                    event="Warning")
        return None
    return 5.0


def fail(d: StatusDraft, out: Decision, observed: Observed, reason: str, message: str,
          condition: str | None = None) -> Decision:
    """End the job ``Failed`` (with ``reason``), deleting its workload; the ledger stays."""
    if condition is not None:
        d.condition(condition, "False", reason, message, event="Warning")
    d.condition("Failed", "True", reason, message)
    d.condition("Running", "False", reason)
    d.observed_generation = d.generation
    d.set_phase("Failed", reason, message)
    d.workload = None
    delete_existing(out, observed)
    return d.finish()


def prepare(d: StatusDraft, spec: DPTrainingJobSpec, observed: Observed, settings: Settings
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
        last = observed.prepare_pods.termination if observed.prepare_pods else None
        return fail(d, out, observed, "DataPreparationFailed",
                     "; ".join(filter(None, [prep.message, last]))
                     or "the data-preparation Job failed", "DataPrepared")
    if prep is not None and prep.complete:
        finished = prep.finished or prep.created or d.now
        waited = (d.now - finished).total_seconds()
        if waited > settings.report_grace:
            return fail(d, out, observed, "DatasetNotReported",
                         "data preparation finished without reporting status.dataset",
                         "DataPrepared")
        return d.finish(requeue_after=max(1.0, settings.report_grace - waited))
    if prep is None:
        out.create += ["config", "rbac", "prepare"]
    d.condition("DataPrepared", "False", "Preparing",
                "measuring the dataset size N and preparing sequences", event="Normal")
    if (prep is None and kueue.queued_at_creation(d)) or (prep is not None and prep.suspended):
        return kueue.hold(d, "data-preparation Job")
    kueue.note_admitted(d)
    d.set_phase("Preparing", "Preparing", "running data preparation")
    return d.finish()


def charge(d: StatusDraft, plan: PlanStatus, ledger: PrivacyLedgerStatus,
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
        ledger = ledger.merge(report, charged_at=timestamp(d.now))
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


def halt(d: StatusDraft, out: Decision, observed: Observed, plan: PlanStatus,
          ledger: PrivacyLedgerStatus, *, trained_steps: int) -> None:
    """Stop for good: the budget (or the plan) is used up.

    ``Succeeded`` needs the model to have done all its iterations (the trainer's own step count),
    not just the ledger to reach them: restarts charge repeated steps again, so the ledger can
    reach ``iterations`` before the model does. Such a job is ``BudgetExhausted``
    (``MaxStepsReached``): it may not run another step, but it did not finish.
    """
    delete_existing(out, observed)
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


def run_workload(d: StatusDraft, out: Decision, spec: DPTrainingJobSpec, plan: PlanStatus,
         ledger: PrivacyLedgerStatus, status: DPTrainingJobStatus, observed: Observed,
         settings: Settings) -> Decision:
    """Keep the workload running: create it, restart it after failures, watch for stalls."""
    work = observed.workload
    work_name = ChildNames.of(str((d.original_meta or {}).get("name", ""))).workload
    end_state = status.progress.end_state if status.progress is not None else None
    out.restart = d.restarts + d.disruptions  # the attempt: its pods are told apart by it
    if work is not None and work.deleting:
        return d.finish(requeue_after=2.0)
    if work is not None and (work.complete or work.failed):
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
        pods = observed.pods
        why = "; ".join(filter(None, [work.message, pods.termination if pods else None]))
        past_deadline = spec.compute.deadline is not None and d.now >= spec.compute.deadline
        if work.message.startswith("DeadlineExceeded") or past_deadline:
            # The Job's reason, or (JobSets report only "FailedJobs") the clock.
            return fail(d, out, observed, "DeadlineExceeded",
                         f"spec.compute.deadline passed before training finished ({why})")
        if pods is not None and pods.disrupted:
            # Preemption or a node drain: not the trainer's fault, not counted.
            d.disruptions += 1
            delay = settings.backoff(1)
            d.condition("Restarting", "True", "Disrupted",
                        f"pods {', '.join(pods.disrupted)} were disrupted ({why or 'no reason'})"
                        f"; restart in {delay:g}s from the ledger, not counted against "
                        f"spec.maxRestarts ({d.disruptions} disruptions so far)",
                        event="Warning")
        elif d.restarts >= spec.max_restarts:
            return fail(d, out, observed, "BackoffLimitExceeded",
                         f"the trainer failed {d.restarts + 1} times "
                         f"({why or 'no reason'})"
                         f"; spec.maxRestarts is {spec.max_restarts}")
        else:
            d.restarts += 1
            delay = settings.backoff(d.restarts)
            d.condition("Restarting", "True", "TrainerFailed",
                        f"{why or 'the trainer failed'}; restart {d.restarts} of "
                        f"{spec.max_restarts} in {delay:g}s from the ledger", event="Warning")
        out.delete.append("workload")  # the next attempt reuses its name
        d.condition("Running", "False", "Restarting")
        return d.finish(requeue_after=delay)
    if work is None:
        restarting = find(d.conditions, "Restarting")
        if restarting is not None and restarting.status == "True":
            since = parse_time(restarting.last_transition_time) or d.now
            wait = settings.backoff(d.restarts) - (d.now - since).total_seconds()
            if wait > 0:
                return d.finish(requeue_after=wait)
            d.condition("Restarting", "False", "Restarted",
                        f"restart {d.restarts} of {spec.max_restarts}"
                        + (f", after {d.disruptions} disruptions (not counted)"
                           if d.disruptions else ""))
        if spec.compute.deadline is not None:
            left = math.ceil((spec.compute.deadline - d.now).total_seconds())
            if left <= 0:
                return fail(d, out, observed, "DeadlineExceeded",
                             f"spec.compute.deadline {spec.compute.deadline.isoformat()} has "
                             "passed; no workload is started")
            out.active_deadline_seconds = left
        out.create += ["config", "rbac", "service", "workload"]
        d.workload = WorkloadRef(api_version=settings.workload_api_version,
                                 kind=settings.workload_kind, name=work_name)
        if find(d.conditions, "Stalled") is not None:
            d.condition("Stalled", "False", "Started")
        if kueue.queued_at_creation(d):
            # Created suspended: Kueue admits it by unsuspending it (a watch event wakes us).
            return kueue.hold(d, "trainer workload", requeue_after=settings.stall_timeout)
        d.condition("Running", "True", "WorkloadCreated",
                    f"resuming at {ledger.steps_charged} steps charged" if ledger.steps_charged
                    else "the trainer workload was created", event="Normal")
        d.set_phase("Running", "WorkloadCreated", "the trainer workload was created")
        # Soon again: pods are not watched, and the scheduler may not place them.
        return d.finish(requeue_after=min(settings.stall_timeout, settings.pod_poll))
    if d.workload is None:
        d.workload = WorkloadRef(api_version=settings.workload_api_version,
                                 kind=settings.workload_kind, name=work.name)
    if work.suspended:
        # Waiting for admission (or preempted by Kueue): no progress expected, no stall clock,
        # and never unsuspended by us. The watch on the workload wakes the job when it runs.
        return kueue.hold(d, "trainer workload", requeue_after=settings.stall_timeout)
    kueue.note_admitted(d)
    # The workload exists and is admitted: are its pods placed? Then watch for stalls.
    waiting = scheduling(d, observed, settings)
    if waiting is not None:
        return waiting
    running = find(d.conditions, "Running")
    if running is None or running.status != "True":
        d.condition("Running", "True", "WorkloadCreated", "the trainer workload is running")
    d.set_phase("Running", "WorkloadCreated", "the trainer workload is running")
    placed = find(d.conditions, "PodsScheduled")
    last = max(filter(None, [
        parse_time(status.progress.last_update) if status.progress else None,
        parse_time(ledger.last_charged_time), work.created,
        parse_time(getattr(find(d.conditions, "Running"), "last_transition_time", None)),
        # The stall clock starts when the pods are placed, not when they were asked for.
        parse_time(placed.last_transition_time) if placed and placed.status == "True" else None,
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
    poll = settings.pod_poll if observed.pods is not None and (
        observed.pods.scheduled < observed.pods.total or not observed.pods.total) else None
    quiet_left = settings.stall_timeout - quiet
    return d.finish(requeue_after=quiet_left if poll is None else min(quiet_left, poll))


def scheduling(d: StatusDraft, observed: Observed, settings: Settings) -> Decision | None:
    """``PodsScheduled`` from the pods; a decision to wait when the scheduler cannot place them.

    Unschedulable pods keep the job ``Pending`` (with the scheduler's message) and stop the stall
    clock: a job that waits for nodes is not a stalled trainer.
    """
    pods = observed.pods
    if pods is None:
        return None
    if pods.unschedulable:
        name, message = pods.unschedulable[0]
        more = len(pods.unschedulable) - 1
        text = (f"pod {name} cannot be scheduled: {message or 'no reason given'}"
                + (f" (and {more} more pods)" if more else ""))
        prior = find(d.conditions, "PodsScheduled")
        # One event when the pods become unschedulable, not one per changed scheduler message.
        again = prior is not None and prior.status == "False"
        d.condition("PodsScheduled", "False", "Unschedulable", text,
                    event=None if again else "Warning")
        d.condition("Running", "False", "Unschedulable", text)
        d.set_phase("Pending", "Unschedulable", text)
        return d.finish(requeue_after=settings.pod_poll)
    if pods.total and pods.scheduled == pods.total:
        d.condition("PodsScheduled", "True", "Scheduled",
                    f"{pods.scheduled} of {pods.total} trainer pods scheduled",
                    event="Normal" if find(d.conditions, "PodsScheduled") else None)
    return None
