"""The privacy ledger: how many DP-SGD steps have been charged against a budget.

The ledger is the accountant's state: with a fixed mechanism, ε spent is a function of the
steps charged alone, so saving ``steps_charged`` with the mechanism is enough to restore it.

Formal guarantees:
    1. ``steps_charged`` never decreases: ``charge`` adds, ``merge`` takes the maximum, and
       ``from_dict`` rejects negative or non-integer counts.
    2. ``can_charge(n)`` is true only if ε after ``steps_charged + n`` steps is ≤ the budget,
       so a guard that charges only when it is true never passes the budget.
    3. ``from_dict(to_dict(x)) == x`` (state round-trips through a checkpoint or a status).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dptrain.privacy._curve import EpsilonCurve
from dptrain.privacy._errors import PrivacyParameterError, check_epsilon, check_steps
from dptrain.privacy._mechanism import DpSgdMechanism, epsilon

LEDGER_FORMAT = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyLedger:
    """Steps charged against an ε budget under one mechanism."""

    mechanism: DpSgdMechanism
    epsilon_budget: float
    steps_charged: int = 0

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon_budget, name="epsilon_budget")
        check_steps(self.steps_charged, name="steps_charged", minimum=0)

    def epsilon_spent(self, curve: EpsilonCurve | None = None) -> float:
        """ε after the steps charged (exact, or the curve's conservative look-up)."""
        if curve is not None and self.steps_charged <= curve.max_steps:
            return curve.epsilon_at(self.steps_charged)
        return epsilon(self.mechanism, self.steps_charged)

    def can_charge(self, steps: int = 1, curve: EpsilonCurve | None = None) -> bool:
        """Whether charging ``steps`` more keeps ε within the budget."""
        total = self.steps_charged + check_steps(steps, minimum=0)
        eps = (curve.epsilon_at(total) if curve is not None and total <= curve.max_steps
               else epsilon(self.mechanism, total))
        return eps <= self.epsilon_budget

    def charge(self, steps: int = 1) -> PrivacyLedger:
        """A ledger with ``steps`` more charged (the caller checked ``can_charge``)."""
        return dataclasses.replace(
            self, steps_charged=self.steps_charged + check_steps(steps, minimum=0))

    def merge(self, other_steps: int) -> PrivacyLedger:
        """Reconcile with another record of the count: the larger one wins (never undercount)."""
        other = check_steps(other_steps, name="steps_charged", minimum=0)
        return dataclasses.replace(self, steps_charged=max(self.steps_charged, other))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state, e.g. for a checkpoint."""
        m = self.mechanism
        return {
            "format": LEDGER_FORMAT,
            "steps_charged": self.steps_charged,
            "epsilon_budget": self.epsilon_budget,
            "mechanism": {
                "sampling_rate": m.sampling_rate,
                "noise_multiplier": m.noise_multiplier,
                "delta": m.delta,
                "accountant": m.accountant,
                "dataset_size": m.dataset_size,
                "physical_batch_size": m.physical_batch_size,
                "value_discretization_interval": m.value_discretization_interval,
            },
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
        """Restore a ledger saved by :meth:`to_dict`."""
        if state.get("format") != LEDGER_FORMAT:
            raise PrivacyParameterError("format", f"must be {LEDGER_FORMAT}", state.get("format"))
        return cls(mechanism=DpSgdMechanism(**state["mechanism"]),
                   epsilon_budget=state["epsilon_budget"],
                   steps_charged=state["steps_charged"])
