"""Prometheus metrics of the operator, in their own registry (``REGISTRY``).

Names and labels follow the project conventions (base units, ``_total`` only on counters, low
cardinality): per-job gauges labelled ``namespace``/``name``, a phase state set, halt and error
counters and a reconcile-duration histogram. A deleted job's series are removed.
"""

from __future__ import annotations

import contextlib
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dptrain.api import Phase

PHASES: tuple[str, ...] = get_args(Phase)

REGISTRY = CollectorRegistry(auto_describe=True)

EPSILON_SPENT = Gauge("dptrain_job_epsilon_spent", "ε spent by the job (operator's accountant).",
                      ["namespace", "name"], registry=REGISTRY)
EPSILON_BUDGET = Gauge("dptrain_job_epsilon_budget", "ε budget of the job.",
                       ["namespace", "name"], registry=REGISTRY)
STEPS_CHARGED = Gauge("dptrain_job_steps_charged", "DP-SGD steps charged to the job's ledger.",
                      ["namespace", "name"], registry=REGISTRY)
EVAL_LOSS = Gauge("dptrain_job_eval_loss",
                  "Held-out evaluation loss (nats per token) the trainer last reported; not "
                  "covered by the job's epsilon (computed on data it does not train on).",
                  ["namespace", "name"], registry=REGISTRY)
EVAL_PERPLEXITY = Gauge("dptrain_job_eval_perplexity",
                        "Held-out evaluation perplexity the trainer last reported; not covered "
                        "by the job's epsilon.", ["namespace", "name"], registry=REGISTRY)
PHASE = Gauge("dptrain_job_phase", "1 for the job's current phase, 0 for the others.",
              ["namespace", "name", "phase"], registry=REGISTRY)
HALTED = Counter("dptrain_jobs_halted", "Jobs that reached a terminal phase, by reason.",
                 ["reason"], registry=REGISTRY)
DATASET_SPENT = Gauge("dptrain_dataset_epsilon_spent",
                      "Composed ε of the steps charged to a DPDataset by all its jobs.",
                      ["namespace", "name"], registry=REGISTRY)
DATASET_RESERVED = Gauge("dptrain_dataset_epsilon_reserved",
                         "Composed ε admitted on a DPDataset but not yet run.",
                         ["namespace", "name"], registry=REGISTRY)
DATASET_BUDGET = Gauge("dptrain_dataset_epsilon_budget", "ε budget of a DPDataset.",
                       ["namespace", "name"], registry=REGISTRY)
RECONCILE_ERRORS = Counter("dptrain_reconcile_errors", "Reconciles that raised, by handler.",
                           ["handler"], registry=REGISTRY)
RECONCILE_DURATION = Histogram("dptrain_reconcile_duration_seconds",
                               "Wall time of one reconcile, by handler.", ["handler"],
                               registry=REGISTRY,
                               buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                        30, 60))


def observe_job(namespace: str, name: str, *, phase: str, epsilon_spent: float | None,
                epsilon_budget: float | None, steps_charged: int | None,
                eval_loss: float | None = None, eval_perplexity: float | None = None) -> None:
    """Set a job's gauges from its status."""
    for candidate in PHASES:
        PHASE.labels(namespace, name, candidate).set(1.0 if candidate == phase else 0.0)
    if epsilon_spent is not None:
        EPSILON_SPENT.labels(namespace, name).set(epsilon_spent)
    if epsilon_budget is not None:
        EPSILON_BUDGET.labels(namespace, name).set(epsilon_budget)
    if steps_charged is not None:
        STEPS_CHARGED.labels(namespace, name).set(steps_charged)
    if eval_loss is not None:
        EVAL_LOSS.labels(namespace, name).set(eval_loss)
    if eval_perplexity is not None:
        EVAL_PERPLEXITY.labels(namespace, name).set(eval_perplexity)


def forget_job(namespace: str, name: str) -> None:
    """Remove every series of a deleted job."""
    for gauge in (EPSILON_SPENT, EPSILON_BUDGET, STEPS_CHARGED, EVAL_LOSS, EVAL_PERPLEXITY):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    for candidate in PHASES:
        with contextlib.suppress(KeyError):
            PHASE.remove(namespace, name, candidate)


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` of ``REGISTRY`` on its own port (a daemon thread)."""
    start_http_server(port, addr=address, registry=REGISTRY)


def observe_dataset(namespace: str, name: str, *, spent: float, reserved: float,
                    budget: float) -> None:
    """Set a DPDataset's gauges."""
    DATASET_SPENT.labels(namespace, name).set(spent)
    DATASET_RESERVED.labels(namespace, name).set(reserved)
    DATASET_BUDGET.labels(namespace, name).set(budget)


def forget_dataset(namespace: str, name: str) -> None:
    """Remove a deleted DPDataset's series."""
    for gauge in (DATASET_SPENT, DATASET_RESERVED, DATASET_BUDGET):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
