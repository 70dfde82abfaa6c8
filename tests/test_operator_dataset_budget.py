"""Dataset budgets: composition with dp-accounting (not a sum) and admission, pure and fast."""

from __future__ import annotations

import dp_accounting
import pytest

from dptrain.api import DatasetCharge, DPDatasetSpec
from dptrain.operator import _dataset_budget as budget
from dptrain.operator._dataset_budget import Events
from dptrain.privacy import DpSgdMechanism, epsilon

DELTA = 1e-5


def charge(uid, q=0.01, sigma=1.0, steps=100, **extra):
    return DatasetCharge(job=uid, uid=uid, sampling_rate=q, noise_multiplier=sigma,
                         reserved_steps=steps, **extra)


def spec(eps, accountant="rdp"):
    return DPDatasetSpec.model_validate({"privacy": {"epsilon": eps, "delta": DELTA,
                                                     "accountant": accountant},
                                         "checksum": "sha256:data"})


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_one_event_composes_to_the_single_job_epsilon(accountant):
    mechanism = DpSgdMechanism(sampling_rate=0.01, noise_multiplier=1.0, delta=DELTA,
                               accountant=accountant)
    got = budget.composed_epsilon([((0.01, 1.0, None, None), 1000)], DELTA, accountant)
    assert got == pytest.approx(epsilon(mechanism, 1000), rel=1e-9)  # 2.101 RDP, 1.828 PLD


def test_composition_of_different_jobs_matches_dp_accounting_and_beats_the_sum():
    events = [((0.01, 1.0, None, None), 500), ((0.02, 2.0, None, None), 300)]
    got = budget.composed_epsilon(events, DELTA, "pld")
    reference = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    reference.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(s)), t) for (q, s, _, _), t in events]))
    assert got == pytest.approx(reference.get_epsilon(DELTA), abs=2e-3)
    alone = sum(budget.composed_epsilon([e], DELTA, "pld") for e in events)
    assert got < 0.9 * alone  # composition, not a sum


def test_same_mechanism_jobs_compose_like_one_longer_job():
    three = budget.composed_epsilon([((0.01, 1.0, None, None), 100)] * 3, DELTA, "rdp")
    long = budget.composed_epsilon([((0.01, 1.0, None, None), 300)], DELTA, "rdp")
    assert three == pytest.approx(long, rel=1e-12)


def test_admission_fits_exactly_as_many_jobs_as_the_composition_allows():
    group = (0.01, 1.0, None, None)
    limit = (budget.composed_epsilon([(group, 300)], DELTA, "rdp")
             + budget.composed_epsilon([(group, 400)], DELTA, "rdp")) / 2
    dataset = spec(limit)
    charges: list[DatasetCharge] = []
    admitted = 0
    for i in range(10):
        candidate = charge(f"j{i}")
        answer = budget.admit(dataset, charges, candidate)
        if answer.fits:
            charges = budget.with_charge(charges, candidate)
            admitted += 1
        else:
            assert answer.composed > limit and answer.remaining < answer.composed
    assert admitted == 3


def test_charges_follow_the_ledger_release_unused_reservations_and_never_vanish_once_run():
    charges = [charge("a"), charge("b")]
    charges = budget.update_steps(charges, "a", 40, final=False)
    charges = budget.update_steps(charges, "a", 10, final=False)  # never lowered
    assert charges[0].steps_charged == 40 and charges[0].state == "Running"
    assert budget.committed_steps(charges[0]) == 100  # still reserved while it runs
    charges = budget.update_steps(charges, "a", 40, final=True)
    assert budget.committed_steps(charges[0]) == 40  # halted early: 60 steps released
    gone = budget.release(charges, "b")  # never ran: its reservation frees
    assert [c.uid for c in gone] == ["a"]
    assert budget.release(gone, "a") == gone  # ran: kept, at its actual steps
    summary = budget.summarize(spec(10.0), gone)
    assert summary.spent == pytest.approx(summary.committed) and summary.reserved == 0.0


# Three jobs of different mechanisms (composition 1.556 PLD, 2.133 RDP at δ 1e-5).
MIXED = [((0.01, 1.0, None, None), 300), ((0.02, 2.0, None, None), 200),
         ((0.005, 0.8, None, None), 400)]


def reference_rdp(events, delta=DELTA):
    accountant = dp_accounting.rdp.RdpAccountant()
    for (q, sigma, _, _), steps in events:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def test_quick_rdp_bound_never_undercounts_the_composition():
    """Guarantee 2's premise: quick RDP ≥ full RDP ≥ the composed ε (min of RDP and PLD)."""
    assert set(budget.QUICK_ORDERS) <= set(budget.DEFAULT_ORDERS)
    assert len(budget.QUICK_ORDERS) < len(budget.DEFAULT_ORDERS) / 4
    events = budget._events(MIXED)
    full_rdp = reference_rdp(MIXED)
    quick = budget._rdp_bound(events, DELTA)
    pld = budget.composed_epsilon(MIXED, DELTA, "pld")
    assert budget.composed_epsilon(MIXED, DELTA, "rdp") == pytest.approx(full_rdp, rel=1e-9)
    assert quick >= full_rdp > pld
    assert quick <= 1.02 * full_rdp  # the subset keeps the useful orders (2.154 vs 2.133)
    for part in ([MIXED[0]], MIXED[:2], [(MIXED[0][0], 5000)]):
        assert budget._rdp_bound(budget._events(part), DELTA) >= reference_rdp(part) * (1 - 1e-12)


