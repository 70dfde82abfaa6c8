"""CPU step time of the DP-SGD step by batch, measured beside the planner's step-time model.

Trains the ``tiny`` preset (S = 64) for a few dozen steps at each batch and prints the median
seconds per step after compilation, the model's prediction (``STEP_TIME_MODELS["cpu"]``), their
ratio, throughput, and whether the model calls the batch collapsed. Refit the constants in
``dptrain/planner/_step_time.py`` from these figures when the machine changes.

Run: python bench/step_time.py [--batches 2,8,32,128,512] [--steps 40] [--cores 2]
"""

from __future__ import annotations

import argparse

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


if __name__ == "__main__":
    main()
