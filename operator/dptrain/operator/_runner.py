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
from kopf._core.engines.peering import Identity  # kopf's NewType for peer ids (not exported)

from dptrain.api import IN_CLUSTER_API_SERVER
from dptrain.operator import _handlers, _metrics
from dptrain.operator._observed import Settings
from dptrain.operator._peering import (
    DEFAULT_LIFETIME,
    PeeringIdentity,
    own_identity,
    start_time_priority,
)
from dptrain.operator._profiles import OperatorConfig, placements
from dptrain.operator._reconciler import ReconcilerConfig

logger = logging.getLogger("dptrain.operator")


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
        cache_dir: cache directory (planner σ tables; dataset jobs' PLDs, kept across
            restarts); None: the planner's default, and dataset PLDs in memory only.
        timer_interval: seconds between safety reconciles of each job.
        stall_timeout: seconds without progress before a job is marked Stalled.
        restart_backoff: first delay before restarting a failed trainer (doubles each time).
        peering: name of the kopf peering object shared by the replicas (None: run alone,
            no peering). See :mod:`dptrain.operator._peering`.
        priority: this replica's peering priority (None: by start time, older first).
        peering_lifetime: seconds this replica's keep-alive stays valid (takeover delay).
        config: the operator configuration (accelerator profiles); None: the defaults.
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
    peering: str | None = None
    priority: int | None = None
    peering_lifetime: int = DEFAULT_LIFETIME
    config: OperatorConfig | None = None


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


def peering_identity(options: OperatorOptions) -> PeeringIdentity | None:
    """This replica's place in peering (None when it runs alone)."""
    if options.peering is None:
        return None
    return PeeringIdentity(
        name=options.peering, identity=own_identity(),
        priority=options.priority if options.priority is not None else start_time_priority(),
        clusterwide=not options.namespaces, lifetime=options.peering_lifetime)


def build(options: OperatorOptions, peer: PeeringIdentity | None = None
          ) -> tuple[kopf.OperatorRegistry, kopf.Memo]:
    """The registry with our handlers and the memo they share."""
    registry = kopf.OperatorRegistry()
    _handlers.register(registry, timer_interval=options.timer_interval)
    config = ReconcilerConfig(
        decisions=Settings(stall_timeout=options.stall_timeout,
                           restart_backoff=options.restart_backoff,
                           export=(options.config is None
                                   or options.config.trainer.export != "none")),
        pod_api_server=options.pod_api_server, peering=peer,
        placements=placements(options.config))
    memo = kopf.Memo(dptrain=_handlers.OperatorMemo(
        config=config, jobset=options.jobset, cache_dir=options.cache_dir,
        timer_interval=options.timer_interval, namespaces=tuple(options.namespaces)))
    return registry, memo


async def operate(options: OperatorOptions, *, stop_flag: asyncio.Event | None = None,
                  ready_flag: asyncio.Event | None = None) -> None:
    """Run the operator until stopped (SIGINT/SIGTERM or ``stop_flag``)."""
    peer = peering_identity(options)
    registry, memo = build(options, peer)
    if options.metrics_port:
        _metrics.serve(options.metrics_port)
    liveness = (f"http://0.0.0.0:{options.health_port}/healthz" if options.health_port
                else None)
    settings = kopf.OperatorSettings()
    if peer is not None:
        # Several replicas: the highest priority is active, the others pause (kopf peering).
        settings.peering.lifetime = peer.lifetime
        logger.info("peering %r as %s with priority %d (lifetime %d s)", peer.name,
                    peer.identity, peer.priority, peer.lifetime)
    await kopf.operator(
        registry=registry,
        memo=memo,
        settings=settings,
        # One replica needs no peering objects; several share one (mandatory: a replica whose
        # peering object is missing stays paused rather than run beside another).
        standalone=peer is None,
        peering_name=peer.name if peer is not None else None,
        priority=peer.priority if peer is not None else None,
        identity=Identity(peer.identity) if peer is not None else None,
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
