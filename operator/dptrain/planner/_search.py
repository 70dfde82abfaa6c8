"""The paper's grid search: model size × batch × steps, priced by the σ table and a loss model.

Model sizes come from the named presets and the scaled family (``scaled-L1`` … ``scaled-L64``),
batches from 2^0 … 2^25 in steps of 2^0.25 (B ≤ N), steps from a 2^0.25 grid within bounds and
within the compute budget C ≥ 6·M·B·S·T. Steps are *not* forced to use the whole budget (the
paper sets T = C/(6·M·B·S)): with noise calibrated to T, more steps can predict a worse loss, and
a grid that is the same for every budget makes "more compute never predicts a worse loss" exact.
σ = σ_ε(q = B/N, T) from the σ table, σ̄ = σ/B, L = loss(M, T, σ̄); sorted by (L, C).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from dptrain.planner._loss_model import LossModel
from dptrain.planner._presets import ModelShape
from dptrain.planner._sigma_table import SigmaTable

SigmaFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

SIGMA_MAX = 1e4  # the privacy module's calibration range
NEAR_OPTIMAL_RTOL = 0.01


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Bounds of the grid search (pins narrow the axes to one value each).

    Attributes:
        min_steps: fewest iterations considered (the paper: 1000; smaller jobs are common here).
        max_steps: most iterations considered (the paper: 8.2M).
        log2_batch_max: largest batch, as a power of two (the paper: 25).
        grid_per_octave: grid points per factor of two in B and T (the paper: 4).
    """

    min_steps: int = 16
    """The shortest horizon of the shipped CPU table: at small budgets a large batch for few
    steps can be best (the paper's conclusion for DP), and only a grid that reaches it can
    choose it."""
    max_steps: int = 8_200_000
    log2_batch_max: int = 25
    grid_per_octave: int = 4

    def batches(self, dataset_size: int) -> np.ndarray:
        """The batch grid, capped at the dataset size."""
        k = np.arange(0, self.log2_batch_max * self.grid_per_octave + 1)
        grid = np.unique(np.round(2.0 ** (k / self.grid_per_octave)).astype(np.int64))
        return grid[grid <= dataset_size]

    def steps(self) -> np.ndarray:
        """The step grid."""
        lo = math.log2(self.min_steps) * self.grid_per_octave
        hi = math.log2(self.max_steps) * self.grid_per_octave
        k = np.arange(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)
        return np.unique(np.round(2.0 ** (k / self.grid_per_octave)).astype(np.int64))


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Every feasible configuration, best first (parallel arrays).

    Attributes:
        model_index: index into the searched shapes.
        batch: expected batch B.
        steps: iterations T.
        sigma: table σ (or the pinned σ).
        ratio: σ̄ = σ/B.
        loss: predicted loss.
        flops: 6·M·B·S·T.
        n_compute_feasible: configurations within the compute budget (before privacy).
    """

    model_index: np.ndarray
    batch: np.ndarray
    steps: np.ndarray
    sigma: np.ndarray
    ratio: np.ndarray
    loss: np.ndarray
    flops: np.ndarray
    n_compute_feasible: int

    def __len__(self) -> int:
        return len(self.loss)


def search(shapes: list[ModelShape], *, dataset_size: int, seq_len: int, epsilon: float,
           table: SigmaTable | SigmaFn, loss_model: LossModel, batches: np.ndarray,
           steps: np.ndarray,
           compute_budget: float | None, sigma_pinned: float | None = None,
           max_seconds: float | None = None,
           seconds_per_flop: np.ndarray | None = None) -> SearchResult:
    """Price every (model, batch, steps) and return the feasible ones, best first.

    Args:
        shapes: candidate models.
        dataset_size: N sequences.
        seq_len: S tokens per sequence.
        epsilon: the privacy budget ε.
        table: the σ table for the job's δ, or a function σ(q, T) to use instead.
        loss_model: predicts L(M, T, σ̄).
        batches: candidate expected batches.
        steps: candidate iteration counts.
        compute_budget: C in FLOPs, or None (unbounded).
        sigma_pinned: a pinned σ: configurations needing more noise than it are infeasible.
        max_seconds: a deadline; with ``seconds_per_flop`` (per model) filters slow plans.
        seconds_per_flop: wall seconds per 6·M·B·S·T FLOP on the fastest allowed slice.
    """
    params = np.array([s.param_count for s in shapes], float)
    grids = np.meshgrid(np.arange(len(shapes)), np.arange(len(batches)),
                        np.arange(len(steps)), indexing="ij")
    mi, bi, ti = (g.ravel() for g in grids)
    b = batches[bi].astype(float)
    t = steps[ti].astype(float)
    flops = 6.0 * params[mi] * b * seq_len * t
    keep = np.ones(len(flops), bool)
    if compute_budget is not None:
        keep &= flops <= compute_budget * (1 + 1e-12)
    if max_seconds is not None and seconds_per_flop is not None:
        keep &= flops * seconds_per_flop[mi] <= max_seconds
    n_compute = int(keep.sum())
    mi, b, t, flops = mi[keep], b[keep], t[keep], flops[keep]
    if len(b) == 0:
        return _empty(n_compute)
    q = b / dataset_size
    surface = (table.surface(epsilon, float(q.min()), float(q.max()))
               if isinstance(table, SigmaTable) else table)
    needed = surface(q, t)
    if sigma_pinned is not None:
        feasible = needed <= sigma_pinned
        sigma = np.full(len(b), sigma_pinned)
    else:
        feasible = np.isfinite(needed) & (needed <= SIGMA_MAX)
        sigma = needed
    mi, b, t = mi[feasible], b[feasible], t[feasible]
    flops, sigma = flops[feasible], sigma[feasible]
    if len(b) == 0:
        return _empty(n_compute)
    ratio = sigma / b
    loss = loss_model.predict(params[mi], t, ratio)
    # Sort by loss (rounded to 1e-9 relative so float noise cannot reorder), then compute.
    order = np.lexsort((t, b, mi, flops, np.round(np.log(loss), 9)))
    return SearchResult(model_index=mi[order], batch=b[order].astype(np.int64),
                        steps=t[order].astype(np.int64), sigma=sigma[order], ratio=ratio[order],
                        loss=loss[order], flops=flops[order], n_compute_feasible=n_compute)


def _empty(n_compute: int) -> SearchResult:
    z = np.zeros(0)
    zi = np.zeros(0, np.int64)
    return SearchResult(zi, zi, zi, z, z, z, z, n_compute)
