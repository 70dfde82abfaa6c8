"""Keep dp-accounting's harmless RDP convergence warnings out of users' terminals and logs.

dp-accounting's RDP accountant logs (through absl) one ``_compute_log_a_frac failed to converge``
warning per fractional Rényi order it cannot evaluate, and then leaves that order out of the
minimum over orders. A calibration evaluates hundreds of (σ, order) pairs, so a single
``dptrain calibrate`` printed dozens of these lines. They need no action: dropping an order can
only make the reported ε larger (the bound is a minimum over the remaining orders), never smaller.

Only that message is filtered. Every other dp-accounting warning (for example "Negative Renyi
divergence", which signals a numerical breakdown that could understate ε) still gets through.
"""

from __future__ import annotations

import logging

ABSL_LOGGER = "absl"
CONVERGENCE_MESSAGE = "_compute_log_a_frac failed to converge"


class _DropConvergenceWarnings(logging.Filter):
    """Drops the RDP order-convergence warnings; counts them (``dropped``) for tests/debugging."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(CONVERGENCE_MESSAGE):
            self.dropped += 1
            return False
        return True


def silence_convergence_warnings() -> logging.Filter:
    """Install (once) the filter on absl's logger, where dp-accounting logs; return it."""
    logger = logging.getLogger(ABSL_LOGGER)
    for existing in logger.filters:
        if isinstance(existing, _DropConvergenceWarnings):
            return existing
    installed = _DropConvergenceWarnings()
    logger.addFilter(installed)
    return installed
