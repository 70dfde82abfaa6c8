"""The ε-curve is conservative and the ledger never undercounts."""

import random

import pytest

from dptrain.privacy import DpSgdMechanism, EpsilonCurve, PrivacyLedger, epsilon

RDP = DpSgdMechanism(sampling_rate=0.02, noise_multiplier=1.1, delta=1e-6, accountant="rdp")
PLD = DpSgdMechanism(sampling_rate=0.02, noise_multiplier=1.1, delta=1e-6)


@pytest.fixture(scope="module")
def pld_curve():
    return EpsilonCurve.build(PLD, 2_000, points=10, anchors=(777,))


def test_curve_lookup_never_below_exact_epsilon(pld_curve):
    rng = random.Random(0)
    for t in [1, 2, 3, 500, 777, 1999, 2000, *rng.sample(range(1, 2000), 5)]:
        assert pld_curve.epsilon_at(t) >= epsilon(PLD, t) - 1e-12


def test_curve_is_exact_at_grid_points_and_anchors(pld_curve):
    assert 777 in pld_curve.steps
    assert pld_curve.epsilon_at(777) == pytest.approx(epsilon(PLD, 777), abs=1e-12)
    assert pld_curve.epsilon_at(0) == 0.0


def test_curve_max_steps_within_budget_is_exact(pld_curve):
    budget = pld_curve.epsilon_at(1000) * 0.97
    steps = pld_curve.max_steps_within(budget)
    assert epsilon(PLD, steps) <= budget < epsilon(PLD, steps + 1)


def test_curve_beyond_its_range_computes_exactly():
    curve = EpsilonCurve.build(RDP, 100)
    assert curve.epsilon_at(150) == pytest.approx(epsilon(RDP, 150), abs=1e-12)


def test_curve_lookups_never_recompute_epsilon(pld_curve, monkeypatch):
    # Look-ups within the curve's range must be table reads (bench/accountant.py times them).
    import dptrain.privacy._curve as curve_module

    def no_composition(*args, **kwargs):
        raise AssertionError("epsilon recomputed during a look-up")

    monkeypatch.setattr(curve_module, "epsilon", no_composition)
    values = [pld_curve.epsilon_at(t) for t in range(0, 2001)]
    assert values == sorted(values) and values[-1] == pld_curve.epsilon_at(2000)


def test_ledger_never_charges_past_budget():
    budget = epsilon(RDP, 300)
    ledger = PrivacyLedger(mechanism=RDP, epsilon_budget=budget)
    while ledger.can_charge(1):
        ledger = ledger.charge(1)
    assert ledger.steps_charged == 300
    assert ledger.epsilon_spent() <= budget


def test_ledger_merge_takes_the_larger_count():
    ledger = PrivacyLedger(mechanism=RDP, epsilon_budget=5.0, steps_charged=40)
    assert ledger.merge(10).steps_charged == 40
    assert ledger.merge(55).steps_charged == 55


def test_ledger_round_trips_through_a_dict():
    ledger = PrivacyLedger(mechanism=PLD, epsilon_budget=3.0, steps_charged=12)
    assert PrivacyLedger.from_dict(ledger.to_dict()) == ledger


def test_ledger_rejects_a_negative_count():
    state = PrivacyLedger(mechanism=RDP, epsilon_budget=3.0).to_dict()
    state["steps_charged"] = -5
    with pytest.raises(ValueError, match="steps_charged"):
        PrivacyLedger.from_dict(state)
