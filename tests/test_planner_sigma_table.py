"""The σ table: close to exact calibration, conservative against PLD, cached on disk."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from dptrain.planner import SigmaTable
from dptrain.privacy import DpSgdMechanism, calibrate_noise_multiplier, epsilon


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> SigmaTable:
    return SigmaTable(1e-6, cache_dir=tmp_path_factory.getbasetemp() / "planner-cache")


@pytest.mark.parametrize(("q", "steps", "eps"), [(2.0**-10, 4096, 2.0), (2.0**-6, 1000, 4.0)])
def test_table_sigma_matches_rdp_calibration_at_grid_nodes(table: SigmaTable, q: float,
                                                           steps: int, eps: float) -> None:
    surface = table.surface(eps, q, q)
    got = float(surface(np.array(q), np.array(steps)))
    exact_rdp = calibrate_noise_multiplier(epsilon=eps, delta=table.table_delta, sampling_rate=q,
                                           steps=steps, accountant="rdp")
    assert got == pytest.approx(exact_rdp, rel=0.03)
    # RDP bounds PLD's ε from above, so the table's σ is enough for PLD at the node.
    pld = epsilon(DpSgdMechanism(sampling_rate=q, noise_multiplier=got, delta=1e-6), steps)
    assert pld <= eps


def test_sigma_decreases_with_epsilon_and_grows_with_steps(table: SigmaTable) -> None:
    q = np.full(5, 2.0**-8)
    t = np.array([1000, 3000, 10_000, 30_000, 100_000])
    s1, s4 = table.surface(1.0, q[0], q[0]), table.surface(4.0, q[0], q[0])
    assert np.all(s4(q, t) <= s1(q, t))
    assert np.all(np.diff(s1(q, t)) >= 0)


def test_slices_are_cached_on_disk(table: SigmaTable) -> None:
    table.ensure([5])
    again = SigmaTable(1e-6, cache_dir=table.cache_dir)
    again.ensure([5])
    assert again.slices_computed == 0
    assert np.array_equal(again.log_epsilon(5), table.log_epsilon(5))


def test_unreachable_budget_reads_as_infinite_sigma(table: SigmaTable) -> None:
    surface = table.surface(1e-4, 2.0**-2, 2.0**-2)
    assert np.isinf(surface(np.array(0.25), np.array(100_000)))


def test_cache_dir_defaults_to_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("DPTRAIN_CACHE_DIR", str(tmp_path))
    assert SigmaTable(1e-6).path.is_relative_to(tmp_path)
