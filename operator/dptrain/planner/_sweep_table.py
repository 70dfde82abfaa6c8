"""The results table: what ``dptrain sweep`` measures and writes, and the planner reads.

A sweep trains one run per grid point (:class:`SweepRun`; the training harness is the
trainer's, ``dptrain.trainer._sweep``) under shared :class:`SweepSettings`, and writes the
results table the planner's loss model reads (``read_results_csv``: :data:`TABLE_COLUMNS`) with
its provenance, atomically; a resumed sweep keeps the runs it already finished
(:func:`finished_runs`). Pure Python: the CLI imports this without JAX.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

REQUIRED_COLUMNS = ("model_params", "noise_batch_ratio", "learning_rate", "step", "loss")
OPTIONAL_COLUMNS = ("batch_size", "horizon")
"""Read when present: curves of several batches at one (M, σ̄) are folded like learning rates
(the minimum is taken), since the paper's law has no B of its own (B enters through σ̄ and the
compute); a table without the column is one batch per curve. ``horizon`` is the length of the
run's schedule (its ``--steps``): a row with ``step == horizon`` is the loss a job of that many
steps ends at (warm-up and cosine decay completed), which is what the planner predicts."""
TABLE_COLUMNS = ("model_params", "noise_batch_ratio", "learning_rate", "step", "loss", "preset",
                 "noise_multiplier", "batch_size", "sequence_length", "seed", "train_loss",
                 "horizon")
LOSS_NOTE = ("held-out loss: the mean next-token cross-entropy (nats/token) of the model after "
             "`step` updates on the dataset's last `heldout_rows` sequences, which no run samples "
             "for training; train_loss: the mean over the Poisson-sampled sequences of the steps "
             "since the previous logged step, each computed before its step's update")
SCHEDULE_NOTE = "linear warm-up, cosine decay to 10% of the peak over --steps (as jobs)"


RunKey = tuple[str, int, float, float, int]


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One grid point."""

    preset: str
    batch_size: int
    ratio: float
    learning_rate: float
    steps: int
    """The run's horizon: the length of its schedule (warm-up, cosine decay)."""

    @property
    def key(self) -> RunKey:
        """(preset, B, σ̄, learning rate, horizon)."""
        return (self.preset, self.batch_size, self.ratio, self.learning_rate, self.steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepSettings:
    """What every run of a sweep shares (a resumed sweep must match it exactly)."""

    steps: int
    sequence_length: int
    eval_steps: tuple[int, ...]
    heldout_rows: int
    clip_norm: float
    optimizer: str
    weight_decay: float
    warmup_steps: int
    microbatch_size: int | None
    physical_batch_size: int | None
    seed: int

    def to_dict(self, dataset: Any) -> dict[str, Any]:
        """JSON form, with the data it was measured on."""
        out = dataclasses.asdict(self)
        out["eval_steps"] = list(self.eval_steps)
        return {**out, "schedule": SCHEDULE_NOTE,
                "dataset_checksum": dataset.manifest.source_checksum,
                "tokenizer": dataset.manifest.tokenizer}

    def for_horizon(self, steps: int, *, points: int, every: int | None,
                    warmup_fraction: float) -> SweepSettings:
        """The settings of one run of ``steps`` steps (its schedule and evaluations)."""
        return dataclasses.replace(self, steps=steps,
                                   eval_steps=eval_steps(steps, points=points, every=every),
                                   warmup_steps=round(warmup_fraction * steps))


def shared_settings(settings: SweepSettings, dataset: Any, *, points: int, every: int | None,
                    warmup_fraction: float) -> dict[str, Any]:
    """What every run of a multi-horizon sweep shares (a resumed sweep must match it exactly).

    The horizons themselves are part of the grid, not of the settings: a resumed sweep may add
    horizons (or batches, ratios, learning rates, presets) and keeps the runs already measured.
    """
    out = settings.to_dict(dataset)
    for key in ("steps", "eval_steps", "warmup_steps"):
        out.pop(key)
    return {**out, "eval_points": points, "log_every": every, "warmup_fraction": warmup_fraction}


def eval_steps(steps: int, *, points: int, every: int | None) -> tuple[int, ...]:
    """Steps at which the held-out loss is measured (always including the last).

    Every ``every`` steps, or ``points`` log-spaced ones.
    """
    if every is not None:
        grid = set(range(every, steps + 1, every))
    else:
        grid = {max(1, round(steps ** (k / max(1, points - 1)))) for k in range(points)}
    return tuple(sorted(grid | {steps}))


@dataclasses.dataclass(frozen=True)
class Measured:
    """One logged point of a run: held-out loss, training loss and time so far."""

    step: int
    heldout_loss: float
    train_loss: float
    seconds: float


def table_rows(params: int, run: SweepRun, curve: Iterable[Measured],
               settings: SweepSettings) -> list[dict[str, Any]]:
    """The CSV rows of one run (``loss`` is the held-out loss)."""
    return [{"model_params": params, "noise_batch_ratio": repr(run.ratio),
             "learning_rate": repr(run.learning_rate), "step": m.step,
             "loss": f"{m.heldout_loss:.6f}", "preset": run.preset,
             "noise_multiplier": f"{run.ratio * run.batch_size:.6g}",
             "batch_size": run.batch_size, "sequence_length": settings.sequence_length,
             "seed": settings.seed, "train_loss": f"{m.train_loss:.6f}",
             "horizon": run.steps} for m in curve]


def write_table(csv_path: pathlib.Path, json_path: pathlib.Path,
                rows: Sequence[dict[str, Any]], provenance: dict[str, Any]) -> None:
    """Rewrite the table and its provenance atomically (a reader never sees half a file)."""
    for path in (csv_path, json_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)


def finished_runs(csv_path: pathlib.Path, json_path: pathlib.Path, settings: dict[str, Any]
                  ) -> tuple[list[dict[str, Any]], dict[RunKey, dict[str, Any]], dict[str, Any]]:
    """Rows and records of an earlier sweep's runs, and its provenance.

    Every earlier run is kept (a resumed sweep extends the grid, it never drops measurements);
    a run counts as finished when it has rows or diverged.

    Raises:
        ValueError: the earlier sweep is unreadable or was measured with other settings.
    """
    if not csv_path.is_file() or not json_path.is_file():
        return [], {}, {}
    old = json.loads(json_path.read_text(encoding="utf-8"))
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if old.get("settings") != settings:
        changed = sorted(k for k in settings if old.get("settings", {}).get(k) != settings[k])
        raise ValueError(f"{csv_path} was measured with other settings ({', '.join(changed)})")

    def key(r: dict[str, Any]) -> RunKey:
        return (r["preset"], int(r["batch_size"]), float(r["noise_batch_ratio"]),
                float(r["learning_rate"]), int(r["horizon"]))

    with_rows = {key(r) for r in rows}
    done = {key(r): r for r in old.get("runs", [])
            if key(r) in with_rows or r.get("diverged")}
    return [r for r in rows if key(r) in done], done, old


def read_results_csv(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Rows of a results table; extra columns (metadata) are ignored.

    Raises:
        ValueError: naming the file, row and column of a missing or bad value.
    """
    rows: list[dict[str, float]] = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(row for row in handle if not row.startswith("#"))
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; a results "
                             f"table needs {', '.join(REQUIRED_COLUMNS)}")
        for line, raw in enumerate(reader, start=2):
            row: dict[str, float] = {}
            for column in REQUIRED_COLUMNS:
                try:
                    value = float(raw[column])
                except (TypeError, ValueError):
                    raise ValueError(f"{path}:{line}: column {column} must be a number, got "
                                     f"{raw[column]!r}") from None
                if not math.isfinite(value) or value < 0:
                    raise ValueError(f"{path}:{line}: column {column} must be finite and >= 0, "
                                     f"got {raw[column]!r}")
                row[column] = value
            for column in OPTIONAL_COLUMNS:
                if raw.get(column) not in (None, ""):
                    try:
                        row[column] = float(raw[column])
                    except ValueError:
                        raise ValueError(f"{path}:{line}: column {column} must be a number, got "
                                         f"{raw[column]!r}") from None
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: the results table has no rows")
    return rows
