"""The σ table: σ(ε, T, q) on log grids, so a search can price thousands of configurations.

For a fixed δ the table stores log ε of DP-SGD with Poisson sampling on a grid of sampling rates
q = 4^-i, noise multipliers σ = 2^(k/2) and step counts T = 2^(j/2), computed with
:func:`dptrain.privacy.epsilon`. A search at a budget ε turns it into σ_ε(q, T) by inverting the
(monotone) ε-over-σ curve at each grid node, then interpolates linearly in (log q, log T).

Accounting for the table is RDP (tens of milliseconds per (q, σ), and then every T for free:
RDP composes additively), whatever the job's accountant: RDP's ε is an upper bound on PLD's, so
table σ is never below what PLD needs at the grid nodes. Between nodes the interpolation is an
estimate; the chosen plan's σ is always re-calibrated exactly with the job's accountant, so the
table steers the search but never sets the noise. The δ of the table reserves the truncation
share (δ·(1 − ρ)), as the accountant does for a truncated physical batch.

Slices of q are computed lazily (a plan needs only those its batch grid reaches) and kept in an
``.npz`` file per δ under the cache directory (``$DPTRAIN_CACHE_DIR`` or ``~/.cache/dptrain``);
the file is replaced atomically, so concurrent planners at worst compute a slice twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import tempfile
from collections.abc import Iterable

import numpy as np
from scipy.interpolate import RegularGridInterpolator

from dptrain.privacy import TRUNCATION_DELTA_SHARE, DpSgdMechanism, epsilon

TABLE_VERSION = 2
LOG2_Q_STEP = 2.0  # q = 4^-i
LOG2_SIGMA = np.arange(-4, 29) / 2.0  # σ = 2^(k/2): 0.25 … 16384
LOG2_STEPS = np.arange(0, 49) / 2.0  # T = 2^(j/2): 1 … 16.8M
EPSILON_FLOOR = 0.05
"""Once ε after the grid's most steps is below this, a slice's σ sweep stops: more noise is only
needed for budgets below it (RDP cannot certify much less at large T anyway; the plan's exact
calibration still applies)."""
LOG_EPS_MIN = math.log(1e-12)
LOG_SIGMA_INFEASIBLE = math.log(1e9)


def default_cache_dir() -> pathlib.Path:
    """``$DPTRAIN_CACHE_DIR``, else ``~/.cache/dptrain``."""
    env = os.environ.get("DPTRAIN_CACHE_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "dptrain"


def table_steps() -> np.ndarray:
    """The step counts of the T axis (integers)."""
    return np.unique(np.round(2.0**LOG2_STEPS).astype(np.int64))


@dataclasses.dataclass(frozen=True)
class SigmaSurface:
    """σ_ε(q, T) for one ε: interpolated linearly in (log q, log T).

    Attributes:
        epsilon: the budget the surface was inverted at.
        log_q: grid of log q (ascending).
        log_steps: grid of log T (ascending).
        log_sigma: log σ at the nodes; ``LOG_SIGMA_INFEASIBLE`` where even the largest σ of the
            grid spends more than ε.
    """

    epsilon: float
    log_q: np.ndarray
    log_steps: np.ndarray
    log_sigma: np.ndarray

    def __call__(self, q: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """σ at (q, T) points (broadcast); ``inf`` where no σ of the grid suffices."""
        q_arr, t_arr = np.broadcast_arrays(np.asarray(q, float), np.asarray(steps, float))
        points = np.stack([np.log(q_arr).ravel(), np.log(t_arr).ravel()], axis=-1)
        points[:, 0] = np.clip(points[:, 0], self.log_q[0], self.log_q[-1])
        points[:, 1] = np.clip(points[:, 1], self.log_steps[0], self.log_steps[-1])
        interp = RegularGridInterpolator((self.log_q, self.log_steps), self.log_sigma,
                                         method="linear")
        log_sigma = interp(points).reshape(q_arr.shape)
        out = np.exp(np.minimum(log_sigma, LOG_SIGMA_INFEASIBLE))
        return np.where(log_sigma >= LOG_SIGMA_INFEASIBLE - 1e-9, np.inf, out)


class SigmaTable:
    """log ε(q, σ, T) on log grids for one δ, computed lazily and cached on disk.

    Args:
        delta: the job's δ (the table uses δ·(1 − ρ), see the module docstring).
        cache_dir: directory for the table file; None: :func:`default_cache_dir`; the table
            is kept in memory only if ``persist`` is False.
        persist: write computed slices to disk.
    """

    def __init__(self, delta: float, *, cache_dir: str | os.PathLike[str] | None = None,
                 persist: bool = True) -> None:
        self.delta = float(delta)
        self.table_delta = self.delta * (1.0 - TRUNCATION_DELTA_SHARE)
        self.persist = persist
        self.cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.sigmas = 2.0**LOG2_SIGMA
        self.steps = table_steps()
        self._slices: dict[int, np.ndarray] = {}
        self._loaded = False
        self.slices_computed = 0

    @property
    def path(self) -> pathlib.Path:
        """The table file of this δ."""
        digest = hashlib.sha256(json.dumps(
            [TABLE_VERSION, repr(self.table_delta), LOG2_Q_STEP, LOG2_SIGMA.tolist(),
             LOG2_STEPS.tolist()]).encode()).hexdigest()[:16]
        return self.cache_dir / "sigma" / f"rdp-delta{self.delta:.3e}-{digest}.npz"

    # -- storage ---------------------------------------------------------------------------

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self.persist:
            return
        try:
            with np.load(self.path) as data:
                for key in data.files:
                    if key.startswith("q"):
                        self._slices.setdefault(int(key[1:]), data[key])
        except (OSError, ValueError, KeyError):
            pass  # missing or unreadable: recompute

    def _save(self) -> None:
        if not self.persist:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"q{i}": arr for i, arr in sorted(self._slices.items())}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- computation -----------------------------------------------------------------------

    @staticmethod
    def q_of(index: int) -> float:
        """Sampling rate of slice ``index`` (q = 4^-index)."""
        return float(2.0 ** (-LOG2_Q_STEP * index))

    def _compute_slice(self, index: int) -> np.ndarray:
        # dp-accounting logs a warning per fractional RDP order it drops at large q; the orders
        # left still give an upper bound, so the warnings are noise here.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)
        try:
            return self._compute_slice_quietly(index)
        finally:
            absl_logger.setLevel(level)

    def _compute_slice_quietly(self, index: int) -> np.ndarray:
        q = self.q_of(index)
        log_eps = np.full((len(self.sigmas), len(self.steps)), LOG_EPS_MIN)
        for k, sigma in enumerate(self.sigmas):
            mechanism = DpSgdMechanism(sampling_rate=q, noise_multiplier=float(sigma),
                                       delta=self.table_delta, accountant="rdp")
            row = np.array([epsilon(mechanism, int(t)) for t in self.steps])
            log_eps[k] = np.log(np.maximum(row, 1e-12))
            if row[-1] < EPSILON_FLOOR:
                # More noise is not evaluated: repeat this row (as if more noise bought no
                # less ε), so budgets below the floor read as infeasible, never as cheap.
                log_eps[k + 1:] = log_eps[k]
                break
        self.slices_computed += 1
        return log_eps

    def slice_indices(self, q_min: float, q_max: float) -> list[int]:
        """Slice indices whose q bracket [q_min, q_max]."""
        hi = max(0, math.floor(-math.log2(min(1.0, q_max)) / LOG2_Q_STEP))
        lo = max(hi, math.ceil(-math.log2(q_min) / LOG2_Q_STEP))
        return list(range(hi, lo + 1))

    def ensure(self, indices: Iterable[int]) -> None:
        """Compute (and persist) the slices not cached yet."""
        self._load()
        missing = [i for i in indices if i not in self._slices]
        for i in missing:
            self._slices[i] = self._compute_slice(i)
        if missing:
            self._save()

    def log_epsilon(self, index: int) -> np.ndarray:
        """Log ε over (σ, T) of one slice."""
        self.ensure([index])
        return self._slices[index]

    def surface(self, epsilon_budget: float, q_min: float, q_max: float) -> SigmaSurface:
        """σ_ε(q, T) for q in [q_min, q_max] (all T of the grid)."""
        indices = self.slice_indices(q_min, q_max)
        self.ensure(indices)
        target = math.log(epsilon_budget)
        log_sigma_axis = np.log(self.sigmas)
        rows = []
        for i in sorted(indices, reverse=True):  # ascending q
            log_eps = self._slices[i]
            out = np.empty(len(self.steps))
            for j in range(len(self.steps)):
                column = log_eps[:, j]  # non-increasing in σ
                if column[-1] > target:
                    out[j] = LOG_SIGMA_INFEASIBLE
                elif column[0] <= target:
                    out[j] = log_sigma_axis[0]  # the grid's least noise already suffices
                else:
                    # np.interp wants increasing x: walk the curve from high σ to low σ.
                    out[j] = float(np.interp(target, column[::-1], log_sigma_axis[::-1]))
            rows.append(out)
        log_q = np.log([self.q_of(i) for i in sorted(indices, reverse=True)])
        log_sigma = np.array(rows)
        if len(log_q) == 1:  # a single slice: duplicate it so the grid has two q nodes
            log_q = np.array([log_q[0] - 1e-9, log_q[0]])
            log_sigma = np.vstack([log_sigma, log_sigma])
        return SigmaSurface(epsilon=epsilon_budget, log_q=log_q,
                            log_steps=np.log(self.steps.astype(float)), log_sigma=log_sigma)
