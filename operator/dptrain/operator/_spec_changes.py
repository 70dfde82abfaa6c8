"""Spec changes: validation, the applied spec, and which changes a running job may take.

The spec in force is recorded in the ``dptrain.io/applied-spec`` annotation. Once training has
started (steps are charged under a plan), only the fields in :data:`MUTABLE_AFTER_START` may
change: :func:`amend` re-enforces the plan for a new budget or iteration count (refusing one that
would need more ε than the budget) and refuses everything else with ``SpecAccepted=False``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pydantic

from dptrain.api import (
    DPTrainingJobSpec,
    InvalidJobError,
    PlanStatus,
    PrivacyLedgerStatus,
    parse_job,
    semantic_errors,
)
from dptrain.operator._draft import StatusDraft
from dptrain.operator._observed import Tools

ANNOTATION_APPLIED_SPEC = "dptrain.io/applied-spec"


#: Spec fields that may change after training has started (they do not touch the accounting).
MUTABLE_AFTER_START = frozenset({
    ("suspend",), ("maxRestarts",), ("ttlSecondsAfterFinished",), ("image",),
    ("privacy", "epsilon"),
    ("training", "iterations"), ("checkpoint", "intervalSteps"), ("checkpoint", "keep"),
})


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


def applied_spec(body: Mapping[str, Any]) -> DPTrainingJobSpec | None:
    """The spec in force, from the applied-spec annotation (None: absent or unreadable)."""
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


def trainer_relevant(old: PlanStatus, new: tuple[PlanStatus, PrivacyLedgerStatus]) -> bool:
    """Whether an amended plan changes what the running trainer does (its steps)."""
    plan, _ = new
    return (plan.max_steps, plan.iterations) != (old.max_steps, old.iterations)


def amend(d: StatusDraft, spec: DPTrainingJobSpec, applied: DPTrainingJobSpec | None,
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
