"""ε of DP-SGD: reference vectors (dp-accounting 0.6.0), truncation, and bad input."""

import itertools
import math

import pytest

from dptrain.privacy import (
    TRUNCATION_DELTA_SHARE,
    DpSgdMechanism,
    PrivacyParameterError,
    epsilon,
    physical_batch_size_for,
)

# (q, σ, T, δ, accountant, expected ε, tolerance in ε) — ../shared/reference/accounting.md
VECTORS = [
    (0.1, 3.0, 512, 1e-6, "pld", 3.77, 0.005),
    (0.08192, 10.0, 875, 1e-5, "rdp", 0.988, 0.0005),
    (0.08192, 10.0, 875, 1e-5, "pld", 0.903, 0.0005),
    (0.01, 1.0, 1000, 1e-5, "rdp", 2.101, 0.0005),
    (0.01, 1.0, 1000, 1e-5, "pld", 1.828, 0.0005),
]


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "accountant", "expected", "tol"), VECTORS)
def test_epsilon_matches_reference_vectors(q, sigma, steps, delta, accountant, expected, tol):
    mechanism = DpSgdMechanism(sampling_rate=q, noise_multiplier=sigma, delta=delta,
                               accountant=accountant)
    assert epsilon(mechanism, steps) == pytest.approx(expected, abs=tol)


def test_vaultgemma_epsilon_is_two_with_pld():
    mechanism = DpSgdMechanism(sampling_rate=5.3e-5, noise_multiplier=0.614, delta=1.1e-10)
    assert epsilon(mechanism, 100_000) == pytest.approx(2.00, abs=0.03)


def test_pld_is_tighter_than_rdp_on_the_same_run():
    pld = DpSgdMechanism(sampling_rate=0.01, noise_multiplier=1.0, delta=1e-5)
    rdp = DpSgdMechanism(sampling_rate=0.01, noise_multiplier=1.0, delta=1e-5, accountant="rdp")
    assert epsilon(pld, 1000) < epsilon(rdp, 1000)


def test_zero_steps_spend_nothing_and_epsilon_grows_with_steps():
    m = DpSgdMechanism(sampling_rate=0.05, noise_multiplier=1.5, delta=1e-6, accountant="rdp")
    values = [epsilon(m, t) for t in (0, 1, 10, 100, 1000)]
    assert values[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(values))


def test_truncation_with_a_safe_physical_batch_costs_almost_nothing():
    n, batch, steps, delta = 1_000_000, 10_000, 2_000, 1e-8
    b_max = physical_batch_size_for(batch, dataset_size=n, steps=steps, delta=delta,
                                    epsilon_budget=5.0)
    assert b_max >= batch + 8 * math.sqrt(batch * (1 - batch / n))  # ≥ 8 standard deviations
    plain = DpSgdMechanism(sampling_rate=batch / n, noise_multiplier=1.0, delta=delta,
                           accountant="rdp")
    truncated = DpSgdMechanism(sampling_rate=batch / n, noise_multiplier=1.0, delta=delta,
                               accountant="rdp", dataset_size=n, physical_batch_size=b_max)
    eps_plain, eps_truncated = epsilon(plain, steps), epsilon(truncated, steps)
    # Reserving ρ = 1% of δ for truncation costs a little ε, never less than untruncated.
    assert eps_plain <= eps_truncated <= eps_plain + 0.02
    assert (1 + math.exp(eps_truncated)) * truncated.overflow_probability(steps) \
        <= TRUNCATION_DELTA_SHARE * delta


def test_truncation_to_the_expected_batch_cannot_be_certified():
    m = DpSgdMechanism(sampling_rate=0.01, noise_multiplier=1.0, delta=1e-6, dataset_size=100_000,
                       physical_batch_size=1_000, accountant="rdp")
    assert m.step_overflow_probability > 0.4  # about half of all batches overflow
    assert epsilon(m, 100) == math.inf


def test_physical_batch_above_the_dataset_never_truncates():
    # N + 1 rows: even the larger neighbouring dataset fits.
    m = DpSgdMechanism(sampling_rate=0.5, noise_multiplier=1.0, delta=1e-3, dataset_size=100,
                       physical_batch_size=101, accountant="rdp")
    assert not m.can_truncate
    assert m.accountant_delta == m.delta


@pytest.mark.parametrize(("field", "value", "rule"), [
    ("sampling_rate", 0.0, "must be in (0, 1]"),
    ("sampling_rate", 1.5, "must be in (0, 1]"),
    ("sampling_rate", float("nan"), "must not be NaN"),
    ("noise_multiplier", 0.0, "must be > 0"),
    ("noise_multiplier", -1.0, "must be > 0"),
    ("noise_multiplier", float("inf"), "must be finite"),
    ("delta", 0.0, "must be in (0, 1)"),
    ("delta", 1.0, "must be in (0, 1)"),
    ("delta", "1e-5", "must be a real number"),
])
def test_bad_mechanism_parameters_name_the_parameter_and_rule(field, value, rule):
    kwargs = {"sampling_rate": 0.01, "noise_multiplier": 1.0, "delta": 1e-5, field: value}
    with pytest.raises(PrivacyParameterError) as info:
        DpSgdMechanism(**kwargs)
    assert info.value.parameter == field
    assert info.value.rule == rule
    assert field in str(info.value)


@pytest.mark.parametrize("steps", [-1, 1.5, float("nan"), "10"])
def test_bad_step_counts_are_rejected(steps):
    m = DpSgdMechanism(sampling_rate=0.01, noise_multiplier=1.0, delta=1e-5, accountant="rdp")
    with pytest.raises(PrivacyParameterError) as info:
        epsilon(m, steps)
    assert info.value.parameter == "steps"


def test_physical_batch_requires_dataset_size():
    with pytest.raises(PrivacyParameterError) as info:
        DpSgdMechanism(sampling_rate=0.01, noise_multiplier=1.0, delta=1e-5,
                       physical_batch_size=10)
    assert info.value.parameter == "dataset_size"


def test_epsilon_of_an_absurd_step_count_uses_the_rdp_bound_above_every_budget():
    import dataclasses

    from dptrain.privacy._mechanism import PLD_EPSILON_CEILING

    m = DpSgdMechanism(sampling_rate=0.01, noise_multiplier=1.0, delta=1e-5)
    value = epsilon(m, 10**10)  # a lying progress report; composing a PLD this far would OOM
    assert value > PLD_EPSILON_CEILING
    # The cheap RDP bound is what comes back: no PLD was composed.
    assert value == epsilon(dataclasses.replace(m, accountant="rdp"), 10**10)
