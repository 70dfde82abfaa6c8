"""Operator benchmark against the API emulator (kmock): reconcile latency and memory.

- create → workload latency: N jobs created one at a time (each waits for its Job), median and
  p95 of the time from the POST of the DPTrainingJob to its trainer Job existing;
- memory: M more jobs created at once; the operator's RSS once all workloads exist (and its
  peak, VmHWM), and the time to converge.

Run: ``python bench/operator.py [--latency-jobs 100] [--load-jobs 500] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kube"))

from kube_client import KubeHTTP
from kube_operator import OperatorProcess
from kube_samples import job_manifest
from kube_server import EmulatorServer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--load-jobs", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dptrain-bench-"))
    result: dict[str, object] = {}
    with EmulatorServer() as api:
        kube = KubeHTTP(api.url)
        operator = OperatorProcess(api.write_kubeconfig(tmp / "kubeconfig"), tmp / "operator.log",
                                   extra_args=("--cache-dir", str(tmp / "cache"),
                                               "--timer-interval", "300"))
        try:
            operator.start()
            # Warm-up: the first plan fills the planner's σ cache (not what we measure).
            kube.create_job(job_manifest("warmup"))
            while kube.get("batch/v1/jobs", "default", "warmup-train") is None:
                time.sleep(0.05)
            rss_idle = operator.rss_bytes()
            latencies: list[float] = []
            for i in range(args.latency_jobs):
                name = f"lat-{i}"
                started = time.perf_counter()
                kube.create_job(job_manifest(name))
                while kube.get("batch/v1/jobs", "default", f"{name}-train") is None:
                    time.sleep(0.05)
                latencies.append(time.perf_counter() - started)
            result["latency_jobs"] = args.latency_jobs
            result["create_to_workload_median_s"] = statistics.median(latencies)
            result["create_to_workload_p95_s"] = percentile(latencies, 0.95)
            if not args.json:  # the load phase takes minutes: show this part now
                print(f"latency over {args.latency_jobs} jobs: median "
                      f"{result['create_to_workload_median_s'] * 1000:.0f} ms, p95 "
                      f"{result['create_to_workload_p95_s'] * 1000:.0f} ms", flush=True)

            started = time.perf_counter()
            for i in range(args.load_jobs):
                kube.create("dptrain.io/v1alpha1/dptrainingjobs", "load",
                            job_manifest(f"load-{i}", namespace="load"))
            created = time.perf_counter() - started
            deadline = time.monotonic() + args.timeout
            while len(api.objects("batch/v1/jobs", "load")) < args.load_jobs:
                if time.monotonic() > deadline:
                    raise SystemExit("timed out waiting for the load jobs' workloads")
                time.sleep(0.5)
            result["load_jobs"] = args.load_jobs
            result["load_create_s"] = created
            result["load_converge_s"] = time.perf_counter() - started
            result["rss_idle_bytes"] = rss_idle
            result["rss_bytes"] = operator.rss_bytes()
            assert operator.process is not None
            result["rss_peak_bytes"] = peak_rss(operator.process.pid)
            metrics = operator.metrics()
            errors = [line for line in metrics.splitlines()
                      if line.startswith("dptrain_reconcile_errors_total")]
            result["reconcile_errors"] = sum(float(line.split()[-1]) for line in errors)
        finally:
            operator.stop()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            shown = f"{value / 2**20:.0f} MiB" if key.endswith("_bytes") else (
                f"{value * 1000:.0f} ms" if key.endswith("_s") and value < 10 else value)
            print(f"{key:32} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