def fresh_caches():
    budget._PLDS.clear()
    budget.base_pld.cache_clear()


@pytest.mark.parametrize("where", ["far below", "just below PLD", "just above PLD",
                                   "between PLD and RDP", "just above quick RDP", "far above"])
def test_tiered_admission_takes_the_full_compositions_decision(where, monkeypatch):
    """Guarantee 2: admitted iff the full composition (min of RDP, PLD) fits; no tier is more
    permissive, and the cheaper tiers decide whenever their bound fits (cold caches)."""
    fresh_caches()
    charges = [charge("a", q=0.01, sigma=1.0, steps=300), charge("b", q=0.02, sigma=2.0, steps=200)]
    candidate = charge("new", q=0.005, sigma=0.8, steps=400)
    exact = budget.composed_epsilon(MIXED, DELTA, "pld")
    quick = budget._rdp_bound(budget._events(MIXED), DELTA)
    limit = {"far below": 0.5 * exact, "just below PLD": exact * (1 - 1e-6),
             "just above PLD": exact * (1 + 1e-6), "between PLD and RDP": (exact + quick) / 2,
             "just above quick RDP": quick * (1 + 1e-3), "far above": 3 * quick}[where]
    fresh_caches()
    built: list[Events] = []
    rdp_orders: list[int] = []
    real_pld, real_rdp = budget._pld, budget._rdp_epsilon
    monkeypatch.setattr(budget, "_pld", lambda e, d, *a: built.append(e) or real_pld(e, d, *a))
    monkeypatch.setattr(budget, "_rdp_epsilon",
                        lambda e, d: rdp_orders.append(len(e)) or real_rdp(e, d))
    answer = budget.admit(spec(limit, "pld"), charges, candidate)
    assert answer.fits == (exact <= limit)
    assert answer.composed >= exact * (1 - 1e-9)  # never reported below the exact composition
    if limit >= quick:
        assert not built and not rdp_orders  # the quick RDP bound decided: no PLD
    elif limit >= exact:  # the PLD decided, without the 156-order RDP
        assert built and not rdp_orders and answer.composed == pytest.approx(exact, rel=1e-9)
    else:
        assert rdp_orders  # refused on composed_epsilon itself


def test_warm_admission_composes_only_the_new_job(monkeypatch):
    """With the committed charges' PLD cached (status summary), one job's PLD is built."""
    charges = [charge("a", q=0.01, sigma=1.0, steps=300), charge("b", q=0.02, sigma=2.0, steps=200)]
    candidate = charge("new", q=0.005, sigma=0.8, steps=400)
    exact = budget.composed_epsilon(MIXED, DELTA, "pld")
    fresh_caches()
    budget.summarize(spec(10.0, "pld"), charges)
    built: list[Events] = []
    base_pld_calls = budget.base_pld.cache_info().misses
    real_pld = budget._pld
    monkeypatch.setattr(budget, "_pld", lambda e, d, *a: built.append(e) or real_pld(e, d, *a))
    answer = budget.admit(spec(exact * 1.01, "pld"), charges, candidate)
    assert answer.fits and answer.composed == pytest.approx(exact, rel=1e-9)
    assert budget.base_pld.cache_info().misses == base_pld_calls + 1  # only the new job's


def test_persisted_plds_give_the_same_decision_and_epsilon(tmp_path, monkeypatch):
    """A restart reading the charged jobs' PLDs back decides exactly as one that rebuilds them."""
    charges = [charge("a", q=0.01, sigma=1.0, steps=300), charge("b", q=0.02, sigma=2.0, steps=200)]
    candidate = charge("new", q=0.005, sigma=0.8, steps=400)
    exact = budget.composed_epsilon(MIXED, DELTA, "pld")
    monkeypatch.setattr(budget, "_DISK", None)
    budget.persist_under(tmp_path)
    try:
        answers = []
        for _ in range(2):  # built and stored; then (fresh process) read back
            fresh_caches()
            answers.append(budget.admit(spec(exact * 1.001, "pld"), charges, candidate))
            if not answers[1:]:
                assert len(list((tmp_path / "dataset-pld").glob("*.npz"))) == 3
                for stray in (tmp_path / "dataset-pld").glob("*.tmp"):
                    raise AssertionError(f"half-written {stray}")
        misses = budget.base_pld.cache_info().misses
        assert misses == 0  # nothing rebuilt
        assert answers[0] == answers[1] and answers[1].fits
        assert answers[1].composed == pytest.approx(exact, rel=1e-9)  # order of FFTs
        for path in (tmp_path / "dataset-pld").glob("*.npz"):
            path.write_bytes(b"not an npz")  # corrupt: rebuilt, same answer
        fresh_caches()
        assert budget.admit(spec(exact * 1.001, "pld"), charges, candidate) == answers[0]
        assert budget.base_pld.cache_info().misses == 3
    finally:
        budget.persist_under(None)
