"""Input checks for privacy parameters: each error names the parameter and the rule."""

from __future__ import annotations

import math
import numbers


class PrivacyParameterError(ValueError):
    """A privacy parameter broke its rule.

    Attributes:
        parameter: the parameter's name (e.g. ``sampling_rate``).
        rule: the rule it broke (e.g. ``must be in (0, 1]``).
        value: the offending value.
    """

    def __init__(self, parameter: str, rule: str, value: object) -> None:
        self.parameter = parameter
        self.rule = rule
        self.value = value
        super().__init__(f"{parameter} {rule} (got {value!r})")


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PrivacyParameterError(name, "must be a real number", value)
    as_float = float(value)
    if math.isnan(as_float):
        raise PrivacyParameterError(name, "must not be NaN", value)
    if math.isinf(as_float):
        raise PrivacyParameterError(name, "must be finite", value)
    return as_float


def check_sampling_rate(value: object, name: str = "sampling_rate") -> float:
    """Q must be a finite real in (0, 1]."""
    q = _real(name, value)
    if not 0.0 < q <= 1.0:
        raise PrivacyParameterError(name, "must be in (0, 1]", value)
    return q


def check_noise_multiplier(value: object, name: str = "noise_multiplier") -> float:
    """σ must be a finite real > 0."""
    sigma = _real(name, value)
    if sigma <= 0.0:
        raise PrivacyParameterError(name, "must be > 0", value)
    return sigma


def check_delta(value: object, name: str = "delta") -> float:
    """δ must be a finite real in (0, 1)."""
    delta = _real(name, value)
    if not 0.0 < delta < 1.0:
        raise PrivacyParameterError(name, "must be in (0, 1)", value)
    return delta


def check_epsilon(value: object, name: str = "epsilon") -> float:
    """ε must be a finite real > 0."""
    eps = _real(name, value)
    if eps <= 0.0:
        raise PrivacyParameterError(name, "must be > 0", value)
    return eps


def check_steps(value: object, name: str = "steps", minimum: int = 1) -> int:
    """T must be an integer ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise PrivacyParameterError(name, "must be an integer", value)
    steps = int(value)
    if steps < minimum:
        raise PrivacyParameterError(name, f"must be >= {minimum}", value)
    return steps


def check_positive_int(value: object, name: str) -> int:
    """A count that must be ≥ 1."""
    return check_steps(value, name=name, minimum=1)
