"""`dptrain sweep`: measure a loss table for the planner with the real DP-SGD step.

The sweep trains every (model preset, noise-batch ratio σ̄, learning rate) of a grid for the same
number of steps on the same data and logs the training loss every ``--log-every`` steps. The rows
(``model_params, noise_batch_ratio, learning_rate, step, loss`` plus metadata columns) are the
results table :class:`dptrain.planner.TableLossModel` reads; a provenance JSON next to it records
the grid, the settings, the data and the environment (``"measured": true``). How one run trains is
in ``_sweep_runs``; no privacy is accounted or claimed (see ``PRIVACY_NOTE``).

Runs are ordered preset → learning rate → σ̄, so that one compiled step (σ is an argument) serves
all σ̄ of a (preset, learning rate), and every run shares the seed (initialisation, batches and the
noise direction), so that differences between σ̄ are not sampling luck. The table is rewritten
after every run, so ``--resume`` can continue an interrupted sweep, or extend its grid (e.g. a long
one on GPUs). JAX and the trainer are imported inside the handler only.
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
from dptrain.cli._sweep_runs import (
    LOSS_NOTE,
    TABLE_COLUMNS,
    SweepRun,
    SweepSettings,
    SweepTrainer,
    environment,
    finished_runs,
    physical_batch_size,
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
    sweep.add_argument("--steps", type=int, default=200, help="steps per run (default 200)")
    sweep.add_argument("--batch-size", type=int, default=16,
                       help="expected batch B in sequences (default 16)")
    sweep.add_argument("--sequence-length", type=int, default=64,
                       help="tokens per sequence (default 64)")
    sweep.add_argument("--log-every", type=int, default=10, metavar="K",
                       help="log the mean loss of every K steps (default 10)")
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


def _check_args(args: argparse.Namespace) -> tuple[list[str], list[float], list[float]]:
    presets = list(dict.fromkeys(p.strip() for p in args.presets.split(",") if p.strip()))
    if not presets:
        fail("--presets: name at least one model preset", EXIT_INVALID)
    ratios = _list(args, "--noise-batch-ratios", allow_zero=True)
    rates = _list(args, "--learning-rates")
    for option, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                               ("--sequence-length", args.sequence_length, 2),
                               ("--log-every", args.log_every, 1)):
        if value < low:
            fail(f"{option}: must be >= {low}, got {value}", EXIT_INVALID)
    if args.log_every > args.steps:
        fail(f"--log-every: must be <= --steps ({args.steps}), got {args.log_every}",
             EXIT_INVALID)
    if not 0 <= args.warmup_fraction < 1:
        fail(f"--warmup-fraction: must be in [0, 1), got {args.warmup_fraction}", EXIT_INVALID)
    if not args.clip_norm > 0:
        fail(f"--clip-norm: must be > 0, got {args.clip_norm}", EXIT_INVALID)
    for option, value in (("--physical-batch-size", args.physical_batch_size),
                          ("--microbatch-size", args.microbatch_size)):
        if value is not None and value < 1:
            fail(f"{option}: must be >= 1, got {value}", EXIT_INVALID)
    return presets, ratios, rates


# -------------------------------------------------------------------------------------- sweep


def _sweep(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.input is not None and not args.public_data:
        # The loss table is computed from the input without noise and published (CSV, plots,
        # the planner's tables): on private data that is an unaccounted release.
        fail("--input: a sweep publishes training losses of its input outside any privacy "
             "guarantee (no ε is accounted); pass --public-data to declare the input public, "
             "or use --builtin", EXIT_INVALID)
    presets, ratios, rates = _check_args(args)
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
    if args.batch_size > n:
        fail(f"--batch-size: must be <= the dataset's {n} sequences, got {args.batch_size}",
             EXIT_INVALID)

    settings = SweepSettings(
        steps=args.steps, batch_size=args.batch_size, sequence_length=args.sequence_length,
        physical_batch_size=physical_batch_size(
            args.batch_size, n, devices=jax.device_count(), microbatch=args.microbatch_size,
            override=args.physical_batch_size),
        log_every=args.log_every, clip_norm=args.clip_norm, optimizer=args.optimizer,
        weight_decay=args.weight_decay, warmup_steps=round(args.warmup_fraction * args.steps),
        microbatch_size=args.microbatch_size, seed=args.seed)
    provenance_path = args.provenance or args.output.with_suffix(".json")
    runs = [SweepRun(p, r, lr) for p in presets for lr in rates for r in ratios]
    rows: list[dict[str, Any]] = []
    done: dict[tuple[str, float, float], dict[str, Any]] = {}
    if args.resume:
        try:
            rows, done = finished_runs(args.output, provenance_path,
                                       settings.to_dict(dataset), runs)
        except (OSError, ValueError, KeyError) as error:
            fail(f"--resume: {error}; use another --output", EXIT_INVALID)
    todo = [run for run in runs if run.key not in done]
    provenance: dict[str, Any] = {
        "kind": "dptrain-sweep", "measured": True, "complete": False, "privacy": PRIVACY_NOTE,
        "command": shlex.join(["dptrain", "sweep", *_argv(args)]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "grid": {"presets": presets,
                 "model_params": {p: shapes[p].param_count for p in presets},
                 "noise_batch_ratios": ratios, "learning_rates": rates},
        "settings": settings.to_dict(dataset), "loss": LOSS_NOTE,
        "dataset": {"name": source.name, "num_sequences": n,
                    "num_tokens": dataset.manifest.num_tokens,
                    "checksum": dataset.manifest.source_checksum,
                    "tokens_per_run": args.steps * args.batch_size * (args.sequence_length - 1),
                    "epochs_per_run": args.steps * args.batch_size / n},
        "environment": environment(),
        "columns": list(TABLE_COLUMNS),
        "runs": [done[run.key] for run in runs if run.key in done],
    }
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), unit="run", disable=not progress,
               desc="sweep", dynamic_ncols=True)
    trainer = SweepTrainer(dataset, settings)
    try:
        for run in todo:
            bar.set_postfix_str(f"{run.preset} σ̄={run.ratio:.3g} lr={run.learning_rate:g}")
            record, curve = trainer.run(shapes[run.preset], run)
            done[run.key] = record
            rows += table_rows(shapes[run.preset].param_count, run, curve, settings)
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
        if key in {"handler", "command", "json", "no_progress", "resume"} or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        out += [flag, str(value)]
    return out


def _report(args: argparse.Namespace, provenance: dict[str, Any], json_path: pathlib.Path,
            rows: Sequence[dict[str, Any]]) -> int:
    from dptrain.planner import TableLossModel

    runs = provenance["runs"]
    best: dict[tuple[str, float], float] = {}
    for r in runs:
        if r["final_loss"] is not None and not r["diverged"]:
            key = (r["preset"], r["noise_batch_ratio"])
            best[key] = min(best.get(key, math.inf), r["final_loss"])
    grid = provenance["grid"]
    missing = [(p, s) for p in grid["presets"] for s in grid["noise_batch_ratios"]
               if (p, s) not in best]
    warnings = [f"every learning rate diverged at {p}, σ̄={s:g}: the table has a hole"
                for p, s in missing]
    loss_model: dict[str, Any] | None = None
    try:
        described = TableLossModel.from_csv(args.output).describe()
        loss_model = {k: described[k] for k in ("model_params", "noise_batch_ratios",
                                                  "measured_steps", "dropped")}
    except ValueError as error:
        warnings.append(f"the planner cannot use this table: {error}")
    result = {"output": str(args.output), "provenance": str(json_path), "rows": len(rows),
              "runs": len(runs), "diverged": sum(bool(r["diverged"]) for r in runs),
              "wall_seconds": provenance["wall_seconds"], "privacy": PRIVACY_NOTE,
              "final_losses": [{"preset": p, "model_params": grid["model_params"][p],
                                "noise_batch_ratio": s, "loss": best.get((p, s))}
                               for p in grid["presets"] for s in grid["noise_batch_ratios"]],
              "loss_model": loss_model, "warnings": warnings}
    emit(args, result, _human)
    return EXIT_ERROR if missing else 0


def _human(r: dict[str, Any]) -> str:
    lines = [f"Measured {r['runs']} runs in {r['wall_seconds']:.0f} s: {r['rows']} rows → "
             f"{r['output']} (provenance {r['provenance']})",
             f"note: {r['privacy']}", "",
             "Final loss (min over learning rates):",
             f"  {'preset':<16}{'params':>10}{'σ̄':>12}{'loss':>10}"]
    for f in r["final_losses"]:
        loss = "diverged" if f["loss"] is None else f"{f['loss']:.4f}"
        lines.append(f"  {f['preset']:<16}{f['model_params']:>10.3g}"
                     f"{f['noise_batch_ratio']:>12.3g}{loss:>10}")
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)
