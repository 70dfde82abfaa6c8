"""CPU step time of the DP-SGD step by batch, measured beside the planner's step-time model.

Trains the ``tiny`` preset (S = 64) for a few dozen steps at each batch and prints the median
seconds per step after compilation, the model's prediction (``STEP_TIME_MODELS["cpu"]``), their
ratio, throughput, and whether the model calls the batch collapsed; then the constants
(overhead, peak utilisation, half-utilisation tokens) that fit these measurements best, by least
squares on log seconds. Refit the constants in ``dptrain/planner/_step_time.py`` from them when
the machine or the DP step changes.

Run: python bench/step_time.py [--batches 2,8,32,128,512] [--steps 40] [--cores 2]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy.optimize import least_squares

from dptrain.planner import ACCELERATORS, default_cache_dir, step_time_model
from dptrain.planner._sweep_table import SweepSettings, eval_steps
from dptrain.trainer import make_tokenizer, prepare_or_reuse, shape_for, source_from_spec
from dptrain.trainer._sweep import train_and_evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", default="2,8,32,128,512")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cores", type=int, default=2, help="cores the process may use")
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    tokenizer = make_tokenizer("byte")
    source = source_from_spec(path=None, builtin="stdlib-docs", fmt="jsonl", text_field="text")
    dataset = prepare_or_reuse(source, tokenizer, sequence_length=64, progress=False,
                               out_dir=default_cache_dir() / "sweep-data" / "stdlib-docs-L64")
    shape = shape_for(args.preset, vocab_size=tokenizer.vocab_size)
    model = step_time_model("cpu")
    peak = ACCELERATORS["cpu"].peak_flops
    measured: list[tuple[float, float, float]] = []  # (flops, tokens, seconds)
    print(f"{'B':>6}{'measured s':>12}{'model s':>10}{'ratio':>8}{'tok/s':>9}{'collapsed':>11}")
    for batch in (int(b) for b in args.batches.split(",")):
        settings = SweepSettings(steps=args.steps, sequence_length=64,
                                 eval_steps=eval_steps(args.steps, points=2, every=None),
                                 heldout_rows=64, clip_norm=1.0, optimizer="adamw",
                                 weight_decay=0.0, warmup_steps=0, microbatch_size=None,
                                 physical_batch_size=batch, seed=0)
        _, _, seconds = train_and_evaluate(dataset, shape, batch_size=batch, steps=args.steps,
                                           sigma=0.5, learning_rate=1e-3, settings=settings)
        flops = shape.train_flops_per_token(64) * batch * 64
        predicted = float(model.step_seconds(flops, batch * 64.0, devices=args.cores,
                                             peak_flops_per_device=peak,
                                             peak_utilization=model.peak_utilization or 0.1))
        print(f"{batch:>6}{seconds:>12.4f}{predicted:>10.4f}{predicted / seconds:>8.2f}"
              f"{batch * 64 / seconds:>9.0f}{bool(model.collapsed(batch * 64.0))!s:>11}",
              flush=True)
        measured.append((flops, batch * 64.0, seconds))
    if len(measured) >= 3:
        _print_fit(np.array(measured), devices=args.cores, peak=peak)


def _print_fit(measured: np.ndarray, *, devices: int, peak: float) -> None:
    """Least-squares fit of (overhead, peak utilisation, half tokens) to the measured steps."""
    flops, tokens, seconds = measured.T

    def residuals(logs: np.ndarray) -> np.ndarray:
        overhead, util, half = np.exp(logs)
        predicted = overhead + flops * (tokens + half) / (devices * peak * util * tokens)
        return np.log(predicted) - np.log(seconds)

    fit = least_squares(residuals, x0=np.log([1e-3, 0.1, 300.0]))
    overhead, util, half = np.exp(fit.x)
    worst = float(np.max(np.abs(np.expm1(fit.fun))))
    print(f"fit: overhead_seconds={overhead:.3g} peak_utilization={util:.3g} "
          f"half_tokens={half:.3g} (worst error {100 * worst:.0f} %; "
          f"{'converged' if fit.success else 'not converged'}; "
          f"collapsed below {math.ceil(half)} tokens per device)")


if __name__ == "__main__":
    main()
