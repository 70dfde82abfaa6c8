"""Running the operator: a real kopf operator loop with liveness, metrics and JSON logs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Literal

import kopf

from dptrain.api import IN_CLUSTER_API_SERVER
from dptrain.operator import _handlers, _metrics
from dptrain.operator._observed import Settings
from dptrain.operator._reconciler import ReconcilerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class OperatorOptions:
    """Everything ``dptrain operator`` can be told.

    Attributes:
        namespaces: namespaces to serve; empty means all namespaces.
        metrics_port: port of ``/metrics`` (0: do not serve).
        health_port: port of ``/healthz`` (0: no liveness endpoint).
        log_format: ``json`` (one object per line) or ``plain``.
        verbose: debug logging.
        pod_api_server: API server URL given to trainer pods.
        jobset: ``auto`` (use JobSet when the cluster serves it), ``jobset`` or ``job``.
        cache_dir: planner cache directory (σ tables); None: the planner's default.
        timer_interval: seconds between safety reconciles of each job.
        stall_timeout: seconds without progress before a job is marked Stalled.
        restart_backoff: first delay before restarting a failed trainer (doubles each time).
    """

    namespaces: Sequence[str] = ()
    metrics_port: int = 9090
    health_port: int = 8080
    log_format: Literal["json", "plain"] = "plain"
    verbose: bool = False
    pod_api_server: str = IN_CLUSTER_API_SERVER
    jobset: Literal["auto", "jobset", "job"] = "auto"
    cache_dir: str | None = None
    timer_interval: float = 60.0
    stall_timeout: float = 900.0
    restart_backoff: float = 10.0


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        for key in ("k8s_ref",):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: str, verbose: bool) -> None:
    """Root logging: one line per record, JSON or plain, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("aiohttp.access", "kubernetes", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build(options: OperatorOptions) -> tuple[kopf.OperatorRegistry, kopf.Memo]:
    """The registry with our handlers and the memo they share."""
    registry = kopf.OperatorRegistry()
    _handlers.register(registry, timer_interval=options.timer_interval)
    config = ReconcilerConfig(
        decisions=Settings(stall_timeout=options.stall_timeout,
                           restart_backoff=options.restart_backoff),
        pod_api_server=options.pod_api_server)
    memo = kopf.Memo(dptrain=_handlers.OperatorMemo(
        config=config, jobset=options.jobset, cache_dir=options.cache_dir,
        timer_interval=options.timer_interval))
    return registry, memo


async def operate(options: OperatorOptions, *, stop_flag: asyncio.Event | None = None,
                  ready_flag: asyncio.Event | None = None) -> None:
    """Run the operator until stopped (SIGINT/SIGTERM or ``stop_flag``)."""
    registry, memo = build(options)
    if options.metrics_port:
        _metrics.serve(options.metrics_port)
    liveness = (f"http://0.0.0.0:{options.health_port}/healthz" if options.health_port
                else None)
    await kopf.operator(
        registry=registry,
        memo=memo,
        standalone=True,  # one replica (strategy: Recreate); no peering objects needed
        clusterwide=not options.namespaces,
        namespaces=list(options.namespaces),
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def run(options: OperatorOptions) -> None:
    """Configure logging and run the operator in a fresh event loop."""
    configure_logging(options.log_format, options.verbose)
    asyncio.run(operate(options))
