"""`dptrain sweep`: measure a loss table for the planner with the real DP-SGD step.

The sweep trains every (model preset, batch B, noise-batch ratio σ̄, learning rate) of a grid for
the same number of steps on the same data, and measures the **held-out** loss (the dataset's last
``--heldout-rows`` sequences, never sampled for training) at log-spaced steps (or every
``--log-every``), with the training loss and the step time alongside. The rows (``model_params,
noise_batch_ratio, learning_rate, step, loss`` plus ``batch_size`` and metadata columns) are the
results table :class:`dptrain.planner.TableLossModel` reads; a provenance JSON next to it records
the grid, the settings, the data and the environment (``"measured": true``). How one run trains is
the trainer's (``dptrain.trainer._sweep``), the grid and table the planner's
(``dptrain.planner._sweep_table``); no privacy is accounted or claimed (see ``PRIVACY_NOTE``),
so only public data may be swept (``--public-data`` declares an ``--input`` public; the
built-in corpus is).

Runs are ordered preset → B → learning rate → σ̄, so that one compiled step (σ is an argument)
serves all σ̄ of a (preset, B, learning rate), and every run shares the seed (initialisation,
batches and the noise direction), so that differences between σ̄ are not sampling luck. The table
is rewritten after every run, so ``--resume`` can continue an interrupted sweep, or extend its
grid (e.g. a long one on GPUs). JAX and the trainer are imported inside the handler only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import pathlib
import shlex
import time
from collections.abc import Sequence
from typing import Any

from dptrain.api import InvalidJobError
from dptrain.cli._output import EXIT_ERROR, EXIT_INVALID, emit, fail
from dptrain.planner._sweep_table import (
    LOSS_NOTE,
    TABLE_COLUMNS,
    RunKey,
    SweepRun,
    SweepSettings,
    eval_steps,
    finished_runs,
    shared_settings,
    table_rows,
    write_table,
)

DEFAULT_PRESETS = "tiny,small"
DEFAULT_RATIOS = "2^-14,2^-10,2^-6,2^-2"
DEFAULT_LEARNING_RATES = "3e-3,1e-2"
PRIVACY_NOTE = ("ε is not accounted in a sweep: runs measure loss only (σ = σ̄·B, no budget, no "
                "ledger) and claim no privacy guarantee")


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `sweep`."""
    sweep = subparsers.add_parser(
        "sweep", parents=[common], help="measure a loss table for the planner",
        description="Train a grid of model presets × noise-batch ratios σ̄ × learning rates with "
                    "the DP-SGD step (σ = σ̄·B) and write the results table the planner reads "
                    "(CSV: model_params, noise_batch_ratio, learning_rate, step, loss) plus a "
                    "provenance JSON. " + PRIVACY_NOTE + ". Defaults are those of the table "
                    "shipped with dptrain (2 CPU cores); on GPUs raise --presets, --steps and "
                    "--batch-size.")
    sweep.add_argument("--presets", default=DEFAULT_PRESETS, metavar="LIST",
                       help=f"comma-separated model presets (default {DEFAULT_PRESETS}; any of "
                            "tiny … vaultgemma-1b or scaled-L<n>)")
    sweep.add_argument("--noise-batch-ratios", default=DEFAULT_RATIOS, metavar="LIST",
                       help="comma-separated σ̄ = σ/B values, numbers or 2^k "
                            f"(default {DEFAULT_RATIOS}; 0 trains without noise, which the "
                            "planner's table model ignores)")
    sweep.add_argument("--learning-rates", default=DEFAULT_LEARNING_RATES, metavar="LIST",
                       help=f"comma-separated peak learning rates (default "
                            f"{DEFAULT_LEARNING_RATES}; the planner takes the minimum loss)")
    sweep.add_argument("--steps", default="200", metavar="LIST",
                       help="steps per run: one horizon or comma-separated horizons, each run's "
                            "schedule (warm-up, cosine decay) spanning its own horizon, so the "
                            "last point of a run is the loss a job of that many steps ends at "
                            "(default 200; e.g. 16,64,256,1024)")
    sweep.add_argument("--max-sequences", type=int, default=None, metavar="S",
                       help="skip the grid's runs with B × steps > S sequences (the corner "
                            "beyond the compute the planner plans for on this hardware)")
    sweep.add_argument("--batch-size", type=int, default=16,
                       help="expected batch B in sequences (default 16; see --batch-sizes)")
    sweep.add_argument("--batch-sizes", default=None, metavar="LIST",
                       help="comma-separated expected batches B to sweep (overrides "
                            "--batch-size; e.g. 8,64,512)")
    sweep.add_argument("--heldout-rows", type=int, default=256, metavar="H",
                       help="the dataset's last H sequences are never trained on; the table's "
                            "loss is measured on them (default 256)")
    sweep.add_argument("--eval-points", type=int, default=12, metavar="K",
                       help="measure the held-out loss at K log-spaced steps (default 12)")
    sweep.add_argument("--sequence-length", type=int, default=64,
                       help="tokens per sequence (default 64)")
    sweep.add_argument("--log-every", type=int, default=None, metavar="K",
                       help="measure every K steps instead of log-spaced (--eval-points)")
    sweep.add_argument("--physical-batch-size", type=int, default=None,
                       help="rows per step (default: B + 3 std of the Poisson batch size)")
    sweep.add_argument("--microbatch-size", type=int, default=None,
                       help="rows per accumulation microbatch per device (memory, not results)")
    sweep.add_argument("--clip-norm", type=float, default=1.0, help="clip norm C (default 1)")
    sweep.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    sweep.add_argument("--weight-decay", type=float, default=0.0)
    sweep.add_argument("--warmup-fraction", type=float, default=0.05,
                       help="warm-up steps as a fraction of --steps (default 0.05, as jobs)")
    sweep.add_argument("--seed", type=int, default=0, help="seed shared by every run")
    data = sweep.add_mutually_exclusive_group()
    data.add_argument("--builtin", choices=["stdlib-docs"], default=None,
                      help="built-in corpus (default: stdlib-docs)")
    data.add_argument("--input", type=pathlib.Path, default=None,
                      help="file or directory of documents instead of a built-in corpus "
                           "(requires --public-data)")
    sweep.add_argument("--public-data", action="store_true",
                       help="declare that --input is public: a sweep publishes its losses "
                            "without noise or accounting, so it must never see private data")
    sweep.add_argument("--format", choices=["jsonl", "text"], default="jsonl",
                       help="format of --input (default jsonl)")
    sweep.add_argument("--text-field", default="text", help="JSONL key of the text")
    sweep.add_argument("--tokenizer", choices=["byte", "sentencepiece"], default="byte")
    sweep.add_argument("--tokenizer-model", type=pathlib.Path, default=None)
    sweep.add_argument("--data-dir", type=pathlib.Path, default=None,
                       help="where the prepared dataset is kept (default: under the cache dir)")
    sweep.add_argument("--output", type=pathlib.Path, default=pathlib.Path("loss_table.csv"),
                       metavar="CSV", help="results table to write (default loss_table.csv)")
    sweep.add_argument("--provenance", type=pathlib.Path, default=None, metavar="JSON",
                       help="provenance file (default: the CSV path with .json)")
    sweep.add_argument("--resume", action="store_true",
                       help="keep the runs already in --output (same settings) and do the rest")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.set_defaults(handler=_sweep)


