"""Benchmark dataset admission: compose 50 charged jobs' DP events plus a new job's plan.

Admission on a DPDataset composes (dp-accounting) the mechanisms of every job charged to the
dataset and the new job's plan. Measured side by side, in one run, on the same 50 distinct charged
mechanisms (q, σ, T drawn from a seeded RNG; N = 1e6; δ = 1e-6; PLD accountant). "Cold" is the
first admission after an operator restart: every cache (one-step RDP vectors, one-step PLDs,
composed PLDs) is emptied before each repeat, as in a fresh process.

- ``admit, cold, room left``: the dataset's budget (4.0) is well above the composition: the RDP
  bound already fits, so no PLD is built (the common case);
- ``admit, cold, near the boundary``: the budget lies between the PLD and RDP compositions: only
  the tighter PLD admits the job, so every job's PLD is built and composed (no disk cache);
- ``admit, restart, near the boundary``: the same after an operator restart with ``--cache-dir``:
  memory caches empty, the charged jobs' PLDs (stored when they were admitted) read from disk;
- ``admit, cold, refused``: the budget is below both: composed from scratch, refused;
- ``PLD composition from scratch``: what every cold admission cost before the tiered checks
  (the committed charges' PLD, then the new job's composed onto it) — the baseline of the ratio;
- ``admit, warm``: steady state near the boundary (the dataset's status summary has composed the
  charged jobs' PLD; one convolution adds the new job);
- ``admit, RDP accountant``: a dataset that accounts with RDP (cold);
- ``sum of per-job ε``: what a naive sum would say (for the tightness ratio, not a cost).

Run: python bench/dataset_admission.py [--jobs 50] [--repeats 5] [--json]. Prints medians of wall
and CPU seconds (on a shared machine others' load inflates the wall time, hardly the CPU time).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

from dptrain.api import DatasetCharge, DPDatasetSpec
from dptrain.operator import _dataset_budget as budget
from dptrain.privacy._mechanism import _rdp_one_step, base_pld

DELTA = 1e-6


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
    budget._quick_rdp_one_step.cache_clear()


def median(fn: Callable[[], object], repeats: int,
           before: Callable[[], None]) -> tuple[float, float]:
    """Median wall-clock and median CPU seconds of ``fn`` (CPU time barely moves with others'
    load on a shared machine; wall time does)."""
    walls, cpus = [], []
    for _ in range(repeats):
        before()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(walls), statistics.median(cpus)


def spec_of(epsilon: float, accountant: str = "pld") -> DPDatasetSpec:
    return DPDatasetSpec.model_validate({"privacy": {"epsilon": epsilon, "delta": DELTA,
                                                     "accountant": accountant},
                                         "checksum": "sha256:bench"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50, help="charged jobs on the dataset")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    charged = charges(args.jobs)
    new = DatasetCharge(job="new", uid="new", sampling_rate=0.003, noise_multiplier=1.5,
                        reserved_steps=1000, dataset_size=1_000_000)
    events = budget._events([*((budget._group_of(c), c.reserved_steps) for c in charged),
                             (budget._group_of(new), new.reserved_steps)])
    others = budget._events((budget._group_of(c), c.reserved_steps) for c in charged)
    clear()
    pld_eps = budget.composed_epsilon(events, DELTA, "pld")
    rdp_eps = budget.composed_epsilon(events, DELTA, "rdp")
    assert pld_eps < rdp_eps, (pld_eps, rdp_eps)
    room, near, full = spec_of(4.0), spec_of((pld_eps + rdp_eps) / 2), spec_of(0.95 * pld_eps)
    disk = tempfile.mkdtemp(prefix="dataset-admission-bench-")

    def restart() -> None:  # a fresh process whose --cache-dir holds the charged jobs' PLDs
        clear()
        budget.persist_under(disk)
        if not any(pathlib.Path(disk).rglob("*.npz")):
            budget.admit(near, charged, new)
            clear()

    def no_disk() -> None:
        clear()
        budget.persist_under(None)
    rdp = spec_of(4.0, "rdp")

    def from_scratch() -> None:  # the cold admission before the tiered checks
        budget._composed(others, DELTA, "pld")
        budget._composed(events, DELTA, "pld", base=others)

    def warm_up() -> None:
        clear()
        budget.summarize(near, charged)  # what the dataset's status reconcile already did

    def admit(dataset: DPDatasetSpec, fits: bool) -> Callable[[], None]:
        def run() -> None:
            assert budget.admit(dataset, charged, new).fits is fits
        return run

    cases = {
        "admit_cold_room": (admit(room, True), clear),
        "admit_cold_near": (admit(near, True), no_disk),
        "admit_restart_near": (admit(near, True), restart),
        "admit_cold_refused": (admit(full, False), clear),
        "pld_from_scratch": (from_scratch, clear),
        "admit_warm_near": (admit(near, True), warm_up),
        "admit_cold_rdp": (admit(rdp, True), clear),
    }
    results: dict[str, float] = {}
    for name, (fn, before) in cases.items():
        results[f"{name}_s"], results[f"{name}_cpu_s"] = median(fn, args.repeats, before)
        budget.persist_under(None)
    shutil.rmtree(disk, ignore_errors=True)
    clear()
    one_by_one = sum(budget.composed_epsilon([event], DELTA, "pld") for event in events)
    results.update(composed_epsilon_pld=pld_eps, composed_epsilon_rdp=rdp_eps,
                   sum_of_epsilons=one_by_one, sum_over_composed=one_by_one / pld_eps,
                   scratch_over_cold_room=results["pld_from_scratch_s"]
                   / results["admit_cold_room_s"], jobs=args.jobs, repeats=args.repeats)
    if args.json:
        print(json.dumps(results))
        return
    print(f"dataset admission with {args.jobs} charged jobs (median of {args.repeats}; "
          "wall s, CPU s)")
    labels = {"admit_cold_room": "admit, cold, room left (RDP fits)",
              "admit_cold_near": "admit, cold, near the boundary",
              "admit_restart_near": "admit, restart, near the boundary",
              "admit_cold_refused": "admit, cold, refused",
              "pld_from_scratch": "PLD composition from scratch",
              "admit_warm_near": "admit, warm, near the boundary",
              "admit_cold_rdp": "admit, cold, RDP accountant"}
    for name, label in labels.items():
        print(f"  {label:<36}{results[name + '_s']:8.3f} {results[name + '_cpu_s']:8.3f}")
    print(f"  from scratch / cold with room left  {results['scratch_over_cold_room']:8.1f}×")
    print(f"  composed ε: PLD {pld_eps:.4f}, RDP {rdp_eps:.4f}")
    print(f"  sum of per-job ε                    {one_by_one:8.4f}  "
          f"({results['sum_over_composed']:.1f}× the composition)")


if __name__ == "__main__":
    main()
