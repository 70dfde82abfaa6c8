"""Truncated Poisson: the whole coupling term (1 + e^ε)·η(N + 1) ≤ ρ·δ, at its boundary."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dptrain.privacy import (
    TRUNCATION_DELTA_SHARE,
    DpSgdMechanism,
    epsilon,
    physical_batch_size_for,
    round_up_to_float32,
)
from dptrain.privacy._mechanism import accountant_epsilon

N, Q, B_MAX, STEPS = 1000, 0.002, 12, 50


def _eta(rows: int, steps: int = STEPS, b_max: int = B_MAX) -> float:
    p = float(stats.binom.sf(b_max, rows, Q))
    return -math.expm1(steps * math.log1p(-p))


def _mechanism(delta: float) -> DpSgdMechanism:
    return DpSgdMechanism(sampling_rate=Q, noise_multiplier=1.0, delta=delta, accountant="rdp",
                          dataset_size=N, physical_batch_size=B_MAX)


def _boundary_delta(scale: float) -> float:
    """δ with ρ·δ = scale · (1 + e^ε(δ))·η(N + 1) (a fixed point: ε depends on δ weakly)."""
    delta = 1e-3
    for _ in range(30):
        eps = accountant_epsilon(_mechanism(delta), STEPS, delta * (1 - TRUNCATION_DELTA_SHARE))
        delta = scale * (1 + math.exp(eps)) * _eta(N + 1) / TRUNCATION_DELTA_SHARE
    return delta


def test_overflow_probability_is_that_of_the_larger_neighbour():
    m = _mechanism(1e-3)
    assert m.overflow_probability(STEPS) == pytest.approx(_eta(N + 1), rel=1e-9)
    assert m.overflow_probability(STEPS) > _eta(N)


def test_truncation_term_just_outside_the_delta_share_is_refused():
    delta = _boundary_delta(1 - 1e-4)
    m = _mechanism(delta)
    eps = accountant_epsilon(m, STEPS, m.accountant_delta)
    # The old check (e^ε·η(N) ≤ ρ·δ) passes here; the whole term does not fit.
    assert math.exp(eps) * _eta(N) <= TRUNCATION_DELTA_SHARE * delta
    assert (1 + math.exp(eps)) * _eta(N + 1) > TRUNCATION_DELTA_SHARE * delta
    assert epsilon(m, STEPS) == math.inf


def test_truncation_term_just_inside_the_delta_share_is_certified():
    delta = _boundary_delta(1 + 1e-4)
    m = _mechanism(delta)
    eps = epsilon(m, STEPS)
    assert math.isfinite(eps)
    assert (1 + math.exp(eps)) * _eta(N + 1) <= TRUNCATION_DELTA_SHARE * delta


def test_physical_batch_equal_to_n_can_still_truncate_a_neighbour():
    m = DpSgdMechanism(sampling_rate=0.5, noise_multiplier=1.0, delta=1e-3, dataset_size=100,
                       physical_batch_size=100, accountant="rdp")
    assert m.can_truncate
    assert m.step_overflow_probability == pytest.approx(0.5**101)


@pytest.mark.parametrize(("n", "batch", "steps", "delta", "budget"), [
    (1000, 2, 200, 1e-4, 1.0),
    (1000, 2, 200, 1e-4, 0.1),
    (5000, 3, 1000, 1e-6, 2.0),
])
def test_sized_physical_batch_fits_the_whole_truncation_term(n, batch, steps, delta, budget):
    b_max = physical_batch_size_for(batch, dataset_size=n, steps=steps, delta=delta,
                                    epsilon_budget=budget, min_std_devs=0.0)
    p = float(stats.binom.sf(b_max, n + 1, batch / n))
    eta = -math.expm1(steps * math.log1p(-p))
    assert (1 + math.exp(budget)) * eta <= TRUNCATION_DELTA_SHARE * delta
    # With std < 2 the search moves one row at a time: one row less would not fit.
    p_less = float(stats.binom.sf(b_max - 1, n + 1, batch / n))
    eta_less = -math.expm1(steps * math.log1p(-p_less))
    assert (1 + math.exp(budget)) * eta_less > TRUNCATION_DELTA_SHARE * delta


def test_float32_rounding_never_lowers_sigma_and_is_the_smallest_such_float32():
    rng = np.random.default_rng(1)
    values = [0.0, 1.0, 0.1, 1 / 3, 0.614, 9.66, 1e-30, 3.4e38,
              *rng.uniform(0, 20, 2000).tolist()]
    for value in values:
        up = round_up_to_float32(value)
        as32 = np.float32(up)
        assert float(as32) == up  # exactly representable
        assert up >= value
        below = np.nextafter(as32, np.float32(-np.inf))
        assert float(below) < value or value == up == 0.0
    # Round-to-nearest would lower these; the helper does not.
    lowered = [v for v in values if float(np.float32(v)) < v]
    assert len(lowered) > 100
