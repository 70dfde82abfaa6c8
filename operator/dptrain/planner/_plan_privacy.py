"""A plan's privacy, defined once: its DP mechanism and "ε after t steps of the plan".

The operator (its ledger and ``status.privacy``), the trainer (its ledger, progress bar, report
and plot) and the planner all derive the mechanism of a plan with :func:`mechanism_of` and the
ε of t steps with :func:`plan_curve`, so they cannot disagree about what a step costs.

The curve's grid depends on the plan alone (never on who asks, or how far ahead it looks): about
:data:`GEOMETRIC_POINTS` geometric step counts up to ``maxSteps`` (fine where ε grows fastest),
:data:`LINEAR_POINTS` evenly spaced ones (so a plot over steps is not a coarse staircase), and
the anchors ``maxSteps`` and ``iterations``. Beyond ``maxSteps`` (steps charged again after
restarts) ε is computed exactly.

Formal guarantees:
    1. ``plan_curve(plan, δ).epsilon_at(t) ≥ epsilon(mechanism_of(plan, δ), t)`` for every
       t ≥ 0, with equality at every grid point (``maxSteps`` and ``iterations`` included) and
       for every t > ``maxSteps``.
    2. Two calls with the same plan and δ give the same curve, so everyone who reports ε of a
       plan (status, progress bar, report, plot) reports the same value for the same count.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

from dptrain.privacy import AccountantName, DpSgdMechanism, EpsilonCurve

# 24 exact compositions in all (as many as a curve cost before it was shared): the geometric
# points resolve small counts, the linear ones keep the plot's steps at most 1/8 of maxSteps.
GEOMETRIC_POINTS = 16
LINEAR_POINTS = 8


class PlanMechanismFields(Protocol):
    """The fields of a plan that fix its mechanism (``dptrain.api.PlanStatus`` has them)."""

    @property
    def sampling_rate(self) -> float:
        """The sampling rate q."""
        ...

    @property
    def noise_multiplier(self) -> float:
        """The noise multiplier σ."""
        ...

    @property
    def accountant(self) -> AccountantName:
        """``pld`` or ``rdp``."""
        ...

    @property
    def dataset_size(self) -> int:
        """The dataset size N."""
        ...

    @property
    def physical_batch_size(self) -> int:
        """The fixed batch Poisson batches are padded/truncated to."""
        ...


class PricedPoint(NamedTuple):
    """A plan's mechanism fields while the planner is still choosing its steps."""

    sampling_rate: float
    noise_multiplier: float
    accountant: AccountantName
    dataset_size: int
    physical_batch_size: int


class PlanStepFields(PlanMechanismFields, Protocol):
    """A plan's mechanism and its step counts (``dptrain.api.PlanStatus`` has them)."""

    @property
    def iterations(self) -> int:
        """Planned steps."""
        ...

    @property
    def max_steps(self) -> int:
        """Most steps within the budget."""
        ...


def mechanism_of(plan: PlanMechanismFields, delta: float) -> DpSgdMechanism:
    """The DP-SGD mechanism a plan runs, at the job's δ.

    Truncation to the physical batch is always accounted: it can only make ε larger.
    """
    return DpSgdMechanism(sampling_rate=plan.sampling_rate,
                          noise_multiplier=plan.noise_multiplier, delta=delta,
                          accountant=plan.accountant, dataset_size=plan.dataset_size,
                          physical_batch_size=plan.physical_batch_size)


def plan_grid(plan: PlanStepFields) -> tuple[int, ...]:
    """The extra step counts of a plan's curve: evenly spaced ones and the plan's anchors.

    (The geometric part comes from :class:`~dptrain.privacy.EpsilonCurve` itself.)
    """
    top = max(1, plan.max_steps)
    linear = {math.ceil(top * k / LINEAR_POINTS) for k in range(1, LINEAR_POINTS + 1)}
    anchors = {plan.max_steps, plan.iterations}
    return tuple(sorted(t for t in linear | anchors if 0 < t <= top))


def plan_curve(plan: PlanStepFields, delta: float) -> EpsilonCurve:
    """"ε after t steps" of ``plan`` at δ (see the module's Formal guarantees)."""
    return EpsilonCurve.build(mechanism_of(plan, delta), max(1, plan.max_steps),
                              points=GEOMETRIC_POINTS, anchors=plan_grid(plan))
