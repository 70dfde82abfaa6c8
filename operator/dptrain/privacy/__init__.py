"""Privacy accounting for DP-SGD with (truncated) Poisson sampling.

Built on dp-accounting's events and accountants (PLD by default, RDP optional). The pieces are
kept apart, as in jax_privacy: the mechanism and its ε (``_mechanism``), calibration
(``_calibration``), a precomputed ε-curve for fast conservative look-ups (``_curve``) and the
ledger of steps charged (``_ledger``).
"""

from dptrain.privacy._calibration import (
    CalibrationError,
    calibrate_noise_multiplier,
    calibrate_steps,
    largest_steps_within,
)
from dptrain.privacy._curve import EpsilonCurve
from dptrain.privacy._errors import PrivacyParameterError
from dptrain.privacy._float32 import round_up_to_float32
from dptrain.privacy._ledger import PrivacyLedger
from dptrain.privacy._mechanism import (
    ACCOUNTANTS,
    DEFAULT_VALUE_DISCRETIZATION,
    TRUNCATION_DELTA_SHARE,
    AccountantName,
    DpSgdMechanism,
    epsilon,
    physical_batch_size_for,
)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_VALUE_DISCRETIZATION",
    "TRUNCATION_DELTA_SHARE",
    "AccountantName",
    "CalibrationError",
    "DpSgdMechanism",
    "EpsilonCurve",
    "PrivacyLedger",
    "PrivacyParameterError",
    "calibrate_noise_multiplier",
    "calibrate_steps",
    "epsilon",
    "largest_steps_within",
    "physical_batch_size_for",
    "round_up_to_float32",
]
