"""Smooth loss curves in T, fitted like McKenna et al. (2025), for horizon tables.

A *horizon table* (``dptrain sweep --steps 16,64,256,...``) holds, for every (M, σ̄, learning
rate, B), the held-out loss at the end of runs of several lengths T, each run with its own
complete schedule: the loss a job of T steps ends at. :func:`best_points` folds learning rates
and batches (the minimum, as the paper does: both are tuned, not modelled) into one measured
point per (M, σ̄, T), and :func:`fit_curves` fits each (M, σ̄) curve with

    L(T) = E_M + A_σ̄ · T^(−α_σ̄),   A ≥ 0, α ≥ 0,

the irreducible term E_M shared by every σ̄ of a model and fitted from the data (a grid over
[0, 0.98 · the model's lowest loss], each candidate scored by the squared log-residual of every
curve's least-squares fit of log(L − E) = log A − α log T). α ≥ 0 makes every curve
non-increasing in T; beyond the longest measured horizon the planner holds the curve flat (no
gain is predicted that the data do not show).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

E_GRID = 120
"""Candidates for the irreducible term E per model."""


@dataclasses.dataclass(frozen=True)
class FittedCurve:
    """L(T) = irreducible + scale · T^(−exponent), and how well it fits its points."""

    irreducible: float
    scale: float
    exponent: float
    steps: tuple[float, ...]
    losses: tuple[float, ...]

    def __call__(self, steps: np.ndarray) -> np.ndarray:
        """The fitted loss at ``steps``."""
        out: np.ndarray = self.irreducible + self.scale * np.power(steps, -self.exponent)
        return out

    @property
    def max_relative_residual(self) -> float:
        """Largest |fit / measured − 1| over the curve's points."""
        fitted = self(np.array(self.steps))
        return float(np.max(np.abs(fitted / np.array(self.losses) - 1)))


def best_points(rows: Iterable[Mapping[str, float]]
                ) -> tuple[dict[tuple[float, float], dict[float, float]],
                           dict[tuple[float, float], dict[float, float]]]:
    """Final loss of each run, minimised over learning rates and batches.

    Returns ``{(M, σ̄): {T: loss}}`` from the rows with ``step == horizon`` (σ̄ > 0), and the
    learning rate of the best run at each (M, σ̄, T): ``{(M, σ̄): {T: learning rate}}``.
    """
    best: dict[tuple[float, float], dict[float, float]] = defaultdict(dict)
    lr_at: dict[tuple[float, float], dict[float, float]] = defaultdict(dict)
    for row in rows:
        horizon = float(row.get("horizon", 0.0))
        step, ratio = float(row["step"]), float(row["noise_batch_ratio"])
        if horizon <= 0 or step != horizon or ratio <= 0:
            continue
        key, loss = (float(row["model_params"]), ratio), float(row["loss"])
        if loss < best[key].get(step, math.inf):
            best[key][step] = loss
            lr_at[key][step] = float(row["learning_rate"])
    return dict(best), dict(lr_at)


def _fit_one(log_t: np.ndarray, loss: np.ndarray, e_star: float) -> tuple[float, float, float]:
    """(log A, α, squared log-residual) of log(L − E) = log A − α log T, with α ≥ 0."""
    excess = np.maximum(loss - e_star, 1e-9)
    if len(log_t) >= 2:
        slope, intercept = np.polyfit(log_t, np.log(excess), 1)
    else:
        slope, intercept = 0.0, float(np.log(excess[0]))
    if slope > 0:  # a curve may not rise with T: the best flat one
        slope, intercept = 0.0, float(np.log(np.mean(excess)))
    fitted = e_star + np.exp(intercept + slope * log_t)
    return float(intercept), float(-slope), float(np.sum(np.log(fitted / loss) ** 2))


def fit_curves(points: Mapping[tuple[float, float], Mapping[float, float]]
               ) -> dict[tuple[float, float], FittedCurve]:
    """One fitted curve per (M, σ̄), the irreducible term shared by each model's curves."""
    by_model: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for m, r in points:
        by_model[m].append((m, r))
    out: dict[tuple[float, float], FittedCurve] = {}
    for keys in by_model.values():
        data = {k: (np.log(np.array(sorted(points[k]), float)),
                    np.array([points[k][t] for t in sorted(points[k])], float)) for k in keys}
        lowest = min(float(loss.min()) for _, loss in data.values())
        best_e, best_err = 0.0, math.inf
        for e_star in np.linspace(0.0, 0.98 * lowest, E_GRID):
            err = sum(_fit_one(log_t, loss, float(e_star))[2] for log_t, loss in data.values())
            if err < best_err - 1e-15:
                best_e, best_err = float(e_star), err
        for k, (log_t, loss) in data.items():
            log_a, alpha, _ = _fit_one(log_t, loss, best_e)
            out[k] = FittedCurve(best_e, math.exp(log_a), alpha,
                                 tuple(float(x) for x in np.exp(log_t)),
                                 tuple(float(x) for x in loss))
    return out
