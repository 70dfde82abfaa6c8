"""Planner timings: σ-table build (cold), one plan cold (empty cache), one plan warm.

Run: python bench/planner.py [--repeats 3]. Prints medians in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from dptrain.api import DPTrainingJobSpec
from dptrain.planner import SigmaTable, make_plan

SPEC = {"privacy": {"epsilon": 4.0, "delta": 1e-7},
        "data": {"builtin": "stdlib-docs", "sequenceLength": 512},
        "compute": {"flops": 1e18, "accelerator": "nvidia-h100-80gb"}}
N = 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = DPTrainingJobSpec.model_validate(SPEC)
    table_s, cold_s, warm_s = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            table = SigmaTable(spec.privacy.delta, cache_dir=cache)
            table.surface(spec.privacy.epsilon, 1.0 / N, 1.0)
            table_s.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            plan = make_plan(spec, dataset_size=N, cache_dir=cache)
            cold_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            make_plan(spec, dataset_size=N, cache_dir=cache)
            warm_s.append(time.perf_counter() - start)
    loss = "n/a" if plan.predicted_loss is None else f"{plan.predicted_loss:.4f}"
    print(f"plan: {plan.model_shape.name}, B={plan.batch_size}, T={plan.iterations}, "
          f"σ={plan.noise_multiplier:.4g}, loss={loss} (rests on: {plan.loss_source})")
    print(f"sigma_table_build_s median {statistics.median(table_s):.2f} "
          f"({len(table.slice_indices(1.0 / N, 1.0))} q-slices)")
    print(f"plan_cold_s median {statistics.median(cold_s):.2f}")
    print(f"plan_warm_s median {statistics.median(warm_s):.3f}")


if __name__ == "__main__":
    main()
