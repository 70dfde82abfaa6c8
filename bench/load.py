"""Load: N DPTrainingJobs created at once against the API emulator (kmock) with the operator.

All jobs are POSTed concurrently (8 client threads) right after the operator is up. The bench
waits until every job is Running with its six children (ConfigMap, ServiceAccount, Role,
RoleBinding, headless Service, trainer Job), then reports the time to converge (from the first
POST), the operator's peak RSS (``VmHWM`` in /proc, plus the largest ``VmRSS`` sampled), the
reconcile errors it counted, and that no job is left in an error state. Jobs differ in budget
and iterations (8 distinct specs), so planning is exercised, not just memoised.

Run: ``python bench/load.py [--jobs 500] [--timeout 900] [--json]``. Not a timed test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kube"))

from kube_client import ApiError, KubeHTTP
from kube_faults import FaultyEmulatorServer
from kube_operator import OperatorProcess
from kube_samples import job_manifest

CHILDREN = ("v1/configmaps", "v1/serviceaccounts", "rbac.authorization.k8s.io/v1/roles",
            "rbac.authorization.k8s.io/v1/rolebindings", "v1/services", "batch/v1/jobs")


def proc_status(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` memory field in bytes (0 if absent)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    return 0


def spec_variant(index: int) -> dict[str, object]:
    return {"privacy": {"epsilon": 2.0 + 0.5 * (index % 4)},
            "training": {"iterations": 1000 + 500 * (index % 2)}}


def create(kube: KubeHTTP, name: str, index: int) -> None:
    """POST one job; a timed-out POST is retried (409 AlreadyExists then means it landed)."""
    for attempt in range(5):
        try:
            kube.create_job(job_manifest(name, **spec_variant(index)))
            return
        except ApiError as error:
            if error.status == 409 and attempt > 0:
                return
            raise
        except OSError:  # the emulator is one Python thread: under load, answers can be late
            time.sleep(1.0)
    raise RuntimeError(f"could not create {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dptrain-load-"))
    names = [f"load-{i:04d}" for i in range(args.jobs)]
    result: dict[str, object] = {"jobs": args.jobs}
    # The fault-injecting emulator with no faults: it bounds kmock's request history, whose
    # full scan on every read makes stock kmock quadratic (seconds per request at 500 jobs).
    with FaultyEmulatorServer() as api:
        kube = KubeHTTP(api.url)
        operator = OperatorProcess(api.write_kubeconfig(tmp / "kubeconfig"), tmp / "operator.log",
                                   extra_args=("--cache-dir", str(tmp / "cache"),
                                               "--timer-interval", "300"))
        peak_sampled = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_sampled
            while not stop.is_set():
                assert operator.process is not None
                try:
                    peak_sampled = max(peak_sampled, proc_status(operator.process.pid, "VmRSS"))
                except OSError:
                    return
                time.sleep(0.2)

        try:
            operator.start()
            pid = operator.process.pid if operator.process else 0
            result["rss_idle_bytes"] = proc_status(pid, "VmRSS")
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda i: create(kube, names[i], i), range(args.jobs)))
            result["create_seconds"] = round(time.perf_counter() - started, 2)
            deadline = started + args.timeout
            phases: Counter[str] = Counter()
            while True:
                jobs = kube.list("dptrain.io/v1alpha1/dptrainingjobs", "default")
                phases = Counter((j.get("status") or {}).get("phase", "<none>") for j in jobs)
                workloads = {o["metadata"]["name"] for o in kube.list("batch/v1/jobs", "default")}
                done = phases.get("Running", 0) == args.jobs and all(
                    f"{n}-train" in workloads for n in names)
                if done or time.perf_counter() > deadline:
                    break
                time.sleep(2.0)  # listing 500 jobs loads the emulator too
            result["converged"] = done
            result["converge_seconds"] = round(time.perf_counter() - started, 2)
            result["phases"] = dict(phases)
            counts = {resource: len(kube.list(resource, "default")) for resource in CHILDREN}
            result["children"] = counts
            result["children_ok"] = all(n == args.jobs for n in counts.values())
            stop.set()
            sampler.join(5)
            result["rss_bytes"] = proc_status(pid, "VmRSS")
            result["peak_rss_bytes"] = max(proc_status(pid, "VmHWM"), peak_sampled)
            metrics = operator.metrics()
            result["reconcile_errors"] = sum(float(v) for v in re.findall(
                r"^dptrain_reconcile_errors_total\{[^}]*\} (\S+)$", metrics, flags=re.M))
            failed = [j["metadata"]["name"] for j in jobs
                      if (j.get("status") or {}).get("phase") in ("Failed", None)]
            result["jobs_in_error"] = len(failed)
        finally:
            stop.set()
            operator.stop()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        mib = 1024 * 1024
        print(f"{args.jobs} jobs created in {result['create_seconds']} s; converged="
              f"{result['converged']} after {result['converge_seconds']} s; phases "
              f"{result['phases']}")
        print(f"children per kind: {result['children']}")
        print(f"operator RSS: idle {int(result['rss_idle_bytes']) / mib:.0f} MiB, after "
              f"{int(result['rss_bytes']) / mib:.0f} MiB, peak "
              f"{int(result['peak_rss_bytes']) / mib:.0f} MiB; reconcile errors "
              f"{result['reconcile_errors']:g}; jobs in error {result['jobs_in_error']}")
    ok = bool(result["converged"]) and bool(result["children_ok"]) and not result["jobs_in_error"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
