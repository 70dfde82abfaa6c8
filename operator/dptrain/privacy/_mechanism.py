"""DP-SGD with (truncated) Poisson sampling, and the ε it spends.

One step of DP-SGD samples each of the N sequences independently with probability q, clips
each sampled sequence's gradient to L2 norm C and adds N(0, σ²C²) noise to their sum: a
Poisson-subsampled Gaussian mechanism. T steps compose. We account for it with
dp-accounting's events and its PLD (default, tight) or RDP (faster, looser) accountant, under
add/remove adjacency of one sequence (the privacy unit).

Truncated Poisson ("Scalable DP-SGD"): a fixed physical batch B_max pads short batches and
truncates long ones. We account for truncation with the coupling argument of Chua et al. 2024
(arXiv 2411.04205): if the untruncated mechanism is (ε, δ₀)-DP and η(D) is the probability that
any of the T batches drawn from dataset D overflows B_max, then for neighbours D, D′
P[M(D) ∈ S] ≤ e^ε·P[M(D′) ∈ S] + δ₀ + η(D) + e^ε·η(D′): the truncated run differs from the
untruncated one on D with probability η(D) and on D′ with probability η(D′). Under add/remove
adjacency the larger dataset of a pair around our N has N + 1 rows, and η grows with the row
count, so we bound both terms by η(N + 1) and require (1 + e^ε)·η(N + 1) ≤ ρ·δ. We chose
it over dp-accounting's exact ``TruncatedSubsampledGaussianDpEvent`` because it works with both
accountants, costs one binomial tail instead of a PLD 3–4× slower to build, and with a physical
batch sized by :func:`physical_batch_size_for` the adjustment is negligible. We reserve a fixed
share ``TRUNCATION_DELTA_SHARE`` of δ for the truncation term whenever truncation is possible.

Formal guarantees:
    1. ``epsilon(m, T)`` is an upper bound on the ε for which T steps of ``m`` are (ε, m.delta)-DP:
       PLD uses pessimistic discretisation (an upper bound for any discretisation interval) and
       RDP conversion is an upper bound by construction.
    2. With truncation, ``epsilon(m, T)`` is computed at δ₀ = (1 − ρ)·δ and is returned only if
       (1 + e^ε)·η(N + 1) ≤ ρ·δ, so δ₀ + η(D) + e^ε·η(D′) ≤ δ for every neighbouring pair
       (D, D′) with at most N + 1 rows; otherwise it is +inf (nothing can be certified).
    5. ``physical_batch_size_for`` returns a B_max with (1 + e^ε)·η(N + 1) ≤ ρ·δ at the given
       budget, so the plan it sizes can always be certified at that budget.
    3. ``epsilon(m, 0) == 0`` and ``epsilon`` is non-decreasing in T.
    4. Cost is bounded for any T: when the RDP bound already exceeds ``PLD_EPSILON_CEILING`` (above
       every budget the API accepts), the RDP bound is returned instead of composing a PLD whose
       support — and memory — grows with T. Both are upper bounds, so no decision changes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from scipy import stats

from dptrain.privacy._errors import (
    PrivacyParameterError,
    check_delta,
    check_noise_multiplier,
    check_positive_int,
    check_sampling_rate,
    check_steps,
)
from dptrain.privacy._quiet import silence_convergence_warnings

# dp-accounting logs one harmless warning per RDP order it leaves out (it only raises ε).
silence_convergence_warnings()

AccountantName = Literal["pld", "rdp"]
ACCOUNTANTS: tuple[AccountantName, ...] = ("pld", "rdp")

DEFAULT_VALUE_DISCRETIZATION = 1e-4
"""PLD discretisation used for every reported or enforced ε (see accounting notes: 1e-3 can be
very pessimistic at T ≈ 1e5; 1e-4 moves ε by about ±0.03 there, always upwards)."""

PLD_EPSILON_CEILING = 100.0
"""Above this ε (the API's largest budget) PLD is not composed: the cheap RDP bound is reported."""

TRUNCATION_DELTA_SHARE = 0.01
"""ρ: the share of δ reserved for the truncation term e^ε·η when batches can overflow."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpSgdMechanism:
    """One DP-SGD step's mechanism; the public configuration of the accountant.

    Attributes:
        sampling_rate: q = expected batch / N, in (0, 1].
        noise_multiplier: σ > 0 (noise std on the summed clipped gradient is σ·C).
        delta: target δ in (0, 1).
        accountant: ``"pld"`` (default, tight) or ``"rdp"``.
        dataset_size: N, needed only with a physical batch (truncation).
        physical_batch_size: B_max of truncated Poisson sampling; None = no truncation.
        value_discretization_interval: PLD discretisation (ignored by RDP).
    """

    sampling_rate: float
    noise_multiplier: float
    delta: float
    accountant: AccountantName = "pld"
    dataset_size: int | None = None
    physical_batch_size: int | None = None
    value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampling_rate", check_sampling_rate(self.sampling_rate))
        object.__setattr__(self, "noise_multiplier",
                           check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "delta", check_delta(self.delta))
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyParameterError("accountant", "must be 'pld' or 'rdp'", self.accountant)
        if self.dataset_size is not None:
            check_positive_int(self.dataset_size, "dataset_size")
        if self.physical_batch_size is not None:
            check_positive_int(self.physical_batch_size, "physical_batch_size")
            if self.dataset_size is None:
                raise PrivacyParameterError(
                    "dataset_size", "is required when physical_batch_size is set",
                    self.dataset_size)
        vdi = self.value_discretization_interval
        if not (isinstance(vdi, float | int) and 0 < vdi <= 0.1):
            raise PrivacyParameterError("value_discretization_interval", "must be in (0, 0.1]",
                                        vdi)

    @property
    def step_event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event of one (untruncated) step."""
        return dp_accounting.PoissonSampledDpEvent(
            self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier))

    def dp_event(self, steps: int) -> dp_accounting.DpEvent:
        """The dp-accounting event of ``steps`` composed steps."""
        return dp_accounting.SelfComposedDpEvent(self.step_event, check_steps(steps))

    @property
    def can_truncate(self) -> bool:
        """Whether a Poisson batch of a neighbouring dataset (N + 1 rows) can exceed B_max."""
        return (self.physical_batch_size is not None and self.dataset_size is not None
                and self.physical_batch_size < self.dataset_size + 1)

    @property
    def step_overflow_probability(self) -> float:
        """P[Binomial(N + 1, q) > B_max]: one step's batch of the larger neighbour is truncated.

        N + 1, not N: the adversary's neighbouring dataset may hold one row more than ours, and
        its overflow probability enters the coupling bound too (see the module docstring).
        """
        if not self.can_truncate:
            return 0.0
        assert self.dataset_size is not None and self.physical_batch_size is not None
        return float(stats.binom.sf(self.physical_batch_size, self.dataset_size + 1,
                                    self.sampling_rate))

    def overflow_probability(self, steps: int) -> float:
        """η(N + 1) = P[any of ``steps`` batches is truncated] = 1 − (1 − p)^T."""
        p = self.step_overflow_probability
        if p <= 0.0:
            return 0.0
        if p >= 1.0:
            return 1.0
        return -math.expm1(steps * math.log1p(-p))

    @property
    def accountant_delta(self) -> float:
        """δ₀ given to the accountant: δ less the share reserved for truncation."""
        if self.can_truncate:
            return self.delta * (1.0 - TRUNCATION_DELTA_SHARE)
        return self.delta

    def with_noise_multiplier(self, noise_multiplier: float) -> DpSgdMechanism:
        """The same mechanism with another σ."""
        return dataclasses.replace(self, noise_multiplier=noise_multiplier)


