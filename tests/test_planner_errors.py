"""Infeasible budgets name the budget, the shortfall and the nearest feasible value; bad pins
name the spec field."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from dptrain.api import DPTrainingJobSpec, InvalidJobError
from dptrain.planner import InfeasibleBudgetError, make_plan

N = 100_000


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.getbasetemp() / "planner-cache"


def _spec(**sections: dict[str, Any]) -> DPTrainingJobSpec:
    base: dict[str, Any] = {
        "privacy": {"epsilon": 4.0, "delta": 1e-6, "accountant": "rdp"},
        "data": {"builtin": "stdlib-docs", "sequenceLength": 128},
        "compute": {"flops": 1e15}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return DPTrainingJobSpec.model_validate(base)


def test_delta_at_least_one_over_n_is_a_data_budget_error(cache_dir: pathlib.Path) -> None:
    with pytest.raises(InfeasibleBudgetError) as info:
        make_plan(_spec(privacy={"delta": 1e-5}), dataset_size=N, cache_dir=cache_dir)
    error = info.value
    assert (error.budget, error.field) == ("data", "spec.privacy.delta")
    assert error.required == pytest.approx(1 / N)
    assert "nearest feasible" in str(error)


def test_compute_budget_below_one_step_names_the_shortfall(cache_dir: pathlib.Path) -> None:
    with pytest.raises(InfeasibleBudgetError) as info:
        make_plan(_spec(compute={"flops": 1e6}), dataset_size=N, cache_dir=cache_dir)
    error = info.value
    assert (error.budget, error.field) == ("compute", "spec.compute.flops")
    assert error.required is not None and error.required > 1e6
    assert "nearest feasible" in str(error)


def test_pinned_config_over_the_compute_budget_is_a_compute_error(
        cache_dir: pathlib.Path) -> None:
    with pytest.raises(InfeasibleBudgetError) as info:
        make_plan(_spec(model={"preset": "small"}, compute={"flops": 1e12},
                        training={"batchSize": 256, "iterations": 1000}),
                  dataset_size=N, cache_dir=cache_dir)
    assert info.value.budget == "compute"
    assert info.value.required == pytest.approx(6 * 591_360 * 256 * 128 * 1000)


def test_epsilon_too_small_for_any_sigma_names_the_nearest_feasible_epsilon(
        cache_dir: pathlib.Path) -> None:
    # Full-batch steps (q = 1): ε = 0.02 over 20K steps needs σ far beyond 1e4.
    spec = _spec(privacy={"epsilon": 0.02}, compute={"flops": 1e20},
                 training={"batchSize": N, "iterations": 20_000})
    with pytest.raises(InfeasibleBudgetError) as info:
        make_plan(spec, dataset_size=N, cache_dir=cache_dir)
    assert (info.value.budget, info.value.field) == ("privacy", "spec.privacy.epsilon")


def test_free_search_with_tiny_epsilon_reports_the_nearest_feasible_epsilon(
        cache_dir: pathlib.Path) -> None:
    spec = _spec(privacy={"epsilon": 1e-4}, model={"preset": "tiny"},
                 training={"iterations": 20_000}, compute={"flops": 1e20})
    with pytest.raises(InfeasibleBudgetError) as info:
        make_plan(spec, dataset_size=N, cache_dir=cache_dir)
    error = info.value
    assert error.budget == "privacy"
    assert error.required is not None and error.required > 1e-4
    assert "nearest feasible" in str(error)


def test_pinned_sigma_too_small_for_one_step_is_a_privacy_error(cache_dir: pathlib.Path) -> None:
    spec = _spec(privacy={"epsilon": 0.5}, training={"batchSize": N, "iterations": 10,
                                                     "noiseMultiplier": 0.1})
    with pytest.raises(InfeasibleBudgetError) as info:
        make_plan(spec, dataset_size=N, model=None, cache_dir=cache_dir)
    assert info.value.budget == "privacy"
    assert "not one step" in str(info.value)


@pytest.mark.parametrize(("sections", "field"), [
    ({"model": {"preset": "tiny"}, "data": {"sequenceLength": 512}}, "spec.data.sequenceLength"),
    ({"training": {"batchSize": 512, "physicalBatchSize": 256}},
     "spec.training.physicalBatchSize"),
    ({"training": {"batchSize": 2 * N}}, "spec.training.batchSize"),
    ({"model": {"preset": "enormous"}}, "spec.model.preset"),
    ({"compute": {"accelerator": "nvidia-h100-80gb", "tpuTopology": "2x2"}},
     "spec.compute.tpuTopology"),
    ({"compute": {"accelerator": "tpu-v6e", "tpuTopology": "3x3"}}, "spec.compute.tpuTopology"),
])
def test_bad_pins_name_the_spec_field(sections: dict[str, Any], field: str,
                                      cache_dir: pathlib.Path) -> None:
    with pytest.raises(InvalidJobError) as info:
        make_plan(_spec(**sections), dataset_size=N, cache_dir=cache_dir)
    assert [e.field for e in info.value.errors] == [field]
    assert str(info.value).startswith(f"{field}: ")
