"""Loss models: predicted cross-entropy L(M, T, σ̄) for the planner's search.

:class:`TableLossModel` follows McKenna et al. (2025): it reads a results table (one row per
model size, noise-batch ratio σ̄, learning rate, step and loss), smooths it, and interpolates
linearly in log L over (log M, log T, log σ̄). Smoothing, in order:

1. Early steps: rows with T < 1000 are dropped when every curve keeps at least
   ``MIN_POINTS_AFTER_DROP`` points after it (the paper's rule). Short sweeps (e.g. the CPU
   table shipped with dptrain, a few hundred steps) cannot afford that; they drop the first
   ``SHORT_CURVE_DROP_FRACTION`` of each curve's steps instead (the warm-up transient).
2. A centred rolling mean over ``ROLLING_WINDOW`` logged points per curve.
3. Each curve is resampled in (log T, log L) onto common T nodes spanning all curves' ranges.
4. Minimum over learning rates and batches (both tuned, not modelled; the argmin at the
   last node is kept as the suggested learning rate).
5. Isotonic regression: non-increasing in T, then non-decreasing in σ̄; a final running min/max
   pass makes both hold exactly (a running min over T keeps monotonicity in σ̄).
6. Extrapolation in T: each curve's tail (last half of the nodes) is fitted with
   L = exp(m·log T + b) + E*, E* being the fitted asymptote of that model's least-noise curve
   (the σ̄ → 0 limit), and extended on nodes up to T = 2^24 but at most ``MAX_T_EXTRAPOLATION``
   (2^7) times the longest measured curve; beyond, the loss is held flat (no gain is predicted
   from steps far outside the data). A curve's slope m is held to at least that of the next less
   noisy curve (noise does not stop mattering beyond the data; short noisy curves, falling
   steeply from a high start, would otherwise cross the clean ones).

Outside the table's domain: M and small σ̄ are clamped to the nearest table value (for σ̄ this is
pessimistic: less noise never hurts), large σ̄ is extrapolated linearly in log-log with the last
segment's (non-negative) slope, capped at the table's largest loss; T beyond the measured range
uses the power-law extension (held flat past 2^7 × the measured range) and T below it is
clamped. :meth:`TableLossModel.extrapolation` says which of these applied.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy.interpolate import PchipInterpolator, RegularGridInterpolator
from scipy.optimize import isotonic_regression

from dptrain.planner._curve_fit import (
    FittedCurve,
    best_points,
    bounded_by_noisier,
    fit_curves,
    initial_losses,
)
from dptrain.planner._sweep_table import read_results_csv

PAPER_MIN_STEP = 1000
MIN_POINTS_AFTER_DROP = 5
SHORT_CURVE_DROP_FRACTION = 0.1
ROLLING_WINDOW = 3
MAX_T_NODES = 16
HORIZON_NODES = 24
RATIO_NODES_PER_OCTAVE = 4
THROUGH_MEASURED = True
"""Horizon tables: the fitted curve corrected to pass through each measured (min over learning
rate and batch) point; the fit alone misses some by a few percent where the best batch changes
between horizons (the power law's shape is kept between them)."""
EXTRAPOLATE_T_TO = 2.0**24
MAX_T_EXTRAPOLATION = 2.0**7
"""Farthest the power law is followed, as a multiple of the measured steps (the paper's 128K-step
curves reach 2^24; a CPU table of a few hundred steps is not followed for five decades)."""


@runtime_checkable
class LossModel(Protocol):
    """What the planner needs of a loss model (vectorised over numpy arrays)."""

    def predict(self, model_params: np.ndarray, steps: np.ndarray,
                noise_batch_ratio: np.ndarray) -> np.ndarray:
        """Predicted loss at (M, T, σ̄) points (broadcast)."""
        ...

    def extrapolation(self, model_params: float, steps: float,
                      noise_batch_ratio: float) -> list[str]:
        """How the prediction at one point leaves the model's domain ([] inside it)."""
        ...

    def learning_rate(self, model_params: float, noise_batch_ratio: float,
                      steps: float | None = None) -> float | None:
        """The learning rate the model's data suggests for (M, σ̄[, T]), if it knows one."""
        ...

    def describe(self) -> dict[str, Any]:
        """Provenance and domain, for plan output."""
        ...


@dataclasses.dataclass(frozen=True)
class _Curve:
    steps: np.ndarray
    losses: np.ndarray


def _rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < 3:
        return values.copy()
    half = window // 2
    out = np.empty_like(values)
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out[i] = values[lo:hi].mean()
    return out


def _power_law_tail(log_t: np.ndarray, loss: np.ndarray, e_star: float) -> tuple[float, float]:
    """(m, b) of log(L − E*) = m·log T + b on a curve's tail, with m ≤ 0."""
    excess = np.maximum(loss - e_star, 1e-6)
    m, b = np.polyfit(log_t, np.log(excess), 1) if len(log_t) >= 2 else (0.0, math.log(excess[0]))
    if m > 0:  # the tail may not rise: flat continuation
        m, b = 0.0, float(np.log(excess[-1]))
    return float(m), float(b)


def _fit_asymptote(log_t: np.ndarray, loss: np.ndarray) -> float:
    """E* minimising the squared log-residual of a power law plus constant on a tail."""
    best, best_err = 0.0, math.inf
    for e_star in np.linspace(0.0, 0.98 * float(loss.min()), 50):
        m, b = _power_law_tail(log_t, loss, float(e_star))
        err = float(np.sum((np.log(np.maximum(loss - e_star, 1e-6)) - (m * log_t + b)) ** 2))
        if err < best_err - 1e-12:
            best, best_err = float(e_star), err
    return best


class TableLossModel:
    """A results table, smoothed and interpolated as in the paper (see the module docstring).

    Args:
        rows: mappings with the columns of ``REQUIRED_COLUMNS``.
        source: where the rows came from (file path or a description).
        metadata: provenance to report (e.g. the sweep's environment).
    """

    def __init__(self, rows: Iterable[Mapping[str, float]], *, source: str = "<rows>",
                 metadata: Mapping[str, Any] | None = None) -> None:
        self.source = source
        self.metadata = dict(metadata or {})
        rows = list(rows)
        self.fits: dict[tuple[float, float], FittedCurve] = {}
        self._lr_by_horizon: dict[tuple[float, float], dict[float, float]] = {}
        self.filled: dict[tuple[float, float], float] = {}
        """(M, σ̄) a horizon table lacks -> the noisier measured σ̄ whose curve stands in."""
        if any(float(row.get("horizon", 0.0)) > 0 for row in rows):
            self._build_horizons(rows)
            return
        grouped: dict[tuple[float, float, float, float], list[tuple[float, float]]] = \
            defaultdict(list)
        raw_max = 0.0
        for row in rows:
            key = (float(row["model_params"]), float(row["noise_batch_ratio"]),
                   float(row["learning_rate"]), float(row.get("batch_size", 0.0)))
            grouped[key].append((float(row["step"]), float(row["loss"])))
            raw_max = max(raw_max, float(row["loss"]))
        grouped = {k: v for k, v in grouped.items() if k[1] > 0}  # σ̄ = 0 has no log
        if not grouped:
            raise ValueError(f"{source}: no rows with noise_batch_ratio > 0")
        self.loss_ceiling = raw_max
        curves = {k: self._prepare(sorted(v)) for k, v in grouped.items()}
        self.dropped_below = self._drop_rule(curves)
        curves = {k: self._drop(c) for k, c in curves.items()}
        self._build_grid(curves)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str],
                 metadata: Mapping[str, Any] | None = None) -> TableLossModel:
        """Read a results CSV (see :func:`read_results_csv`)."""
        return cls(read_results_csv(path), source=os.fspath(path), metadata=metadata)

    @staticmethod
    def _prepare(points: Sequence[tuple[float, float]]) -> _Curve:
        steps = np.array([p[0] for p in points if p[0] > 0], float)
        losses = np.array([p[1] for p in points if p[0] > 0], float)
        # Several rows at one step (repeated logs): average them.
        uniq, inverse = np.unique(steps, return_inverse=True)
        sums = np.bincount(inverse, weights=losses)
        counts = np.bincount(inverse)
        return _Curve(uniq, sums / counts)

    @staticmethod
    def _drop_rule(curves: Mapping[Any, _Curve]) -> str:
        if all(int(np.sum(c.steps >= PAPER_MIN_STEP)) >= MIN_POINTS_AFTER_DROP
               for c in curves.values()):
            return f"T < {PAPER_MIN_STEP}"
        return f"first {SHORT_CURVE_DROP_FRACTION:.0%} of each curve's steps"

    def _drop(self, curve: _Curve) -> _Curve:
        if self.dropped_below.startswith("T <"):
            keep = curve.steps >= PAPER_MIN_STEP
        else:
            keep = curve.steps >= SHORT_CURVE_DROP_FRACTION * curve.steps[-1]
        if int(keep.sum()) < 2:
            keep = np.ones_like(keep)
        return _Curve(curve.steps[keep], _rolling_mean(curve.losses[keep], ROLLING_WINDOW))

    def _build_horizons(self, rows: Sequence[Mapping[str, float]]) -> None:
        """A horizon table: one fitted curve per (M, σ̄) (see ``_curve_fit``), flat beyond."""
        points, self._lr_by_horizon = bounded_by_noisier(*best_points(rows))
        self._best_lr = {k: rates[max(rates)] for k, rates in self._lr_by_horizon.items()}
        if not points:
            raise ValueError(f"{self.source}: no run ends at its horizon with "
                             f"noise_batch_ratio > 0")
        self.loss_ceiling = max(float(r["loss"]) for r in rows)
        self.dropped_below = "none: one point per run, the held-out loss at its horizon"
        models = sorted({m for m, _ in points})
        ratios = sorted({r for _, r in points})
        # A model size swept at fewer σ̄ than another (a second size at the main grid only,
        # say): each σ̄ it lacks takes the curve of its nearest noisier measured σ̄ (less noise
        # never hurts, so this bounds the loss from above). A σ̄ noisier than all of a size's
        # runs has no such bound and is refused.
        for m in models:
            own = sorted(r for mm, r in points if mm == m)
            for r in ratios:
                if (m, r) in points:
                    continue
                noisier = [x for x in own if x > r]
                if not noisier:
                    raise ValueError(
                        f"{self.source}: the table is not a full grid: no run of "
                        f"model_params={m:g} ends at its horizon with noise_batch_ratio={r:g} "
                        f"or more (a size's noisiest σ̄ bounds the ones it lacks)")
                self.filled[(m, r)] = noisier[0]
        self.fits = fit_curves(points, initial_losses(rows))
        for key, noisier_ratio in self.filled.items():
            self.fits[key] = self.fits[(key[0], noisier_ratio)]
        horizons = sorted({t for curve in points.values() for t in curve})
        self.measured_steps = (horizons[0], horizons[-1])
        log_nodes = np.union1d(np.linspace(math.log(horizons[0]), math.log(horizons[-1]),
                                           HORIZON_NODES), np.log(horizons))
        log_loss = np.empty((len(models), len(log_nodes), len(ratios)))
        for (m, r), fit in self.fits.items():
            # A curve measured less far than the table holds flat past its own last horizon.
            steps = np.minimum(np.exp(log_nodes), fit.steps[-1])
            curve = np.log(fit(steps))
            if THROUGH_MEASURED:
                # The fit's shape between horizons, through the measured points themselves
                # (the residual in log L interpolated linearly in log T).
                log_t = np.log(np.array(fit.steps))
                residual = np.log(np.array(fit.losses)) - np.log(fit(np.array(fit.steps)))
                curve = curve + np.interp(np.log(steps), log_t, residual)
            log_loss[models.index(m), :, ratios.index(r)] = curve
        # Past its own last horizon a curve is held flat, but never above a noisier curve
        # measured there (less noise never hurts): σ̄ swept only at short horizons (2^-16 at
        # T <= 1024, say) would otherwise lift every noisier curve beyond them through the
        # monotone pass below.
        for i, m in enumerate(models):
            for k in range(len(ratios) - 2, -1, -1):
                beyond = log_nodes > math.log(self.fits[(m, ratios[k])].steps[-1]) + 1e-9
                log_loss[i, beyond, k] = np.minimum(log_loss[i, beyond, k],
                                                    log_loss[i, beyond, k + 1])
        self.asymptotes = {m: self.fits[(m, ratios[0])].irreducible for m in models}
        log_loss = self._isotonic(log_loss)
        self.measured_ratios = list(ratios)
        if len(ratios) >= 3:
            # Between measured σ̄, a monotone cubic (PCHIP) in (log σ̄, log L), sampled on
            # RATIO_NODES_PER_OCTAVE nodes per octave: the loss bends upward with σ̄ (flat while
            # the noise is small against the gradient, then rising), which a straight line
            # between σ̄ 2-4× apart cuts off; PCHIP keeps the data's monotonicity.
            log_r = np.log(np.array(ratios))
            dense = np.union1d(log_r, np.linspace(log_r[0], log_r[-1], 1 + math.ceil(
                RATIO_NODES_PER_OCTAVE * (log_r[-1] - log_r[0]) / math.log(2.0))))
            log_loss = PchipInterpolator(log_r, log_loss, axis=2)(dense)
            ratios = list(np.exp(dense))
        self._set_grid(models, log_nodes, ratios, self._monotone(log_loss))

    def _set_grid(self, models: Sequence[float], log_steps: np.ndarray, ratios: Sequence[float],
                  log_loss: np.ndarray) -> None:
        self.log_models = np.log(np.array(models))
        self.log_steps = log_steps
        self.log_ratios = np.log(np.array(ratios))
        self.log_loss = log_loss
        self._interp = RegularGridInterpolator(
            (_axis(self.log_models), self.log_steps, _axis(self.log_ratios)),
            _pad(_pad(log_loss, 0), 2), method="linear")

    def _build_grid(self, curves: Mapping[tuple[float, float, float, float], _Curve]) -> None:
        models = sorted({k[0] for k in curves})
        ratios = sorted({k[1] for k in curves})
        missing = [(m, r) for m in models for r in ratios
                   if not any(k[0] == m and k[1] == r for k in curves)]
        if missing:
            m, r = missing[0]
            raise ValueError(f"{self.source}: the table is not a full grid: no rows for "
                             f"model_params={m:g}, noise_batch_ratio={r:g} "
                             f"({len(missing)} such pairs)")
        t_lo = min(float(c.steps[0]) for c in curves.values())
        t_hi = max(float(c.steps[-1]) for c in curves.values())
        self.measured_steps = (t_lo, t_hi)
        n_nodes = max(2, min(MAX_T_NODES, max(len(c.steps) for c in curves.values())))
        log_nodes = np.linspace(math.log(t_lo), math.log(t_hi), n_nodes)
        # Min over learning rates, each curve resampled in log-log; a curve that stops early
        # continues flat (only less training than measured: conservative).
        log_loss = np.full((len(models), n_nodes, len(ratios)), np.inf)
        best_lr: dict[tuple[float, float], float] = {}
        best_final = np.full((len(models), len(ratios)), np.inf)
        for (m, r, lr, _batch), curve in sorted(curves.items()):
            i, k = models.index(m), ratios.index(r)
            resampled = np.interp(log_nodes, np.log(curve.steps), np.log(curve.losses))
            log_loss[i, :, k] = np.minimum(log_loss[i, :, k], resampled)
            if resampled[-1] < best_final[i, k]:
                best_final[i, k] = resampled[-1]
                best_lr[(m, r)] = lr
        self._best_lr = best_lr
        log_loss = self._isotonic(log_loss)
        # Extrapolation in T with a power law plus the model's σ̄ → 0 asymptote.
        tail = slice(n_nodes // 2, n_nodes)
        t_end = min(EXTRAPOLATE_T_TO, MAX_T_EXTRAPOLATION * t_hi)
        ext = [math.log(t_hi) + math.log(2.0) * j
               for j in range(1, math.ceil(math.log2(t_end / t_hi) - 1e-9) + 1)]
        ext_nodes = np.array(ext)
        full = np.concatenate([log_nodes, ext_nodes])
        extended = np.empty((len(models), len(full), len(ratios)))
        self.asymptotes = {}
        for i, m in enumerate(models):
            e_star = _fit_asymptote(log_nodes[tail], np.exp(log_loss[i, tail, 0]))
            self.asymptotes[m] = e_star
            floor = -math.inf
            for k in range(len(ratios)):
                slope, intercept = _power_law_tail(log_nodes[tail], np.exp(log_loss[i, tail, k]),
                                                   e_star)
                if slope < floor:
                    # A noisier curve may not decay faster than a less noisy one: short noisy
                    # curves fall steeply from a high start, and extended freely they would
                    # cross below the clean ones (noise would stop mattering at large T).
                    slope = floor
                    intercept = math.log(max(math.exp(log_loss[i, -1, k]) - e_star, 1e-6)) \
                        - slope * log_nodes[-1]
                floor = slope
                tail_fit = np.log(np.exp(slope * ext_nodes + intercept) + e_star)
                # Continue from the last measured node (no jump at the seam).
                seam = log_loss[i, -1, k] - math.log(math.exp(slope * log_nodes[-1] + intercept)
                                                     + e_star)
                extended[i, :, k] = np.concatenate([log_loss[i, :, k], tail_fit + seam])
        self.measured_ratios = list(ratios)
        self._set_grid(models, full, ratios, self._monotone(extended))

    @staticmethod
    def _isotonic(log_loss: np.ndarray) -> np.ndarray:
        out = log_loss.copy()
        for i in range(out.shape[0]):
            for k in range(out.shape[2]):
                out[i, :, k] = isotonic_regression(out[i, :, k], increasing=False).x
            for j in range(out.shape[1]):
                out[i, j, :] = isotonic_regression(out[i, j, :], increasing=True).x
        return TableLossModel._monotone(out)

    @staticmethod
    def _monotone(log_loss: np.ndarray) -> np.ndarray:
        # Running max over σ̄, then running min over T: the second keeps the first (see the
        # module docstring), so both monotonicities hold exactly.
        out = np.maximum.accumulate(log_loss, axis=2)
        return np.minimum.accumulate(out, axis=1)

    # -- queries ---------------------------------------------------------------------------

    def predict(self, model_params: np.ndarray, steps: np.ndarray,
                noise_batch_ratio: np.ndarray) -> np.ndarray:
        """Predicted loss at (M, T, σ̄) points (broadcast); see the module docstring."""
        m, t, r = np.broadcast_arrays(np.log(np.asarray(model_params, float)),
                                      np.log(np.asarray(steps, float)),
                                      np.log(np.maximum(np.asarray(noise_batch_ratio, float),
                                                        1e-300)))
        m = np.clip(m, self.log_models[0], self.log_models[-1])
        t = np.clip(t, self.log_steps[0], self.log_steps[-1])
        r_top = self.log_ratios[-1]
        r_in = np.clip(r, self.log_ratios[0], r_top)
        base = self._interp(np.stack([m.ravel(), t.ravel(), r_in.ravel()], -1))
        above = (r > r_top).ravel()
        if above.any() and len(self.log_ratios) > 1:
            r_prev = self.log_ratios[-2]
            pts = np.stack([m.ravel()[above], t.ravel()[above]], -1)
            top = self._interp(np.column_stack([pts, np.full(len(pts), r_top)]))
            prev = self._interp(np.column_stack([pts, np.full(len(pts), r_prev)]))
            slope = np.maximum(0.0, (top - prev) / (r_top - r_prev))
            base[above] = top + slope * (r.ravel()[above] - r_top)
        base = np.minimum(base, math.log(self.loss_ceiling))
        out: np.ndarray = np.exp(base).reshape(m.shape)
        return out

    def extrapolation(self, model_params: float, steps: float,
                      noise_batch_ratio: float) -> list[str]:
        """How a prediction leaves the measured domain ([] inside it)."""
        notes = []
        m_lo, m_hi = np.exp(self.log_models[[0, -1]])
        if not m_lo * 0.999 <= model_params <= m_hi * 1.001:
            notes.append(f"model size {model_params:.3g} outside the table's "
                         f"[{m_lo:.3g}, {m_hi:.3g}] parameters: clamped to the nearest")
        t_lo, t_hi = self.measured_steps
        t_end = float(np.exp(self.log_steps[-1]))
        if self.fits and steps > t_hi * 1.001:
            notes.append(f"{steps:.3g} steps beyond the longest measured horizon {t_hi:.3g}: "
                         f"held flat (no gain beyond the data is predicted)")
        elif self.fits and steps > (reach := self._reach(model_params, noise_batch_ratio)) * 1.001:
            notes.append(f"{steps:.3g} steps beyond the {reach:.3g} measured at noise-batch ratio "
                         f"{noise_batch_ratio:.3g}: held flat, or at a noisier curve measured "
                         f"further where that is lower (no gain beyond the data is predicted)")
        elif steps > t_end * 1.001:
            notes.append(f"{steps:.3g} steps beyond the measured {t_hi:.3g}: power-law "
                         f"extrapolation L = exp(m·log T + b) + E* up to {t_end:.3g} steps, "
                         f"held flat beyond (no further gain assumed)")
        elif steps > t_hi * 1.001:
            notes.append(f"{steps:.3g} steps beyond the measured {t_hi:.3g}: power-law "
                         f"extrapolation L = exp(m·log T + b) + E*")
        elif steps < t_lo * 0.999:
            notes.append(f"{steps:.3g} steps below the measured {t_lo:.3g}: clamped (optimistic)")
        for m in self._bracketing_models(model_params):
            least = min((r for mm, r in self.fits if mm == m and (mm, r) not in self.filled),
                        default=0.0)
            if noise_batch_ratio < least * 0.999 and least > self.measured_ratios[0]:
                notes.append(f"noise-batch ratio {noise_batch_ratio:.3g} below the "
                             f"{m:.3g}-parameter model's least noisy measured {least:.3g}: "
                             f"held at that σ̄ (pessimistic)")
        r_lo, r_hi = self.measured_ratios[0], self.measured_ratios[-1]
        if noise_batch_ratio > r_hi * 1.001:
            notes.append(f"noise-batch ratio {noise_batch_ratio:.3g} above the table's "
                         f"{r_hi:.3g}: log-log extrapolation of the last segment")
        elif noise_batch_ratio < r_lo * 0.999:
            notes.append(f"noise-batch ratio {noise_batch_ratio:.3g} below the table's "
                         f"{r_lo:.3g}: clamped (pessimistic)")
        return notes

    def _bracketing_models(self, model_params: float) -> list[float]:
        """The table's model sizes a prediction at ``model_params`` interpolates between."""
        models = sorted({m for m, _ in self.fits})  # the sizes as the table spells them
        if not models:
            return []
        below = [m for m in models if m <= model_params * 1.001] or models[:1]
        above = [m for m in models if m >= model_params * 0.999] or models[-1:]
        return sorted({below[-1], above[0]})

    def _reach(self, model_params: float, noise_batch_ratio: float) -> float:
        """Longest horizon measured on both measured σ̄ around ``noise_batch_ratio`` (nearest M)."""
        models = sorted({m for m, _ in self.fits})
        m = min(models, key=lambda x: abs(math.log(x / model_params)))
        ratios = sorted(r for mm, r in self.fits if mm == m)
        below = [r for r in ratios if r <= noise_batch_ratio * 1.001] or ratios[:1]
        above = [r for r in ratios if r >= noise_batch_ratio * 0.999] or ratios[-1:]
        return min(self.fits[(m, below[-1])].steps[-1], self.fits[(m, above[0])].steps[-1])

    def learning_rate(self, model_params: float, noise_batch_ratio: float,
                      steps: float | None = None) -> float | None:
        """The best learning rate measured at the nearest table (M, σ̄).

        A horizon table knows it per horizon: the one nearest ``steps`` (log scale) is used
        (short runs want larger rates than long ones); otherwise the longest.
        """
        m = float(np.exp(self.log_models[np.argmin(abs(self.log_models
                                                        - math.log(model_params)))]))
        log_measured = np.log(np.array(self.measured_ratios))
        r = float(np.exp(log_measured[np.argmin(abs(log_measured - math.log(
            max(noise_batch_ratio, 1e-300))))]))
        for (mm, rr), noisier in self.filled.items():  # a σ̄ this size lacks: the stand-in's
            if math.isclose(mm, m, rel_tol=1e-9) and math.isclose(rr, r, rel_tol=1e-9):
                r = noisier
        for (mm, rr), lr in self._best_lr.items():
            if math.isclose(mm, m, rel_tol=1e-9) and math.isclose(rr, r, rel_tol=1e-9):
                by_t: dict[float, float] = self._lr_by_horizon.get((mm, rr), {})
                if by_t and steps is not None and steps > 0:
                    near = min(by_t, key=lambda t: abs(math.log(t / steps)))
                    return float(by_t[near])
                return lr
        return None

    def describe(self) -> dict[str, Any]:
        """Source, domain and smoothing choices."""
        fit: dict[str, Any] = {}
        if self.fits:
            fit = {"form": "L(T) = E + (L0 - E) / (1 + A·T^α) per (M, σ̄) (L0 = ∞: E + A·T^(-α)), "
                           "E fitted per curve, L0 per model, α ≥ 0; flat beyond the longest "
                           "measured horizon",
                   "irreducible": {f"{m:g}": e for m, e in self.asymptotes.items()},
                   "irreducible_by_ratio": {f"{m:g}": {f"{r:g}": f.irreducible
                                                       for (mm, r), f in sorted(self.fits.items())
                                                       if mm == m} for m in self.asymptotes},
                   "plateau": {f"{m:g}": self.fits[(m, min(r for mm, r in self.fits
                                                          if mm == m))].plateau
                               for m in self.asymptotes},
                   "max_relative_residual": max(f.max_relative_residual
                                                for f in self.fits.values()),
                   "beyond_horizon": "flat"}
        return {
            "kind": "table",
            "fit": fit,
            "source": self.source,
            "model_params": [float(x) for x in np.exp(self.log_models)],
            "noise_batch_ratios": [float(x) for x in self.measured_ratios],
            "measured_steps": list(self.measured_steps),
            "dropped": self.dropped_below,
            "rolling_window": ROLLING_WINDOW,
            "metadata": self.metadata,
        }


def _axis(values: np.ndarray) -> np.ndarray:
    """A grid axis with at least two nodes (a single node is widened by a hair)."""
    return values if len(values) > 1 else np.array([values[0], values[0] + 1e-9])


def _pad(values: np.ndarray, axis: int) -> np.ndarray:
    return values if values.shape[axis] > 1 else np.repeat(values, 2, axis=axis)


def leave_one_out(rows: Sequence[Mapping[str, float]], *,
                  source: str = "<rows>") -> list[dict[str, Any]]:
    """Leave-one-out error of :class:`TableLossModel` on held-out sweep cells.

    Each interior noise-batch ratio σ̄ of the table is removed in turn (for every model size, so
    the rest is still a full grid), the model is rebuilt from the others, and its prediction at
    the removed σ̄ is compared with the measured loss at each model's last measured step (the
    minimum over learning rates and batches, smoothed as the model smooths it: the mean of the
    last ``ROLLING_WINDOW`` logged points).

    A horizon table (runs of several lengths, see ``_curve_fit``) holds out cells two ways:
    each interior σ̄ (every horizon of it), and each interior horizon (every σ̄ at it); the
    measured loss of a cell is its runs' final held-out loss, minimised over learning rates and
    batches as the model minimises it, and bounded by the noisier cells of its horizon as the
    model bounds it (``bounded_by_noisier``: a cell swept at fewer learning rates is otherwise
    an upper bound of its loss, not a measurement of it). A table need not be a full grid
    (σ̄ = 2^-16 swept to T = 1024 only, T = 16384 at a few σ̄): a cell is ``interpolated`` when
    the rest of the table measures it on both sides (its σ̄ below and above the held-out
    horizon, or its horizon below and above the held-out σ̄); otherwise the model extrapolates,
    and past a curve's last horizon holds it flat by design, so such cells are reported but
    kept apart.

    Returns:
        One record per (model size, held-out σ̄[, horizon]): ``model_params``,
        ``noise_batch_ratio``, ``step``, ``measured``, ``predicted``, ``relative_error``
        (predicted / measured − 1) and, for horizon tables, ``held_out`` ("ratio" or "horizon")
        and ``interpolated`` (see above).
    """
    if any(float(r.get("horizon", 0.0)) > 0 for r in rows):
        return _leave_one_out_horizons(rows, source)
    ratios = sorted({float(r["noise_batch_ratio"]) for r in rows if r["noise_batch_ratio"] > 0})
    out: list[dict[str, Any]] = []
    for held in ratios[1:-1]:
        kept = [r for r in rows if float(r["noise_batch_ratio"]) != held]
        model = TableLossModel(kept, source=f"{source} without σ̄={held:g}")
        by_curve: dict[tuple[float, float, float], list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            if float(r["noise_batch_ratio"]) == held:
                by_curve[(float(r["model_params"]), float(r["learning_rate"]),
                          float(r.get("batch_size", 0.0)))].append(
                    (float(r["step"]), float(r["loss"])))
        best: dict[float, tuple[float, float]] = {}
        for (m, _lr, _b), points in by_curve.items():
            points.sort()
            step = points[-1][0]
            measured = float(np.mean([p[1] for p in points[-ROLLING_WINDOW:]]))
            if m not in best or measured < best[m][1]:
                best[m] = (step, measured)
        for m, (step, measured) in sorted(best.items()):
            predicted = float(model.predict(np.array(m), np.array(step), np.array(held)))
            out.append({"model_params": m, "noise_batch_ratio": held, "step": step,
                        "measured": measured, "predicted": predicted,
                        "relative_error": predicted / measured - 1})
    return out


def _leave_one_out_horizons(rows: Sequence[Mapping[str, float]],
                            source: str) -> list[dict[str, Any]]:
    points, _ = bounded_by_noisier(*best_points(rows))
    ratios = sorted({r for _, r in points})
    horizons = sorted({t for curve in points.values() for t in curve})
    out: list[dict[str, Any]] = []
    for kind, values, column in (("ratio", ratios, "noise_batch_ratio"),
                                 ("horizon", horizons, "horizon")):
        for held in values[1:-1]:
            kept = [r for r in rows if float(r.get(column, 0.0)) != held]
            model = TableLossModel(kept, source=f"{source} without {column}={held:g}")
            for (m, ratio), curve in sorted(points.items()):
                for step, measured in sorted(curve.items()):
                    if (ratio if kind == "ratio" else step) != held:
                        continue
                    predicted = float(model.predict(np.array(m), np.array(step),
                                                    np.array(ratio)))
                    # Interpolated: the kept data measure this curve (σ̄) on both sides of the
                    # held-out horizon, or this horizon on both sides of the held-out σ̄.
                    along = ([t for t in curve if t != step] if kind == "horizon" else
                             [r for (mm, r), c in points.items() if mm == m and r != ratio
                              and step in c])
                    value = step if kind == "horizon" else ratio
                    inside = min(along, default=value) < value < max(along, default=value)
                    out.append({"held_out": kind, "model_params": m, "noise_batch_ratio": ratio,
                                "step": step, "measured": measured, "predicted": predicted,
                                "relative_error": predicted / measured - 1,
                                "interpolated": inside})
    return out
