"""Benchmark the accountant: ε for T = 1e3..1e5 (PLD, RDP), a calibration, curve look-ups.

Run: python bench/accountant.py [--repeats 5]. Prints medians (seconds or microseconds).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from dptrain.privacy import (
    DpSgdMechanism,
    EpsilonCurve,
    calibrate_noise_multiplier,
    epsilon,
)
from dptrain.privacy._mechanism import _rdp_one_step, base_pld


def median_seconds(fn: Callable[[], object], repeats: int, clear: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        clear()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    def clear() -> None:  # time cold computations: no cached PLD or RDP of one step
        base_pld.cache_clear()
        _rdp_one_step.cache_clear()

    print(f"{'what':<44} {'median':>12}")
    for steps in (1_000, 10_000, 100_000):
        for accountant in ("pld", "rdp"):
            m = DpSgdMechanism(sampling_rate=5.3e-5 if steps == 100_000 else 0.01,
                               noise_multiplier=0.614 if steps == 100_000 else 1.0,
                               delta=1.1e-10 if steps == 100_000 else 1e-5,
                               accountant=accountant)
            t = median_seconds(lambda m=m, steps=steps: epsilon(m, steps), args.repeats, clear)
            print(f"{f'epsilon {accountant.upper()} T={steps:,}':<44} {t:>10.3f} s")
    t = median_seconds(lambda: calibrate_noise_multiplier(
        epsilon=1.0, delta=1e-6, sampling_rate=0.1, steps=512), max(1, args.repeats // 2), clear)
    print(f"{'calibrate sigma PLD (q=0.1, T=512, eps=1)':<44} {t:>10.3f} s")
    m = DpSgdMechanism(sampling_rate=5.3e-5, noise_multiplier=0.614, delta=1.1e-10)
    started = time.perf_counter()
    curve = EpsilonCurve.build(m, 100_000)
    label = f"build eps-curve PLD T=100,000 ({len(curve.steps)} points)"
    print(f"{label:<44} "
          f"{time.perf_counter() - started:>10.3f} s")
    per_lookup = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for t in range(0, 100_000, 100):
            curve.epsilon_at(t)
        per_lookup.append((time.perf_counter() - started) / 1000 * 1e6)
    print(f"{'curve look-up (1000 look-ups, per look-up)':<44} "
          f"{statistics.median(per_lookup):>9.3f} µs")


if __name__ == "__main__":
    main()
