"""dp-accounting's RDP "failed to converge" warnings never reach users; other warnings do."""

from __future__ import annotations

import logging
import subprocess
import sys

import dp_accounting
from absl import logging as absl_logging

from dptrain.privacy._quiet import ABSL_LOGGER, silence_convergence_warnings

ENTRY = "import sys; from dptrain.cli import main; sys.exit(main())"
# σ = 0.3 at q = 0.1: dp-accounting cannot evaluate the low fractional orders and says so,
# once per order (dozens of lines per calibration before the filter).
NOISY = ("--sampling-rate", "0.1", "--delta", "1e-6", "--accountant", "rdp")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_calibrate_and_epsilon_print_no_absl_warnings():
    calibrate = _cli("calibrate", *NOISY, "--noise-multiplier", "0.3", "--epsilon", "10")
    assert calibrate.returncode == 0, calibrate.stderr
    assert "at σ = 0.3" in calibrate.stdout
    spent = _cli("epsilon", *NOISY, "--noise-multiplier", "0.3", "--steps", "10", "--json")
    assert spent.returncode == 0, spent.stderr
    assert '"epsilon"' in spent.stdout
    for out in (calibrate, spent):
        assert "failed to converge" not in out.stderr
        assert "absl" not in out.stderr, out.stderr


def test_only_the_convergence_warning_is_dropped():
    collected = _Collect()
    logger = logging.getLogger(ABSL_LOGGER)
    logger.addHandler(collected)
    try:
        dropping = silence_convergence_warnings()
        before = dropping.dropped
        # dp-accounting itself (uncached, unlike dptrain.privacy.epsilon): it does warn.
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            0.1, dp_accounting.GaussianDpEvent(0.3)), 10)
        assert 0 < accountant.get_epsilon(1e-6) < float("inf")
        assert dropping.dropped - before >= 3  # one per order left out (1.1, 1.2, 1.3 here)
        absl_logging.warning("Negative Renyi divergence of %s, probably caused by numerical "
                             "instability from extreme DpEvents.", -1.0)
    finally:
        logger.removeHandler(collected)
    assert not any("failed to converge" in m for m in collected.messages)
    assert any(m.startswith("Negative Renyi divergence of -1.0") for m in collected.messages)
    assert silence_convergence_warnings() is dropping  # installed once