def _pld_epsilon(mechanism: DpSgdMechanism, steps: int, delta: float) -> float:
    return float(base_pld(mechanism).self_compose(steps).get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=256)
def base_pld(mechanism: DpSgdMechanism) -> pld_lib.PrivacyLossDistribution:
    """The PLD of one untruncated step (pessimistic; what PLDAccountant composes)."""
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=mechanism.noise_multiplier,
        sampling_prob=mechanism.sampling_rate,
        value_discretization_interval=mechanism.value_discretization_interval,
        pessimistic_estimate=True,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


@functools.lru_cache(maxsize=256)
def _rdp_one_step(mechanism: DpSgdMechanism) -> tuple[tuple[float, ...], tuple[float, ...]]:
    accountant = rdp_lib.RdpAccountant()
    accountant.compose(mechanism.step_event)
    orders = tuple(float(o) for o in accountant._orders)
    rdp = tuple(float(r) for r in accountant._rdp)
    return orders, rdp


def _rdp_epsilon(mechanism: DpSgdMechanism, steps: int, delta: float) -> float:
    orders, rdp = _rdp_one_step(mechanism)
    # RDP composes additively: T steps have T times one step's RDP at every order.
    eps, _ = rdp_lib.compute_epsilon(orders, [steps * r for r in rdp], delta)
    return float(eps)


