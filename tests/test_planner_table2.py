"""The paper's Table 2 rows (scaling-law reference): with M, B, T pinned the planner reproduces
C = 6·M·B·S·T and the PLD-calibrated σ within 2%."""

from __future__ import annotations

import pathlib

import pytest

from dptrain.api import DPTrainingJobSpec
from dptrain.planner import InfeasibleBudgetError, make_plan, scaled_shape
from dptrain.planner._exact import ExactAccounting

SEQ_LEN = 512
DELTA = 1e-8
# (N, ε, C, M, T, B, σ by PLD) from the reference.
ROWS = [
    (10**5, 4.0, 1.1e17, 4.6e6, 1800, 4100, 2.576),
    (10**7, 1.0, 3.8e19, 1.7e7, 9600, 78_000, 3.986),
]
ROW_N1E9 = (10**9, 16.0, 1.0e23, 3.3e8, 110_000, 880_000, 0.504)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.getbasetemp() / "planner-cache"


def _spec(epsilon: float, batch: int, steps: int) -> DPTrainingJobSpec:
    return DPTrainingJobSpec.model_validate({
        "privacy": {"epsilon": epsilon, "delta": DELTA},
        "data": {"builtin": "stdlib-docs", "sequenceLength": SEQ_LEN},
        "compute": {"accelerator": "nvidia-h100-80gb", "maxHosts": 64},
        "training": {"batchSize": batch, "iterations": steps}})


@pytest.mark.parametrize(("n", "eps", "c", "m", "t", "b", "sigma"), ROWS)
def test_pinned_table2_row_reproduces_compute_and_sigma(
        n: int, eps: float, c: float, m: float, t: int, b: int, sigma: float,
        cache_dir: pathlib.Path) -> None:
    plan = make_plan(_spec(eps, b, t), dataset_size=n, model=scaled_shape(m), cache_dir=cache_dir)
    assert (plan.batch_size, plan.iterations) == (b, t)
    assert plan.compute_flops == pytest.approx(6 * plan.model_params * b * SEQ_LEN * t, rel=1e-12)
    # The paper's C uses its own M; ours is the nearest family member's.
    assert plan.compute_flops / plan.model_params == pytest.approx(c / m, rel=0.1)
    assert abs(plan.noise_multiplier / sigma - 1) < 0.02
    assert plan.epsilon_planned <= eps
    assert plan.max_steps == t
    assert plan.sampling_rate == pytest.approx(b / n)


def test_table2_row_with_delta_above_one_over_n_is_a_data_budget_error(
        cache_dir: pathlib.Path) -> None:
    n, eps, _, m, t, b, _ = ROW_N1E9
    with pytest.raises(InfeasibleBudgetError) as info:
        make_plan(_spec(eps, b, t), dataset_size=n, model=scaled_shape(m), cache_dir=cache_dir)
    assert info.value.budget == "data"
    assert info.value.field == "spec.privacy.delta"
    assert "1/N" in str(info.value)


@pytest.mark.slow
def test_table2_n1e9_sigma_through_the_planners_exact_calibration(tmp_path: pathlib.Path) -> None:
    n, eps, _, _, t, b, sigma = ROW_N1E9
    got = ExactAccounting(tmp_path).noise_multiplier(
        epsilon_budget=eps, delta=DELTA, sampling_rate=b / n, steps=t, accountant="pld",
        dataset_size=n, physical_batch_size=n)  # no truncation: as the paper
    assert abs(got / sigma - 1) < 0.02
