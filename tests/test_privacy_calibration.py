"""Calibration never overshoots its target, and is as tight as its tolerance says."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dptrain.privacy import (
    CalibrationError,
    DpSgdMechanism,
    calibrate_noise_multiplier,
    calibrate_steps,
    epsilon,
)


def test_calibrated_sigma_matches_reference_vector():
    sigma = calibrate_noise_multiplier(epsilon=1.0, delta=1e-6, sampling_rate=0.1, steps=512)
    assert sigma == pytest.approx(9.66, abs=0.01)


def test_calibrated_steps_match_reference_vector():
    steps = calibrate_steps(epsilon=2.0, delta=1e-6, sampling_rate=0.1, noise_multiplier=3.0)
    assert steps == 155


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q=st.floats(1e-4, 0.5), steps=st.integers(1, 20_000), target=st.floats(0.2, 20.0),
       log_delta=st.floats(-12, -3))
def test_calibrated_sigma_never_exceeds_target_epsilon_rdp(q, steps, target, log_delta):
    delta = 10.0**log_delta
    try:
        sigma = calibrate_noise_multiplier(epsilon=target, delta=delta, sampling_rate=q,
                                           steps=steps, accountant="rdp", rtol=1e-2)
    except CalibrationError:
        return
    m = DpSgdMechanism(sampling_rate=q, noise_multiplier=sigma, delta=delta, accountant="rdp")
    assert epsilon(m, steps) <= target
    # Tight: 2% less noise (twice the tolerance) would overshoot.
    assert epsilon(m.with_noise_multiplier(sigma / 1.02), steps) > target or sigma <= 0.0101


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q=st.floats(1e-3, 0.2), steps=st.integers(10, 3000), target=st.floats(0.5, 8.0))
def test_calibrated_sigma_never_exceeds_target_epsilon_pld(q, steps, target):
    sigma = calibrate_noise_multiplier(epsilon=target, delta=1e-6, sampling_rate=q, steps=steps,
                                       rtol=1e-2)
    m = DpSgdMechanism(sampling_rate=q, noise_multiplier=sigma, delta=1e-6)
    assert epsilon(m, steps) <= target


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q=st.floats(1e-3, 0.5), sigma=st.floats(0.5, 20.0), target=st.floats(0.1, 10.0))
def test_calibrated_steps_are_the_most_within_target(q, sigma, target):
    steps = calibrate_steps(epsilon=target, delta=1e-6, sampling_rate=q, noise_multiplier=sigma,
                            accountant="rdp", max_steps=100_000)
    m = DpSgdMechanism(sampling_rate=q, noise_multiplier=sigma, delta=1e-6, accountant="rdp")
    assert epsilon(m, steps) <= target
    if steps < 100_000:
        assert epsilon(m, steps + 1) > target


def test_unreachable_target_is_an_error_naming_epsilon():
    with pytest.raises(CalibrationError) as info:
        calibrate_noise_multiplier(epsilon=1e-6, delta=1e-12, sampling_rate=1.0, steps=10**6,
                                   accountant="rdp")
    assert info.value.parameter == "epsilon"
