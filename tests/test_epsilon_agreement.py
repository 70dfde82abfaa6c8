"""One "ε after t steps of a plan": status, progress bar, report and plot agree exactly."""

from __future__ import annotations

import itertools
import json

import pytest

from dptrain.api import PlanStatus
from dptrain.operator import Accountant
from dptrain.planner import LINEAR_POINTS, mechanism_of, plan_curve, plan_grid
from dptrain.privacy import epsilon

PLAN = PlanStatus(
    model_preset="tiny", model_params=90624, batch_size=64, iterations=300,
    noise_multiplier=1.1, noise_batch_ratio=1.1 / 64, sampling_rate=0.032,
    physical_batch_size=128, dataset_size=2000, sequence_length=64, clip_norm=1.0,
    learning_rate=3e-3, compute_flops=2.2e12, max_steps=250, epsilon_planned=1.99,
    accountant="rdp", spec_generation=1)
DELTA = 1e-6


def test_the_plan_curve_is_never_below_the_exact_epsilon_and_exact_on_its_grid():
    curve = plan_curve(PLAN, DELTA)
    mechanism = mechanism_of(PLAN, DELTA)
    grid = set(curve.steps)
    assert {PLAN.max_steps} | set(plan_grid(PLAN)) <= grid
    for t in range(0, PLAN.max_steps + 6):
        exact = epsilon(mechanism, t) if t else 0.0
        value = curve.epsilon_at(t)
        assert value >= exact - 1e-12 * max(1.0, exact)
        if t in grid or t > PLAN.max_steps:
            assert value == pytest.approx(exact, rel=1e-12, abs=1e-12)


def test_the_plan_curve_has_a_point_at_least_every_linear_fraction_of_its_steps():
    steps = plan_curve(PLAN, DELTA).steps
    widest = max(b - a for a, b in itertools.pairwise(steps))
    assert widest <= -(-PLAN.max_steps // LINEAR_POINTS)


def test_operator_and_trainer_build_the_same_curve_from_the_same_plan():
    accountant = Accountant()
    curve = plan_curve(PLAN, DELTA)
    for t in (1, 7, 33, 100, 249, 250, 251, 260):
        assert accountant.epsilon_spent(PLAN, DELTA, t) == curve.epsilon_at(t)


class Recorder:
    """A reporter that keeps every progress report (what the progress bar shows too)."""

    def __init__(self):
        self.reports = []

    def known_steps_charged(self):
        return 0

    def record_charge(self, progress):
        self.reports.append(progress)

    def report(self, progress):
        self.reports.append(progress)


@pytest.mark.slow
def test_status_progress_report_and_plot_agree_for_every_step_count(micro_config, tmp_path):
    from dptrain.trainer import train, write_report
    from dptrain.trainer._report import epsilon_points

    # 40 steps in blocks of 3: counts between the plan's grid points are reported too.
    config = micro_config(iterations=40, ledger_block=3)
    recorder = Recorder()
    result = train(config, reporters=[recorder])
    operator = Accountant()

    def status(t):  # what the operator writes into status.privacy.epsilonSpent
        return operator.epsilon_spent(config.plan, config.delta, t)

    reported = [p for p in recorder.reports if p.epsilon_spent is not None]
    assert len(reported) >= 40 // 3
    for progress in reported:  # the progress bar shows the same ε as each report
        assert progress.epsilon_spent == status(progress.steps_charged)
    points = epsilon_points(result)
    assert [x for x, _ in points] == list(range(0, 41))
    for t, eps in points[1:]:
        assert eps == status(t)
    report = write_report(result, tmp_path / "report")
    assert result.epsilon_spent == status(result.steps_charged) == report["epsilon_spent"]
    assert json.loads((tmp_path / "report" / "report.json").read_text())["epsilon_spent"] == (
        status(40))
    assert (tmp_path / "report" / "epsilon.png").stat().st_size > 1000
    # Not trivially equal: some counts lie between grid points (ε rounded up there).
    mechanism = config.mechanism
    assert any(eps > epsilon(mechanism, t) * (1 + 1e-9) for t, eps in points[1:])
