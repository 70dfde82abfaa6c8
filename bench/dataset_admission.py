"""Benchmark dataset admission: compose 50 charged jobs' DP events plus a new job's plan.

Admission on a DPDataset composes (dp-accounting) the mechanisms of every job charged to the
dataset and the new job's plan. Measured side by side, in one run, on the same 50 distinct charged
mechanisms (q, σ, T drawn from a seeded RNG; N = 1e6; δ = 1e-6):

- ``admit, warm``: what the operator pays per admission in steady state (the dataset's status
  summary has composed the charged jobs' PLD; one convolution adds the new job);
- ``admit, cold``: the first admission after an operator restart (every PLD composed afresh);
- ``admit, RDP accountant``: a dataset that accounts with RDP;
- ``sum of per-job ε``: what a naive sum would say (for the tightness ratio, not a cost).

Run: python bench/dataset_admission.py [--jobs 50] [--repeats 3] [--json]. Prints medians.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

from dptrain.api import DatasetCharge, DPDatasetSpec
from dptrain.operator import _dataset_budget as budget
from dptrain.privacy._mechanism import _rdp_one_step, base_pld


def charges(jobs: int, seed: int = 0) -> list[DatasetCharge]:
    rng = random.Random(seed)
    return [DatasetCharge(job=f"job-{i}", uid=f"uid-{i}",
                          sampling_rate=rng.choice([0.001, 0.002, 0.004]) * (1 + i * 1e-3),
                          noise_multiplier=rng.uniform(1.0, 3.0),
                          reserved_steps=rng.randint(100, 2000), steps_charged=0,
                          dataset_size=1_000_000) for i in range(jobs)]


def clear() -> None:
    base_pld.cache_clear()
    _rdp_one_step.cache_clear()
    budget._PLDS.clear()


def median(fn: Callable[[], object], repeats: int, before: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        before()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50, help="charged jobs on the dataset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    charged = charges(args.jobs)
    new = DatasetCharge(job="new", uid="new", sampling_rate=0.003, noise_multiplier=1.5,
                        reserved_steps=1000, dataset_size=1_000_000)
    pld = DPDatasetSpec.model_validate({"privacy": {"epsilon": 50.0, "delta": 1e-6},
                                        "checksum": "sha256:bench"})
    rdp = DPDatasetSpec.model_validate({"privacy": {"epsilon": 50.0, "delta": 1e-6,
                                                    "accountant": "rdp"},
                                        "checksum": "sha256:bench"})

    def warm_up() -> None:
        clear()
        budget.summarize(pld, charged)  # what the dataset's status reconcile already did

    results = {
        "admit_warm_s": median(lambda: budget.admit(pld, charged, new), args.repeats, warm_up),
        "admit_cold_s": median(lambda: budget.admit(pld, charged, new), args.repeats, clear),
        "admit_rdp_s": median(lambda: budget.admit(rdp, charged, new), args.repeats, clear),
    }
    clear()
    composed = budget.admit(pld, charged, new).composed
    one_by_one = sum(budget.composed_epsilon(
        [((c.sampling_rate, c.noise_multiplier, c.dataset_size, c.physical_batch_size),
          c.reserved_steps)], 1e-6, "pld") for c in [*charged, new])
    results.update(composed_epsilon=composed, sum_of_epsilons=one_by_one,
                   sum_over_composed=one_by_one / composed, jobs=args.jobs)
    if args.json:
        print(json.dumps(results))
        return
    print(f"dataset admission with {args.jobs} charged jobs (median of {args.repeats})")
    print(f"  admit, warm (steady state)     {results['admit_warm_s']:8.3f} s")
    print(f"  admit, cold (after a restart)  {results['admit_cold_s']:8.3f} s")
    print(f"  admit, RDP accountant          {results['admit_rdp_s']:8.3f} s")
    print(f"  composed ε (PLD)               {composed:8.4f}")
    print(f"  sum of per-job ε               {one_by_one:8.4f}  "
          f"({results['sum_over_composed']:.1f}× the composition)")


if __name__ == "__main__":
    main()
