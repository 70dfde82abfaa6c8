"""Smooth loss curves in T, fitted like McKenna et al. (2025), for horizon tables.

A *horizon table* (``dptrain sweep --steps 16,64,256,...``) holds, for every (M, σ̄, learning
rate, B), the held-out loss at the end of runs of several lengths T, each run with its own
complete schedule: the loss a job of T steps ends at. :func:`best_points` folds learning rates
and batches (the minimum, as the paper does: both are tuned, not modelled) into one measured
point per (M, σ̄, T), and :func:`fit_curves` fits each (M, σ̄) curve with a power law that
starts from a plateau:

    L(T) = E + (L₀ − E) / (1 + A · T^α),   A > 0, α ≥ 0, E < L < L₀,

i.e. a straight line in (log T, log((L − E) / (L₀ − L))). For T ≫ A^(−1/α) it is the paper's
``E + B · T^(−α)``; a noisy curve first sits near L₀ (the loss of an untrained model: the
noise swamps the gradient of short runs) and only then falls, which a pure power law, convex in
log T from the first step, cannot follow (leave-one-out on the shipped table: interior horizons
3.9 % → under 3 %). L₀ = ∞ is the pure power law (kept in the candidates). The fit:

* the **irreducible term E** is fitted from the data for each curve (a grid over
  [0, 0.98 · the curve's lowest loss], the least squared log-residual): noise lifts the level a
  curve of the measured length decays towards, so one E per model mis-shapes the noisy curves;
* **L₀** is shared by a model's curves (one untrained model): the held-out loss measured after
  the first step (every sweep run logs it; :func:`initial_losses`), or, for a table without it,
  the candidate at or above the model's highest measured loss (or ∞) with the least summed
  squared log-residual of all curves (with three horizons a curve fits almost any L₀, so the
  measured one is preferred);
* α ≥ 0 makes every curve non-increasing in T; beyond the longest measured horizon the planner
  holds the curve flat (no gain is predicted that the data do not show).

Before the fit, each measured point is bounded by the noisier points of its (M, T)
(:func:`bounded_by_noisier`: less noise never hurts).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

E_GRID = 120
"""Candidates for the irreducible term E per curve."""
PLATEAU_FACTORS = (1.0, 1.02, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0, math.inf)
"""Candidates for L₀, as multiples of the model's highest measured loss (∞: pure power law)."""
_GAP = 1e-3
"""Relative margin keeping measured losses strictly inside (E, L₀) for the log-odds."""


@dataclasses.dataclass(frozen=True)
class FittedCurve:
    """L(T) = E + (L₀ − E) / (1 + A·T^α) (L₀ = ∞: E + A⁻¹·T^(−α)), and its points.

    ``irreducible`` is E, ``plateau`` L₀, ``scale`` A (for L₀ = ∞ the power law's coefficient
    itself) and ``exponent`` α.
    """

    irreducible: float
    scale: float
    exponent: float
    steps: tuple[float, ...]
    losses: tuple[float, ...]
    plateau: float = math.inf

    def __call__(self, steps: np.ndarray) -> np.ndarray:
        """The fitted loss at ``steps``."""
        decay = self.scale * np.power(np.asarray(steps, float), -self.exponent)
        if math.isinf(self.plateau):
            out: np.ndarray = self.irreducible + decay
            return out
        # (L − E) / (L₀ − L) = decay  ⇔  L = (E + L₀·decay) / (1 + decay)
        out = (self.irreducible + self.plateau * decay) / (1.0 + decay)
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


def bounded_by_noisier(points: Mapping[tuple[float, float], Mapping[float, float]],
                       lr_at: Mapping[tuple[float, float], Mapping[float, float]] | None = None
                       ) -> tuple[dict[tuple[float, float], dict[float, float]],
                                  dict[tuple[float, float], dict[float, float]]]:
    """Each point lowered to the best loss measured at the same (M, T) with more noise.

    Less noise never hurts: the best loss over learning rates is non-decreasing in σ̄, so a run
    measured at a noisier σ̄ bounds every less noisy cell of its (M, T) from above, in
    expectation (train that run's configuration with less noise). A cell swept with fewer
    learning rates (σ̄ = 2^-14 and 2^-16 at one rate, say, where 2^-12 had three) can sit far
    above that bound; isotonic regression would average it with its tuned neighbour and lift
    the neighbour. The learning rate follows the bound (the noisier cell's).

    Returns the bounded ``{(M, σ̄): {T: loss}}`` and ``{(M, σ̄): {T: learning rate}}``.
    """
    out = {k: dict(v) for k, v in points.items()}
    lrs = {k: dict(v) for k, v in (lr_at or {}).items()}
    for m in {m for m, _ in points}:
        ratios = sorted((r for mm, r in points if mm == m), reverse=True)  # noisiest first
        best: dict[float, tuple[float, float | None]] = {}
        for r in ratios:
            for t, loss in out[(m, r)].items():
                if t in best and best[t][0] < loss:
                    out[(m, r)][t], rate = best[t]
                    if rate is not None:
                        lrs.setdefault((m, r), {})[t] = rate
                else:
                    best[t] = (loss, lrs.get((m, r), {}).get(t))
    return out, lrs


