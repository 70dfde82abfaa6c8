"""Calibration: the least noise, or the most steps, that keep ε within a target.

Formal guarantees:
    1. ``calibrate_noise_multiplier`` returns σ with ``epsilon(m(σ), T) ≤ target`` — checked
       with the very function that enforces budgets, never with an interpolation.
    2. ``calibrate_steps`` returns the largest T with ``epsilon(m, T) ≤ target`` (0 if none),
       checked the same way; ``epsilon(m, T + 1) > target`` unless T hit ``max_steps``.
    3. Bisection keeps the feasible end of its bracket, so rounding or discretisation can only
       move the answer towards more noise / fewer steps (the margin is one bracket width:
       relative tolerance ``rtol`` in σ).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from dptrain.privacy._errors import (
    PrivacyParameterError,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sampling_rate,
    check_steps,
)
from dptrain.privacy._mechanism import AccountantName, DpSgdMechanism, epsilon

SIGMA_MIN = 1e-2
SIGMA_MAX = 1e4
MAX_STEPS_DEFAULT = 10**8


class CalibrationError(PrivacyParameterError):
    """No configuration in range reaches the target."""


def calibrate_noise_multiplier(*, epsilon: float, delta: float, sampling_rate: float,
                               steps: int, accountant: AccountantName = "pld",
                               dataset_size: int | None = None,
                               physical_batch_size: int | None = None,
                               rtol: float = 1e-3) -> float:
    """The smallest σ (to relative tolerance ``rtol``) with ε(σ) ≤ ``epsilon`` after ``steps``.

    Raises:
        CalibrationError: if even σ = 1e4 cannot reach the target.
        PrivacyParameterError: on invalid input (names the parameter and rule).
    """
    target = check_epsilon(epsilon)
    check_delta(delta)
    check_sampling_rate(sampling_rate)
    steps = check_steps(steps)

    def mech(sigma: float) -> DpSgdMechanism:
        return DpSgdMechanism(sampling_rate=sampling_rate, noise_multiplier=sigma, delta=delta,
                              accountant=accountant, dataset_size=dataset_size,
                              physical_batch_size=physical_batch_size)

    def ok(sigma: float) -> bool:
        return _epsilon(mech(sigma), steps) <= target

    # RDP is an upper bound on PLD's ε, so the RDP-calibrated σ is feasible for PLD: a cheap
    # upper end of the bracket.
    hi = _rdp_feasible_sigma(mech, steps, target) if accountant == "pld" else _doubling(ok)
    if not ok(hi):
        raise CalibrationError("epsilon", f"is unreachable with noise_multiplier <= {hi:g} for "
                               f"steps={steps}, sampling_rate={sampling_rate:g}", target)
    lo = hi / 2.0
    while ok(lo):
        hi, lo = lo, lo / 2.0
        if lo < SIGMA_MIN:
            return hi
    while hi / lo - 1.0 > rtol:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _doubling(ok: Callable[[float], bool]) -> float:
    """The first σ in 1, 2, 4, … (capped at SIGMA_MAX) that is feasible."""
    sigma = 1.0
    while sigma < SIGMA_MAX and not ok(sigma):
        sigma = min(SIGMA_MAX, 2.0 * sigma)
    return sigma


def _rdp_feasible_sigma(mech: Callable[[float], DpSgdMechanism], steps: int,
                        target: float) -> float:
    """A σ feasible under RDP (hence under PLD), within 2% of RDP's own calibration."""

    def rdp_ok(sigma: float) -> bool:
        return _epsilon(dataclasses.replace(mech(sigma), accountant="rdp"), steps) <= target

    hi = _doubling(rdp_ok)
    if not rdp_ok(hi):
        return SIGMA_MAX
    lo = hi / 2.0
    while hi / lo - 1.0 > 0.02:
        mid = math.sqrt(lo * hi)
        if rdp_ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _epsilon(mechanism: DpSgdMechanism, steps: int) -> float:
    return epsilon(mechanism, steps)


def calibrate_steps(*, epsilon: float, delta: float, sampling_rate: float,
                    noise_multiplier: float, accountant: AccountantName = "pld",
                    dataset_size: int | None = None, physical_batch_size: int | None = None,
                    max_steps: int = MAX_STEPS_DEFAULT) -> int:
    """The largest T ≤ ``max_steps`` with ε(T) ≤ ``epsilon``; 0 if not even one step fits."""
    target = check_epsilon(epsilon)
    check_noise_multiplier(noise_multiplier)
    max_steps = check_steps(max_steps, name="max_steps")
    mechanism = DpSgdMechanism(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier,
                               delta=delta, accountant=accountant, dataset_size=dataset_size,
                               physical_batch_size=physical_batch_size)
    return largest_steps_within(mechanism, target, lo=0, hi=max_steps)


def largest_steps_within(mechanism: DpSgdMechanism, target: float, *, lo: int, hi: int) -> int:
    """Largest T in [lo, hi] with ε(T) ≤ target, given ε(lo) ≤ target (lo may be 0).

    ε is non-decreasing in T, so galloping up from ``lo`` and then bisecting is exact. The
    gallop never evaluates ε much beyond twice the answer: PLD composition at a huge T is slow
    and memory-hungry, so ``hi`` is probed only when the gallop reaches it.
    """
    good, step = lo, 1
    while good < hi:
        probe = min(good + step, hi)
        if epsilon(mechanism, probe) > target:
            bad = probe
            break
        good, step = probe, step * 2
    else:
        return good
    while bad - good > 1:  # ε(good) ≤ target < ε(bad)
        mid = (good + bad) // 2
        if epsilon(mechanism, mid) <= target:
            good = mid
        else:
            bad = mid
    return good