def accountant_epsilon(mechanism: DpSgdMechanism, steps: int, delta: float) -> float:
    """ε of ``steps`` untruncated steps at ``delta``, from the chosen accountant."""
    if steps == 0:
        return 0.0
    if mechanism.accountant == "pld":
        # A lying progress report or an absurd spec can ask for ε after 1e10 steps; composing a
        # PLD that far exhausts memory, while the RDP bound costs microseconds and already shows
        # that no budget is met.
        rdp_bound = _rdp_epsilon(mechanism, steps, delta)
        if rdp_bound > PLD_EPSILON_CEILING:
            return rdp_bound
        return _pld_epsilon(mechanism, steps, delta)
    return _rdp_epsilon(mechanism, steps, delta)


def epsilon(mechanism: DpSgdMechanism, steps: int) -> float:
    """ε spent after ``steps`` steps of ``mechanism`` at its δ (see Formal guarantees).

    Args:
        mechanism: the DP-SGD step.
        steps: number of steps T ≥ 0.

    Returns:
        An upper bound on ε; +inf when truncation makes (ε, δ) impossible to certify.
    """
    steps = check_steps(steps, minimum=0)
    if steps == 0:
        return 0.0
    eps = accountant_epsilon(mechanism, steps, mechanism.accountant_delta)
    eta = mechanism.overflow_probability(steps)
    if eta > 0.0 and not truncation_certified(eps, eta, mechanism.delta):
        return math.inf
    return eps


def truncation_certified(eps: float, eta: float, delta: float) -> bool:
    """Whether (1 + e^ε)·η ≤ ρ·δ: the whole truncation term fits the δ share reserved for it."""
    if eta <= 0.0:
        return True
    if eps > 700:
        return False
    return (1.0 + math.exp(eps)) * eta <= TRUNCATION_DELTA_SHARE * delta


def physical_batch_size_for(expected_batch: float, *, dataset_size: int, steps: int,
                            delta: float, epsilon_budget: float = 10.0,
                            min_std_devs: float = 8.0) -> int:
    """The smallest physical batch that keeps truncation negligible.

    At least ``min_std_devs`` standard deviations of Binomial(N, q) above the expected batch,
    and large enough that (1 + e^ε)·η(N + 1) ≤ ρ·δ over ``steps`` steps at ``epsilon_budget``
    (so the δ share reserved for truncation suffices, for the neighbouring dataset of N + 1 rows
    too). Never more than N + 1 (which cannot overflow for any neighbour).
    """
    dataset_size = check_positive_int(dataset_size, "dataset_size")
    steps = check_steps(steps)
    delta = check_delta(delta)
    q = check_sampling_rate(expected_batch / dataset_size, "expected_batch / dataset_size")
    mean = q * dataset_size
    std = math.sqrt(dataset_size * q * (1.0 - q))
    ceiling = dataset_size + 1
    b_max = min(ceiling, math.ceil(mean + min_std_devs * std))
    budget = min(epsilon_budget, 700)

    def certified(b: int) -> bool:
        if b >= ceiling:
            return True
        p = float(stats.binom.sf(b, ceiling, q))
        eta = -math.expm1(steps * math.log1p(-p)) if p < 1.0 else 1.0
        return truncation_certified(budget, eta, delta)

    while not certified(b_max):
        b_max = min(ceiling, math.ceil(b_max + max(1.0, 0.5 * std)))
    return int(b_max)
