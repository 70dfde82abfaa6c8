"""The run's report: ``report.json`` and PNG plots of the loss and ε over steps.

``report.json`` always has ``epsilon_spent``, ``epsilon_budget``, ``delta``, ``steps``,
``initial_loss``, ``final_loss``, ``tokens_per_second`` and ``end_state``, plus context (steps
charged, plan, where the checkpoints are, the secret key's fingerprint). The losses are the DP
loss estimate (released under the job's ε); ``raw_statistics`` says whether raw statistics of the
training rows were also published (an unaccounted release). With held-out evaluation the report
has ``evaluation`` (the latest loss and perplexity, every record, and the note that they are not
covered by ε) and ``evaluation.png``. Plots are drawn with matplotlib's
Agg canvas directly (no global backend switch), so they work headless and in any thread.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dptrain.trainer._evaluation import PRIVACY_NOTE
from dptrain.trainer._loop import TrainResult

REPORT_FILE = "report.json"
LOSS_PLOT = "loss.png"
EPSILON_PLOT = "epsilon.png"
EVALUATION_PLOT = "evaluation.png"
REPORT_KEYS = ("epsilon_spent", "epsilon_budget", "delta", "steps", "initial_loss", "final_loss",
               "tokens_per_second", "end_state")


def report_dict(result: TrainResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's content."""
    report: dict[str, Any] = {
        "epsilon_spent": result.epsilon_spent,
        "epsilon_budget": result.epsilon_budget,
        "delta": result.delta,
        "steps": result.step,
        "initial_loss": result.initial_loss,
        "final_loss": result.final_loss,
        "tokens_per_second": result.tokens_per_second,
        "end_state": result.end_state,
        "steps_charged": result.steps_charged,
        "checkpoint_dir": str(result.checkpoint_dir),
        "loss_estimate": "DP estimate of the mean clipped per-token loss, released under the "
                         "job's (ε, δ)",
        "raw_statistics": ("released outside ε (unaccounted release; "
                           "spec.monitoring.releaseRawStatistics)"
                           if result.raw_statistics_released else "not released"),
        "key_fingerprint": result.key_fingerprint,
    }
    if result.evaluations:
        last = result.evaluations[-1]
        report["evaluation"] = {
            "loss": last["loss"], "perplexity": last["perplexity"], "step": last["step"],
            "rows": last["rows"], "tokens": last["tokens"], "source": last["source"],
            "privacy": PRIVACY_NOTE, "history": list(result.evaluations)}
    if extra:
        report.update(extra)
    return report


def epsilon_points(result: TrainResult) -> list[tuple[int, float]]:
    """The ε plot's points: (steps charged, ε) at every step of the history, from 0.

    Each ε is the one reported for that count (the plan's curve: what the progress bar and the
    job's status show), an upper bound of the exact ε; the plan's grid is fine enough (a point
    at least every 1/8 of its steps, ``dptrain.planner.plan_curve``) that this is the curve,
    not a coarse staircase. The x axis is the ledger's count, which after restarts runs ahead
    of the model's step.
    """
    return [(0, 0.0), *((int(h["steps_charged"]), float(h["epsilon"])) for h in result.history)]


def _plot(path: pathlib.Path, xs: Sequence[float], ys: Sequence[float], *, title: str,
          ylabel: str, hline: float | None = None, step: bool = False,
          xlabel: str = "step") -> None:
    figure = Figure(figsize=(6, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if step:
        # ε after t steps is the value at t: each level reaches back to the previous count.
        axes.step(xs, ys, where="pre", color="tab:orange", label=ylabel)
    else:
        axes.plot(xs, ys, color="tab:blue", linewidth=1, label=ylabel)
    if hline is not None:
        axes.axhline(hline, color="tab:red", linestyle="--", label="budget")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path)


def write_report(result: TrainResult, output_dir: str | os.PathLike[str],
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``report.json``, ``loss.png`` and ``epsilon.png`` into ``output_dir``."""
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = report_dict(result, extra)
    steps = [h["step"] for h in result.history]
    if steps:
        _plot(out / LOSS_PLOT, steps, [h["loss"] for h in result.history],
              title="training loss: DP estimate (released under ε)",
              ylabel="DP loss estimate (nats/token)")
        points = epsilon_points(result)
        _plot(out / EPSILON_PLOT, [x for x, _ in points], [y for _, y in points],
              title=f"privacy spent (δ = {result.delta:g})", ylabel="ε", xlabel="steps charged",
              hline=result.epsilon_budget, step=True)
        report["plots"] = [str(out / LOSS_PLOT), str(out / EPSILON_PLOT)]
    if result.evaluations:
        _plot(out / EVALUATION_PLOT, [e["step"] for e in result.evaluations],
              [e["loss"] for e in result.evaluations],
              title="held-out loss (not covered by ε: not trained on)",
              ylabel="held-out loss (nats/token)")
        report.setdefault("plots", []).append(str(out / EVALUATION_PLOT))
    tmp = out / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / REPORT_FILE)
    return report
