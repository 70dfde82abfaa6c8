"""Issue 16's table, re-measured: the planner's pick vs plain alternatives at equal compute and ε.

Plans the issue's job (built-in corpus, N = 14,086 rows of 64 tokens, ε = 8, δ = 1e-6, 1e12 FLOPs),
then trains the pick and the issue's alternatives (tiny, B = 64 / T = 512 and B = 512 / T = 64, σ
calibrated for ε = 8 at their (q, T)) with the DP-SGD step, and prints each one's held-out loss
(the last 256 rows, never trained on), wall time and throughput.

Run: python bench/planner_pick.py [--skip-old-pick] [--skip-new-pick] [--skip-alternatives]
[--pick-model-alternative] [--plan-only].
The old pick (B = 2, T = 16,384) takes the longest; it is included unless skipped.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from dptrain.api import DPTrainingJobSpec
from dptrain.planner import default_cache_dir, make_plan
from dptrain.planner._sweep_table import SweepSettings, eval_steps
from dptrain.privacy import calibrate_noise_multiplier
from dptrain.trainer import make_tokenizer, prepare_or_reuse, shape_for, source_from_spec
from dptrain.trainer._sweep import train_and_evaluate

ROWS = 14086  # the built-in corpus (stdlib-docs) in 64-token sequences
SPEC = {"privacy": {"epsilon": 8.0, "delta": 1e-6},
        "data": {"builtin": "stdlib-docs", "sequenceLength": 64, "numSequences": ROWS},
        "compute": {"flops": 1e12}}
HELDOUT = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-old-pick", action="store_true")
    parser.add_argument("--skip-new-pick", action="store_true",
                        help="train the alternatives only (they do not depend on the table)")
    parser.add_argument("--skip-alternatives", action="store_true")
    parser.add_argument("--pick-model-alternative", action="store_true",
                        help="also train the pick's own model and learning rate at B = 64 / "
                             "T = 512 (the issue's best alternative, with the pick's model)")
    parser.add_argument("--plan-only", action="store_true",
                        help="time the plan (cold, then 3 warm: median) and train nothing")
    args = parser.parse_args()
    spec = DPTrainingJobSpec.model_validate(SPEC)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        plan = make_plan(spec, dataset_size=ROWS, cache_dir=cache)
        print(f"plan in {time.perf_counter() - start:.1f} s: {plan.model_shape.name}, "
              f"B={plan.batch_size}, T={plan.iterations}, σ={plan.noise_multiplier:.4g}, "
              f"predicted {plan.predicted_loss:.4f}, est. wall {plan.pod.est_wall_seconds:.0f} s")
        if args.plan_only:
            warm = []
            for _ in range(3):
                start = time.perf_counter()
                make_plan(spec, dataset_size=ROWS, cache_dir=cache)
                warm.append(time.perf_counter() - start)
            print(f"warm plan median {sorted(warm)[1]:.3f} s")
            return
    tokenizer = make_tokenizer("byte")
    source = source_from_spec(path=None, builtin="stdlib-docs", fmt="jsonl", text_field="text")
    dataset = prepare_or_reuse(source, tokenizer, sequence_length=64, progress=False,
                               out_dir=default_cache_dir() / "sweep-data" / "stdlib-docs-L64")
    n = dataset.num_sequences - HELDOUT
    configs = [] if args.skip_new_pick else [
        ("new pick", plan.model_shape.name, plan.batch_size, plan.iterations,
         plan.noise_multiplier, plan.learning_rate)]
    if not args.skip_old_pick:
        configs.append(("old pick", "tiny", 2, 16384, None, 1e-2))
    if not args.skip_alternatives:
        configs += [("alternative", "tiny", 64, 512, None, 1e-2),
                    ("alternative", "tiny", 512, 64, None, 1e-2)]
    if args.pick_model_alternative:
        configs.append(("alt., pick's model", plan.model_shape.name, 64, 512, None,
                        plan.learning_rate))
    print(f"{'configuration':<19}{'model':<11}{'B':>6}{'T':>7}{'σ':>8}{'held-out':>10}"
          f"{'train':>8}{'wall s':>8}{'tok/s':>9}")
    for label, preset, b, t, sigma, lr in configs:
        if sigma is None:
            sigma = calibrate_noise_multiplier(epsilon=8.0, delta=1e-6, sampling_rate=b / ROWS,
                                               steps=t, accountant="pld", dataset_size=ROWS,
                                               physical_batch_size=ROWS)
        shape = shape_for(preset, vocab_size=tokenizer.vocab_size)
        settings = SweepSettings(steps=t, sequence_length=64,
                                 eval_steps=eval_steps(t, points=4, every=None),
                                 heldout_rows=HELDOUT, clip_norm=1.0, optimizer="adamw",
                                 weight_decay=0.0, warmup_steps=round(0.05 * t),
                                 microbatch_size=None, physical_batch_size=None, seed=0)
        curve, diverged, _ = train_and_evaluate(dataset, shape, batch_size=b, steps=t,
                                                sigma=sigma, learning_rate=lr,
                                                settings=settings, train_rows=n)
        last = curve[-1]
        print(f"{label:<19}{preset:<11}{b:>6}{t:>7}{sigma:>8.3f}"
              f"{'diverged' if diverged else f'{last.heldout_loss:.3f}':>10}"
              f"{last.train_loss:>8.3f}{last.seconds:>8.0f}{b * t * 64 / last.seconds:>9.0f}",
              flush=True)


if __name__ == "__main__":
    main()
