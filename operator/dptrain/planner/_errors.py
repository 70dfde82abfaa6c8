"""Errors of the planner: an unaffordable budget says which, by how much, and what would do."""

from __future__ import annotations

import math
from typing import Literal

BudgetName = Literal["compute", "privacy", "data", "memory", "deadline"]


class InfeasibleBudgetError(ValueError):
    """No configuration satisfies the budgets (and pins) of a job.

    Attributes:
        budget: which budget is short: ``compute`` (not one step affordable), ``privacy`` (ε too
            small for any σ in range, or not one step within ε), ``data`` (δ ≥ 1/N, or a batch
            larger than the dataset), ``memory`` (the model does not fit the accelerators) or
            ``deadline``.
        field: the spec field to change, in manifest spelling (``spec.compute.flops``).
        required: the smallest (or, for δ, largest) value of that budget that would be feasible,
            when the planner can name one.
        available: the value the job has.
        shortfall: how much is missing, as a human-readable phrase.
    """

    def __init__(self, budget: BudgetName, message: str, *, field: str | None = None,
                 required: float | None = None, available: float | None = None) -> None:
        self.budget: BudgetName = budget
        self.field = field
        self.required = required
        self.available = available
        where = f"{field}: " if field else ""
        super().__init__(f"{where}infeasible {budget} budget: {message}")


class ExtrapolationError(ValueError):
    """Every affordable configuration would rest on the loss model far outside its data.

    The planner refuses rather than guess; ``allow_extrapolation=True`` (``dptrain plan
    --allow-extrapolation``) plans anyway, with the extrapolation named in the warnings.

    Attributes:
        reasons: how the best affordable configuration leaves the data.
    """

    def __init__(self, message: str, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__(message)


def round_up(x: float) -> float:
    """X rounded up to two significant digits."""
    if x <= 0 or not math.isfinite(x):
        return x
    scale = 10.0 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / scale - 1e-9) * scale


def round_down(x: float) -> float:
    """X rounded down to one significant digit."""
    scale = 10.0 ** math.floor(math.log10(x))
    return math.floor(x / scale + 1e-9) * scale
