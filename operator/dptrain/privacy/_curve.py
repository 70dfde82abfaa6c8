"""A precomputed ε-curve: "ε after t steps" in microseconds, never below the true value.

Composing PLDs costs ~0.3–1 s per evaluation, far too slow for an operator that answers the
question on every progress report. The curve evaluates ε exactly at a geometric grid of step
counts once (plus anchors such as the plan's maximum), then answers ``epsilon_at(t)`` with the
value at the smallest grid point ≥ t.

Formal guarantees:
    1. ``epsilon_at(t) ≥ epsilon(mechanism, t)`` for every 0 ≤ t ≤ ``max_steps`` (ε is
       non-decreasing in t and each grid value is an exact upper bound), and equality holds at
       grid points and anchors.
    2. ``max_steps_within(budget, horizon)`` is the exact largest t ≤ ``horizon`` (default
       ``max_steps``) with ``epsilon(mechanism, t) ≤ budget`` (bisection between grid points,
       and beyond them, with exact ε).
    3. Beyond ``max_steps`` ``epsilon_at`` computes ε exactly (slow path, memoised), never
       extrapolates.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from collections.abc import Iterable

from dptrain.privacy._calibration import largest_steps_within
from dptrain.privacy._errors import check_epsilon, check_steps
from dptrain.privacy._mechanism import DpSgdMechanism, epsilon

DEFAULT_POINTS = 24


def grid_steps(max_steps: int, points: int, anchors: Iterable[int] = ()) -> tuple[int, ...]:
    """0, then about ``points`` geometric step counts up to ``max_steps``, plus anchors."""
    max_steps = check_steps(max_steps, name="max_steps")
    grid = {0, max_steps}
    if points > 1 and max_steps > 1:
        ratio = max_steps ** (1.0 / (points - 1))
        grid.update(min(max_steps, max(1, round(ratio**k))) for k in range(points))
    grid.update(a for a in anchors if 0 <= a <= max_steps)
    return tuple(sorted(grid))


@dataclasses.dataclass(frozen=True)
class EpsilonCurve:
    """ε at a grid of step counts for one mechanism (see Formal guarantees)."""

    mechanism: DpSgdMechanism
    steps: tuple[int, ...]
    epsilons: tuple[float, ...]

    @classmethod
    def build(cls, mechanism: DpSgdMechanism, max_steps: int, *,
              points: int = DEFAULT_POINTS, anchors: Iterable[int] = ()) -> EpsilonCurve:
        """Evaluate ε exactly on the grid (cached per mechanism, max_steps, points, anchors)."""
        return _build_cached(mechanism, check_steps(max_steps, name="max_steps"), points,
                             tuple(sorted(set(anchors))))

    @property
    def max_steps(self) -> int:
        """The last step count the curve covers."""
        return self.steps[-1]

    def epsilon_at(self, steps: int) -> float:
        """ε after ``steps`` steps; an upper bound, exact at grid points."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0 (got {steps})")
        if steps > self.max_steps:
            return _exact(self.mechanism, steps)
        return self.epsilons[bisect.bisect_left(self.steps, steps)]

    def max_steps_within(self, budget: float, horizon: int | None = None) -> int:
        """The largest step count ≤ ``horizon`` (default ``max_steps``) with exact ε ≤ budget."""
        budget = check_epsilon(budget, name="epsilon_budget")
        k = bisect.bisect_right(self.epsilons, budget) - 1  # last grid point within budget
        if k == len(self.steps) - 1:
            if horizon is not None and horizon > self.max_steps:
                # Past the grid: exact ε (steps charged again after restarts can go there).
                return largest_steps_within(self.mechanism, budget, lo=self.max_steps,
                                            hi=horizon)
            return self.max_steps
        if k < 0:
            return 0
        lo, hi = self.steps[k], self.steps[k + 1] - 1
        return largest_steps_within(self.mechanism, budget, lo=lo, hi=hi) if hi > lo else lo

    def as_points(self) -> list[tuple[int, float]]:
        """(steps, ε) pairs, e.g. for plotting."""
        return list(zip(self.steps, self.epsilons, strict=True))


@functools.lru_cache(maxsize=4096)
def _exact(mechanism: DpSgdMechanism, steps: int) -> float:
    # Memoised: past the grid the same count is asked for by the ledger, the progress report
    # and the history of the same step.
    return epsilon(mechanism, steps)


# A curve is a few dozen floats; the operator keeps one per running plan.
@functools.lru_cache(maxsize=1024)
def _build_cached(mechanism: DpSgdMechanism, max_steps: int, points: int,
                  anchors: tuple[int, ...]) -> EpsilonCurve:
    steps = grid_steps(max_steps, points, anchors)
    epsilons: list[float] = []
    for t in steps:
        eps = epsilon(mechanism, t)
        # Guard the monotonicity the look-up relies on against numerical wiggles: a later
        # grid value is never reported lower than an earlier one.
        epsilons.append(max(eps, epsilons[-1]) if epsilons else eps)
    if any(math.isnan(e) for e in epsilons):
        raise ValueError("ε evaluated to NaN; check the mechanism's parameters")
    return EpsilonCurve(mechanism=mechanism, steps=steps, epsilons=tuple(epsilons))