# ------------------------------------------------------------------------------ argument checks


def parse_number(text: str) -> float:
    """A number written as ``1e-3``, ``0.25`` or ``2^-10``."""
    text = text.strip()
    if "^" in text:
        base, _, power = text.partition("^")
        return float(float(base) ** float(power))
    return float(text)


def _list(args: argparse.Namespace, option: str, *, allow_zero: bool = False) -> list[float]:
    raw = getattr(args, option.lstrip("-").replace("-", "_"))
    try:
        values = [parse_number(v) for v in raw.split(",") if v.strip()]
    except (ValueError, TypeError, ArithmeticError):  # "abc", (-2)^0.5 (complex), 2^1e6
        fail(f"{option}: must be comma-separated numbers (or 2^k), got {raw!r}", EXIT_INVALID)
    bad = [v for v in values if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero)]
    if not values or bad:
        rule = ">= 0" if allow_zero else "> 0"
        fail(f"{option}: every value must be finite and {rule}, got {raw!r}", EXIT_INVALID)
    return sorted(set(values))


def _check_args(args: argparse.Namespace) -> tuple[list[str], list[float], list[float],
                                                  list[int], list[int]]:
    presets = list(dict.fromkeys(p.strip() for p in args.presets.split(",") if p.strip()))
    if not presets:
        fail("--presets: name at least one model preset", EXIT_INVALID)
    ratios = _list(args, "--noise-batch-ratios", allow_zero=True)
    rates = _list(args, "--learning-rates")
    if args.input is not None and not args.public_data:
        fail("--input: a sweep's results table is published un-noised, so only public data "
             "may be swept; pass --public-data to declare the input public", EXIT_INVALID)
    try:
        horizons = sorted({int(v) for v in str(args.steps).split(",") if v.strip()})
    except ValueError:
        fail(f"--steps: must be comma-separated integers, got {args.steps!r}", EXIT_INVALID)
    if not horizons or min(horizons) < 1:
        fail(f"--steps: every value must be >= 1, got {args.steps!r}", EXIT_INVALID)
    if args.max_sequences is not None and args.max_sequences < 1:
        fail(f"--max-sequences: must be >= 1, got {args.max_sequences}", EXIT_INVALID)
    batches = [args.batch_size]
    if args.batch_sizes is not None:
        try:
            batches = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
        except ValueError:
            fail(f"--batch-sizes: must be comma-separated integers, got {args.batch_sizes!r}",
                 EXIT_INVALID)
        if not batches or min(batches) < 1:
            fail(f"--batch-sizes: every value must be >= 1, got {args.batch_sizes!r}",
                 EXIT_INVALID)
    for option, value, low in (("--batch-size", args.batch_size, 1),
                               ("--sequence-length", args.sequence_length, 2),
                               ("--log-every", args.log_every or 1, 1),
                               ("--heldout-rows", args.heldout_rows, 1),
                               ("--eval-points", args.eval_points, 2)):
        if value < low:
            fail(f"{option}: must be >= {low}, got {value}", EXIT_INVALID)
    if args.log_every is not None and args.log_every > min(horizons):
        fail(f"--log-every: must be <= the shortest --steps ({min(horizons)}), got "
             f"{args.log_every}", EXIT_INVALID)
    if not 0 <= args.warmup_fraction < 1:
        fail(f"--warmup-fraction: must be in [0, 1), got {args.warmup_fraction}", EXIT_INVALID)
    if not args.clip_norm > 0:
        fail(f"--clip-norm: must be > 0, got {args.clip_norm}", EXIT_INVALID)
    for option, value in (("--physical-batch-size", args.physical_batch_size),
                          ("--microbatch-size", args.microbatch_size)):
        if value is not None and value < 1:
            fail(f"{option}: must be >= 1, got {value}", EXIT_INVALID)
    return presets, ratios, rates, batches, horizons


