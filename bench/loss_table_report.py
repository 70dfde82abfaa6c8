"""The shipped loss table, summarised for docs/planner.md: best held-out loss per cell, coverage,
leave-one-out by held-out σ̄ and horizon, and the loss model across model sizes.

Run: python bench/loss_table_report.py [--table CSV] [--skip-loo]
(reads the table and its provenance; trains nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections import defaultdict

import numpy as np

from dptrain.planner import TableLossModel, read_results_csv
from dptrain.planner._loss_model import leave_one_out

DEFAULT = (
    pathlib.Path(__file__).resolve().parents[1] / "operator/dptrain/planner/heldout_loss_table.csv"
)


def _pow2(r: float) -> str:
    return f"2^{round(math.log2(r))}"


def cell_table(rows: list[dict[str, float]], presets: dict[float, str]) -> str:
    """Best loss over learning rates per (model, T, B) × σ̄, markdown; and rates per cell."""
    best: dict[tuple[float, float, float], dict[float, float]] = defaultdict(dict)
    rates: dict[tuple[float, float, float, float], set[float]] = defaultdict(set)
    for r in rows:
        if r["step"] != r["horizon"] or r["noise_batch_ratio"] <= 0:
            continue
        key = (r["model_params"], r["horizon"], r["batch_size"])
        ratio = r["noise_batch_ratio"]
        best[key][ratio] = min(best[key].get(ratio, math.inf), r["loss"])
        rates[(*key, ratio)].add(r["learning_rate"])
    ratios = sorted({r for v in best.values() for r in v})
    lines = [
        "| model | T | B | " + " | ".join(_pow2(r) for r in ratios) + " |",
        "|---|---|---|" + "---|" * len(ratios),
    ]
    for (m, t, b), v in sorted(best.items()):
        cells = []
        for r in ratios:
            if r not in v:
                cells.append("")
                continue
            n = len(rates[(m, t, b, r)])
            cells.append(f"{v[r]:.3f}" + ("" if n >= 3 else "¹" if n == 1 else "²"))
        lines.append(f"| {presets.get(m, f'{m:g}')} | {t:g} | {b:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loo_table(rows: list[dict[str, float]]) -> str:
    """Leave-one-out grouped as docs/planner.md shows it."""
    cells = leave_one_out(rows)
    lines = ["| held out | cells | mean | max |", "|---|---|---|---|"]

    def add(label: str, group: list[dict[str, float]], bold: bool = False) -> None:
        if not group:
            return
        e = [abs(c["relative_error"]) for c in group]
        mean, top = f"{np.mean(e):.1%}", f"{max(e):.1%}"
        if bold:
            label, mean = f"**{label}**", f"**{mean}**"
        lines.append(f"| {label} | {len(e)} | {mean} | {top} |")

    inside = [c for c in cells if c["interpolated"]]
    for kind, column, name in (("ratio", "noise_batch_ratio", "σ̄"), ("horizon", "step", "T")):
        group = [c for c in inside if c["held_out"] == kind]
        for value in sorted({c[column] for c in group}):
            label = _pow2(value) if kind == "ratio" else f"{value:g}"
            add(
                f"{name} = {label}, at each {'horizon' if kind == 'ratio' else 'σ̄'}",
                [c for c in group if c[column] == value],
            )
        add(f"every interior {'σ̄' if kind == 'ratio' else 'horizon'}", group, bold=True)
    for m in sorted({c["model_params"] for c in inside}):
        add(f"model {m:g}", [c for c in inside if c["model_params"] == m])
    add("all", inside, bold=True)
    add(
        "not counted: no measurement on one side (extrapolated)",
        [c for c in cells if not c["interpolated"]],
    )
    return "\n".join(lines)


def model_size_check(model: TableLossModel) -> str:
    """Predictions across model sizes at a few (T, σ̄): the log-M interpolation, and whether
    the loss stays monotone in T and σ̄ at sizes between the measured ones."""
    sizes = sorted(float(x) for x in np.exp(model.log_models))
    if len(sizes) < 2:
        return "one model size"
    grid_m = np.geomspace(sizes[0], sizes[-1], 5)
    lines = [
        "| T | σ̄ | " + " | ".join(f"M = {m:.3g}" for m in grid_m) + " |",
        "|---|---|" + "---|" * len(grid_m),
    ]
    for t in (16, 64, 256, 1024, 4096):
        for r in (2.0**-12, 2.0**-5, 2.0**-3, 2.0**-1):
            got = model.predict(grid_m, np.full(5, float(t)), np.full(5, r))
            lines.append(f"| {t} | {_pow2(r)} | " + " | ".join(f"{x:.3f}" for x in got) + " |")
    ts = np.geomspace(16, 65536, 40)
    rs = np.geomspace(2.0**-16, 2.0**-1, 40)
    worst_t = worst_r = 0.0
    for m in np.geomspace(sizes[0], sizes[-1], 9):
        for r in rs:
            worst_t = max(
                worst_t, float(np.max(np.diff(model.predict(np.full(40, m), ts, np.full(40, r)))))
            )
        for t in ts:
            worst_r = max(
                worst_r, float(-np.min(np.diff(model.predict(np.full(40, m), np.full(40, t), rs))))
            )
    lines.append("")
    lines.append(
        f"largest rise with T: {worst_t:.2e}; largest fall with σ̄: {worst_r:.2e} "
        f"(9 sizes × 40 × 40 points)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--table", type=pathlib.Path, default=DEFAULT)
    parser.add_argument("--skip-loo", action="store_true")
    args = parser.parse_args()
    rows = read_results_csv(args.table)
    info = json.loads(args.table.with_suffix(".json").read_text())
    presets = {float(v): k for k, v in info["grid"]["model_params"].items()}
    runs = info["runs"]
    print(f"{len(runs)} runs, {sum(r['seconds'] for r in runs):.0f} s of run time")
    print(cell_table(rows, presets))
    model = TableLossModel.from_csv(args.table)
    print()
    print(model_size_check(model))
    if not args.skip_loo:
        print()
        print(loo_table(rows))


if __name__ == "__main__":
    main()
