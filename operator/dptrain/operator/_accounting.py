"""The operator's own accountant: ε spent from the plan and the steps charged, never the trainer's.

The operator keeps the privacy ledger itself. It derives ε spent from the plan's mechanism
(``dptrain.planner.mechanism_of``: q, σ, δ, accountant, N, physical batch) and the steps
charged, with the plan's curve (``dptrain.planner.plan_curve``, the same one the trainer reports
with, so status, progress bar and report agree), built once per plan and cached in-process
(building costs a few PLD compositions; a look-up costs microseconds).

Formal guarantees:
    1. ``epsilon_spent(plan, delta, t)`` is never below the exact ε of t steps of the plan's
       mechanism (the curve is conservative between grid points and exact beyond it).
    2. ``enforce(plan, budget, delta).max_steps`` is the largest t ≤ iterations whose exact ε
       is ≤ ``budget``, and ``epsilon_spent`` at exactly that t equals the exact ε (t is the
       curve's last point), so a job halted there reports ε spent ≤ budget.
"""

from __future__ import annotations

import sys
import threading

from dptrain.api import PlanStatus
from dptrain.planner import mechanism_of, plan_curve
from dptrain.privacy import EpsilonCurve, epsilon, largest_steps_within

__all__ = ["Accountant", "json_safe", "mechanism_of"]


def json_safe(value: float) -> float:
    """ε as a finite number: +inf (nothing certifiable) becomes the largest double.

    Kubernetes objects are JSON, which has no infinity; the largest double still exceeds every
    budget, so every comparison decides as +inf would.
    """
    return min(value, sys.float_info.max)


class Accountant:
    """ε-curves per plan, cached; thread-safe (curves are built in worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def curve(self, plan: PlanStatus, delta: float) -> EpsilonCurve:
        """The plan's curve (``dptrain.planner.plan_curve``; cached per plan and δ)."""
        with self._lock:  # one build per plan, even when several reconciles ask at once
            return plan_curve(plan, delta)

    def epsilon_spent(self, plan: PlanStatus, delta: float, steps: int) -> float:
        """ε after ``steps`` steps of the plan (conservative; exact at ``plan.max_steps``)."""
        if steps <= 0:
            return 0.0
        return json_safe(self.curve(plan, delta).epsilon_at(steps))

    def epsilon_exact(self, plan: PlanStatus, delta: float, steps: int) -> float:
        """The exact ε of ``steps`` steps of the plan's mechanism (slow: one composition)."""
        return json_safe(epsilon(mechanism_of(plan, delta), steps)) if steps > 0 else 0.0

    def enforce(self, plan: PlanStatus, budget: float, delta: float, *,
                iterations: int | None = None) -> PlanStatus:
        """The plan with ``maxSteps``/``epsilonPlanned`` from this accountant.

        ``maxSteps`` becomes the largest t ≤ iterations with exact ε(t) ≤ ``budget``: the
        planner's value is checked (and lowered if this accountant disagrees), then extended
        when the budget or the iterations grew (galloping from it, so a few compositions).

        Args:
            plan: a plan (from the planner, or the current one being amended).
            budget: total ε the job may spend.
            delta: the job's δ.
            iterations: new iteration count (an amendment), else the plan's.
        """
        iterations = plan.iterations if iterations is None else iterations
        mechanism = mechanism_of(plan, delta)
        start = max(0, min(plan.max_steps, iterations))
        if start > 0 and epsilon(mechanism, start) > budget:
            max_steps = largest_steps_within(mechanism, budget, lo=0, hi=start - 1)
        elif start < iterations:
            max_steps = largest_steps_within(mechanism, budget, lo=start, hi=iterations)
        else:
            max_steps = start
        enforced = plan.model_copy(update={"iterations": iterations, "max_steps": max_steps})
        planned = self.epsilon_spent(enforced, delta, max_steps)
        return enforced.model_copy(update={"epsilon_planned": planned})