# -------------------------------------------------------------------------------------- sweep


def _sweep(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.input is not None and not args.public_data:
        # The loss table is computed from the input without noise and published (CSV, plots,
        # the planner's tables): on private data that is an unaccounted release.
        fail("--input: a sweep publishes training losses of its input outside any privacy "
             "guarantee (no ε is accounted); pass --public-data to declare the input public, "
             "or use --builtin", EXIT_INVALID)
    presets, ratios, rates, batches, horizons = _check_args(args)
    import jax
    from tqdm import tqdm

    from dptrain.planner import default_cache_dir
    from dptrain.trainer import (
        DataError,
        make_tokenizer,
        prepare_or_reuse,
        shape_for,
        source_from_spec,
    )
    from dptrain.trainer._sweep import SweepTrainer, environment, physical_batch_size

    progress = not args.no_progress and not args.json
    try:
        tokenizer = make_tokenizer(args.tokenizer, args.tokenizer_model)
        source = source_from_spec(path=None if args.input is None else str(args.input),
                                  builtin=None if args.input else (args.builtin or "stdlib-docs"),
                                  fmt=args.format, text_field=args.text_field)
        shapes = {p: shape_for(p, vocab_size=tokenizer.vocab_size) for p in presets}
    except InvalidJobError as error:  # an unknown preset (a ValueError too: caught first)
        fail(f"--presets: {'; '.join(error.lines)}", EXIT_INVALID)
    except (DataError, ValueError) as error:
        fail(str(error), EXIT_INVALID)
    too_long = [p for p, s in shapes.items() if s.max_seq_len < args.sequence_length]
    if too_long:
        fail(f"--sequence-length: {args.sequence_length} is longer than preset(s) "
             f"{', '.join(too_long)} allow (" + ", ".join(
                 f"{p}: {shapes[p].max_seq_len}" for p in too_long) + ")", EXIT_INVALID)
    data_dir = args.data_dir or (default_cache_dir() / "sweep-data"
                                 / f"{source.name.replace('/', '_')}-L{args.sequence_length}")
    try:
        dataset = prepare_or_reuse(source, tokenizer, sequence_length=args.sequence_length,
                                   out_dir=data_dir, progress=progress)
    except (DataError, ValueError) as error:
        fail(str(error), EXIT_INVALID)
    n = dataset.num_sequences
    if args.heldout_rows >= n:
        fail(f"--heldout-rows: must be < the dataset's {n} sequences, got {args.heldout_rows}",
             EXIT_INVALID)
    if max(batches) > n - args.heldout_rows:
        fail(f"--batch-size: must be <= the dataset's {n - args.heldout_rows} training "
             f"sequences, got {max(batches)}", EXIT_INVALID)

    longest = max(horizons)
    settings = SweepSettings(
        steps=longest, sequence_length=args.sequence_length,
        eval_steps=eval_steps(longest, points=args.eval_points, every=args.log_every),
        heldout_rows=args.heldout_rows, clip_norm=args.clip_norm, optimizer=args.optimizer,
        weight_decay=args.weight_decay, warmup_steps=round(args.warmup_fraction * longest),
        microbatch_size=args.microbatch_size, physical_batch_size=args.physical_batch_size,
        seed=args.seed)
    per_run = {h: settings.for_horizon(h, points=args.eval_points, every=args.log_every,
                                       warmup_fraction=args.warmup_fraction) for h in horizons}
    shared = shared_settings(settings, dataset, points=args.eval_points, every=args.log_every,
                             warmup_fraction=args.warmup_fraction)
    physical = {b: physical_batch_size(b, n - args.heldout_rows, devices=jax.device_count(),
                                       microbatch=args.microbatch_size,
                                       override=args.physical_batch_size) for b in batches}
    provenance_path = args.provenance or args.output.with_suffix(".json")
    # Shortest horizons first: a sweep stopped early has covered every cell at short T.
    runs = [SweepRun(p, b, r, lr, h) for h in horizons for p in presets for b in batches
            for lr in rates for r in ratios
            if args.max_sequences is None or b * h <= args.max_sequences]
    rows: list[dict[str, Any]] = []
    done: dict[RunKey, dict[str, Any]] = {}
    earlier: dict[str, Any] = {}
    if args.resume:
        try:
            rows, done, earlier = finished_runs(args.output, provenance_path, shared)
        except (OSError, ValueError, KeyError) as error:
            fail(f"--resume: {error}; use another --output", EXIT_INVALID)
    todo = [run for run in runs if run.key not in done]
    # A resumed sweep keeps every earlier run: its grid is the union of both.
    kept = [SweepRun(k[0], k[1], k[2], k[3], k[4]) for k in done if k not in
            {run.key for run in runs}]
    runs = kept + runs
    # Each batch's longest run (--max-sequences cuts the long horizons of large batches).
    longest_by_b = {b: max(run.steps for run in runs if run.batch_size == b)
                    for b in sorted({run.batch_size for run in runs})}
    for b in longest_by_b.keys() - physical.keys():
        physical[b] = physical_batch_size(b, n - args.heldout_rows, devices=jax.device_count(),
                                          microbatch=args.microbatch_size,
                                          override=args.physical_batch_size)
    physical = dict(sorted(physical.items()))
    for preset in {run.preset for run in kept} - set(shapes):
        shapes[preset] = shape_for(preset, vocab_size=tokenizer.vocab_size)
    provenance: dict[str, Any] = {
        "kind": "dptrain-sweep", "measured": True, "complete": False, "privacy": PRIVACY_NOTE,
        "command": shlex.join(["dptrain", "sweep", *_argv(args)]),
        "earlier_commands": [*earlier.get("earlier_commands", []),
                             *([earlier["command"]] if "command" in earlier else [])],
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "grid": {"presets": sorted({run.preset for run in runs}),
                 "model_params": {p: shapes[p].param_count for p in sorted(shapes)},
                 "batch_sizes": sorted({run.batch_size for run in runs}),
                 "physical_batch_sizes": physical,
                 "noise_batch_ratios": sorted({run.ratio for run in runs}),
                 "learning_rates": sorted({run.learning_rate for run in runs}),
                 "horizons": sorted({run.steps for run in runs}),
                 "max_sequences": args.max_sequences},
        "settings": shared, "loss": LOSS_NOTE,
        "dataset": {"name": source.name, "num_sequences": n,
                    "num_tokens": dataset.manifest.num_tokens,
                    "checksum": dataset.manifest.source_checksum,
                    "heldout_rows": args.heldout_rows,
                    "tokens_per_run_longest": {
                        b: t * b * (args.sequence_length - 1) for b, t in longest_by_b.items()},
                    "epochs_per_run_longest": {
                        b: t * b / (n - args.heldout_rows) for b, t in longest_by_b.items()}},
        "environment": environment(),
        "columns": list(TABLE_COLUMNS),
        "runs": [done[run.key] for run in runs if run.key in done],
    }
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), unit="run", disable=not progress,
               desc="sweep", dynamic_ncols=True)
    trainer = SweepTrainer(dataset, settings)
    try:
        for run in todo:
            bar.set_postfix_str(f"{run.preset} B={run.batch_size} σ̄={run.ratio:.3g} "
                                f"lr={run.learning_rate:g} T={run.steps}")
            record, curve = trainer.run(shapes[run.preset], run, per_run[run.steps])
            done[run.key] = record
            rows += table_rows(shapes[run.preset].param_count, run, curve, per_run[run.steps])
            provenance["runs"] = [done[r.key] for r in runs if r.key in done]
            provenance["wall_seconds"] = round(time.perf_counter() - started, 1)
            write_table(args.output, provenance_path, rows, provenance)
            bar.update(1)
    finally:
        bar.close()
    provenance["complete"] = True
    provenance["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_table(args.output, provenance_path, rows, provenance)
    return _report(args, provenance, provenance_path, rows)


def _argv(args: argparse.Namespace) -> list[str]:
    """The options that reproduce the sweep (defaults included), however it was invoked."""
    out = []
    for key, value in sorted(vars(args).items()):
        if key in {"handler", "command", "json", "no_progress", "resume"} or value in (None,
                                                                                   False):
            continue
        if value is True:
            out.append("--" + key.replace("_", "-"))
            continue
        flag = "--" + key.replace("_", "-")
        out += [flag, str(value)]
    return out


def _report(args: argparse.Namespace, provenance: dict[str, Any], json_path: pathlib.Path,
            rows: Sequence[dict[str, Any]]) -> int:
    from dptrain.planner import TableLossModel, read_results_csv
    from dptrain.planner._loss_model import leave_one_out

    runs = provenance["runs"]
    best: dict[tuple[str, int, float], float] = {}
    for r in runs:
        if r["final_loss"] is not None and not r["diverged"]:
            key = (r["preset"], r["batch_size"], r["noise_batch_ratio"])
            best[key] = min(best.get(key, math.inf), r["final_loss"])
    grid = provenance["grid"]
    cells = sorted({(r["preset"], r["batch_size"], r["noise_batch_ratio"]) for r in runs})
    missing = [c for c in cells if c not in best]
    warnings = [f"every learning rate diverged at {p}, B={b}, σ̄={s:g}: the table has a hole"
                for p, b, s in missing]
    loss_model: dict[str, Any] | None = None
    try:
        described = TableLossModel.from_csv(args.output).describe()
        loss_model = {k: described[k] for k in ("model_params", "noise_batch_ratios",
                                                  "measured_steps", "dropped", "fit")}
        every = leave_one_out(read_results_csv(args.output), source=str(args.output))
        # Cells the rest of the table brackets (all of them on a full grid); the others are
        # extrapolations past a curve's measured range (held flat by design), counted apart.
        loo = [c for c in every if c.get("interpolated", True)]
        if loo:
            errors = [abs(c["relative_error"]) for c in loo]
            horizons = any("held_out" in c for c in loo)
            loss_model["leave_one_out"] = {
                "cells": len(loo), "mean_abs_relative_error": sum(errors) / len(errors),
                "max_abs_relative_error": max(errors), "target": 0.03,
                "method": ("each interior σ̄ (at every horizon) and each interior horizon (at "
                           "every σ̄) held out in turn, the model refitted without it and "
                           "compared with the cell's final held-out loss (min over learning "
                           "rates and batches); cells the rest of the table measures on "
                           "both sides (extrapolated ones listed apart)") if horizons else
                          "each interior σ̄ held out, predicted at each model's last step",
                "cells_detail": loo,
                "extrapolated_cells": [c for c in every if not c.get("interpolated", True)]}
            if horizons:
                loss_model["leave_one_out"]["by_held_out"] = {
                    kind: {"cells": len(e), "mean_abs_relative_error": sum(e) / len(e),
                           "max_abs_relative_error": max(e)}
                    for kind in ("ratio", "horizon")
                    if (e := [abs(c["relative_error"]) for c in loo if c["held_out"] == kind])}
    except ValueError as error:
        warnings.append(f"the planner cannot use this table: {error}")
    result = {"output": str(args.output), "provenance": str(json_path), "rows": len(rows),
              "runs": len(runs), "diverged": sum(bool(r["diverged"]) for r in runs),
              "wall_seconds": provenance["wall_seconds"], "privacy": PRIVACY_NOTE,
              "final_losses": [{"preset": p, "model_params": grid["model_params"][p],
                                "batch_size": b, "noise_batch_ratio": s,
                                "heldout_loss": best.get((p, b, s))} for p, b, s in cells],
              "loss_model": loss_model, "warnings": warnings}
    emit(args, result, _human)
    return EXIT_ERROR if missing else 0


def _human(r: dict[str, Any]) -> str:
    lines = [f"Measured {r['runs']} runs in {r['wall_seconds']:.0f} s: {r['rows']} rows → "
             f"{r['output']} (provenance {r['provenance']})",
             f"note: {r['privacy']}", "",
             "Final held-out loss (min over learning rates):",
             f"  {'preset':<16}{'params':>10}{'B':>7}{'σ̄':>12}{'loss':>10}"]
    for f in r["final_losses"]:
        loss = "diverged" if f["heldout_loss"] is None else f"{f['heldout_loss']:.4f}"
        lines.append(f"  {f['preset']:<16}{f['model_params']:>10.3g}{f['batch_size']:>7}"
                     f"{f['noise_batch_ratio']:>12.3g}{loss:>10}")
    loo = (r.get("loss_model") or {}).get("leave_one_out")
    if loo:
        lines.append(f"leave-one-out over {loo['cells']} held-out cells: mean |error| "
                     f"{loo['mean_abs_relative_error']:.1%}, "
                     f"max {loo['max_abs_relative_error']:.1%} (target {loo['target']:.0%})")
        for kind, e in (loo.get("by_held_out") or {}).items():
            lines.append(f"  held-out {kind}s: {e['cells']} cells, mean |error| "
                         f"{e['mean_abs_relative_error']:.1%}, "
                         f"max {e['max_abs_relative_error']:.1%}")
        if extra := loo.get("extrapolated_cells"):
            errors = [abs(c["relative_error"]) for c in extra]
            lines.append(f"  not counted: {len(extra)} cells with no measurement on one side "
                         f"(extrapolated; mean |error| {sum(errors) / len(errors):.1%}, "
                         f"max {max(errors):.1%})")
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)