def initial_losses(rows: Iterable[Mapping[str, float]]) -> dict[float, float]:
    """The held-out loss after the first step, per model: ``{M: L₀}`` (models without it left out).

    Every run of a sweep shares the seed, so its step-1 loss is the same; the largest is kept.
    """
    out: dict[float, float] = {}
    for row in rows:
        if float(row["step"]) == 1 and float(row.get("horizon", 0.0)) > 1:
            m = float(row["model_params"])
            out[m] = max(out.get(m, -math.inf), float(row["loss"]))
    return out


def _fit_one(log_t: np.ndarray, loss: np.ndarray, plateau: float
             ) -> tuple[float, float, float, float]:
    """(E, log-scale, α, squared log-residual) of the best curve with plateau L₀ = ``plateau``.

    For each E of the grid, y = log(L − E) − log(L₀ − L) (or log(L − E) for L₀ = ∞) is fitted
    by least squares as log A − α·log T with α ≥ 0 (a rising fit is replaced by the best flat
    one); the E with the least squared log-residual of L wins. Vectorised over the grid.
    """
    lowest = float(loss.min())
    e = np.linspace(0.0, 0.98 * lowest, E_GRID)[:, None]
    top = np.inf if math.isinf(plateau) else plateau * (1 - _GAP)
    clipped = np.clip(loss[None, :], e + _GAP * lowest, top)
    y = np.log(clipped - e)
    if not math.isinf(plateau):
        y = y - np.log(plateau - clipped)
    mean_x, mean_y = log_t.mean(), y.mean(axis=1, keepdims=True)
    sxx = float(np.sum((log_t - mean_x) ** 2))
    slope = (np.sum((log_t - mean_x) * (y - mean_y), axis=1, keepdims=True) / sxx
             if sxx > 0 else np.zeros_like(mean_y))
    slope = np.minimum(slope, 0.0)  # a curve may not rise with T: the best flat one
    intercept = mean_y - slope * mean_x
    decay = np.exp(intercept + slope * log_t[None, :])
    fitted = e + decay if math.isinf(plateau) else (e + plateau * decay) / (1 + decay)
    err = np.sum(np.log(fitted / loss[None, :]) ** 2, axis=1)
    i = int(np.argmin(err))
    return float(e[i, 0]), float(intercept[i, 0]), float(-slope[i, 0]), float(err[i])


def fit_curves(points: Mapping[tuple[float, float], Mapping[float, float]],
               initial: Mapping[float, float] | None = None
               ) -> dict[tuple[float, float], FittedCurve]:
    """One fitted curve per (M, σ̄): E per curve, the plateau L₀ shared by a model's curves.

    Args:
        points: ``{(M, σ̄): {T: loss}}`` (see :func:`best_points`).
        initial: measured L₀ per model (see :func:`initial_losses`); other models search it.
    """
    by_model: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for m, r in points:
        by_model[m].append((m, r))
    out: dict[tuple[float, float], FittedCurve] = {}
    for keys in by_model.values():
        data = {k: (np.log(np.array(sorted(points[k]), float)),
                    np.array([points[k][t] for t in sorted(points[k])], float)) for k in keys}
        highest = max(float(loss.max()) for _, loss in data.values())
        best: tuple[float, dict[tuple[float, float], tuple[float, float, float, float]]] = \
            (math.inf, {})
        model = keys[0][0]
        floor = highest * (1 + 2 * _GAP)  # every measured loss strictly below L₀
        candidates = ([max(initial[model], floor)] if initial and model in initial else
                      [max(floor, highest * factor) for factor in PLATEAU_FACTORS])
        for plateau in candidates:
            fits = {k: _fit_one(log_t, loss, plateau) for k, (log_t, loss) in data.items()}
            err = sum(f[3] for f in fits.values())
            if err < best[0] - 1e-15:
                best = (err, {k: (plateau, *f[:3]) for k, f in fits.items()})
        for k, (plateau, e_star, log_a, alpha) in best[1].items():
            log_t, loss = data[k]
            out[k] = FittedCurve(e_star, math.exp(log_a), alpha,
                                 tuple(float(x) for x in np.exp(log_t)),
                                 tuple(float(x) for x in loss), plateau)
    return out
