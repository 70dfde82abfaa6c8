"""`dptrain operator`: run the Kubernetes operator (a real kopf operator loop)."""

from __future__ import annotations

import argparse
import os
import re

from dptrain.api import IN_CLUSTER_API_SERVER
from dptrain.cli._output import fail

_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `dptrain operator` (with `--help` and `--json` via `common`)."""
    parser = subparsers.add_parser(
        "operator", parents=[common],
        help="run the DPTrainingJob operator",
        description="Run the DPTrainingJob operator: plan each job, create its trainer "
                    "workload, keep the privacy ledger and halt jobs at their ε budget. "
                    "Credentials: in-cluster service account, else $KUBECONFIG.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="serve only this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="serve all namespaces (the default)")
    parser.add_argument("--metrics-port", type=int, default=9090,
                        help="port of the Prometheus /metrics endpoint, 0 to disable "
                             "(default 9090)")
    parser.add_argument("--health-port", type=int, default=8080,
                        help="port of the /healthz liveness endpoint, 0 to disable "
                             "(default 8080)")
    parser.add_argument("--log-format", choices=["json", "plain"], default="plain",
                        help="log line format (default plain)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--pod-api-server",
                        default=os.environ.get("DPTRAIN_POD_API_SERVER",
                                               IN_CLUSTER_API_SERVER),
                        help="API server URL given to trainer pods (DPTRAIN_API_SERVER)")
    parser.add_argument("--workload", choices=["auto", "jobset", "job"], default="auto",
                        help="run trainers as a JobSet, an Indexed Job + headless Service, or "
                             "auto-detect JobSet (default auto)")
    parser.add_argument("--cache-dir", default=os.environ.get("DPTRAIN_CACHE_DIR"),
                        help="cache directory: planner σ tables, charged jobs' PLDs "
                             "(default $DPTRAIN_CACHE_DIR)")
    parser.add_argument("--timer-interval", type=float, default=60.0,
                        help="seconds between safety reconciles of each job (default 60)")
    parser.add_argument("--stall-timeout", type=float, default=900.0,
                        help="seconds without a progress report before a job is marked "
                             "Stalled (default 900)")
    parser.add_argument("--restart-backoff", type=float, default=10.0,
                        help="first delay in seconds before restarting a failed trainer; "
                             "doubles per restart (default 10)")
    parser.add_argument("--config", metavar="FILE",
                        default=os.environ.get("DPTRAIN_OPERATOR_CONFIG"),
                        help="operator configuration (YAML): accelerator profiles, i.e. node "
                             "selectors, tolerations and extra resources per accelerator "
                             "(gpuProfile: generic|gke|eks, tpuProfile: gke, profiles: {...}); "
                             "default $DPTRAIN_OPERATOR_CONFIG, else generic GPUs and GKE TPUs")
    ha = parser.add_argument_group(
        "high availability",
        "Run several replicas with --peering NAME: the replica with the highest priority works, "
        "the others stand by and take over within about --peering-lifetime seconds when it "
        "goes. Needs kopf's ClusterKopfPeering (or, with --namespace, KopfPeering) CRD, which "
        "manifests/ and the Helm chart install; the operator creates the object NAME if "
        "missing. The chart runs replicas > 1 this way.")
    ha.add_argument("--peering", metavar="NAME", default=os.environ.get("DPTRAIN_PEERING"),
                    help="name of the peering object the replicas share (default "
                         "$DPTRAIN_PEERING; unset: run alone, without peering)")
    ha.add_argument("--priority", type=int, default=None,
                    help="this replica's priority (default: by start time, older first; "
                         "replicas with equal priorities all pause)")
    ha.add_argument("--peering-lifetime", type=int, default=15, metavar="SECONDS",
                    help="seconds a replica's keep-alive stays valid: a dead active replica "
                         "is replaced after at most this long (default 15)")
    parser.set_defaults(handler=_run_operator)


def _run_operator(args: argparse.Namespace) -> int:
    for flag in ("metrics_port", "health_port"):
        if not 0 <= getattr(args, flag) <= 65535:
            fail(f"--{flag.replace('_', '-')} must be in 0..65535")
    for flag in ("timer_interval", "stall_timeout"):
        if not getattr(args, flag) > 0:
            fail(f"--{flag.replace('_', '-')} must be > 0")
    if not args.restart_backoff >= 0:
        fail("--restart-backoff must be >= 0")
    if args.peering is not None and (len(args.peering) > 253
                                     or not _DNS_NAME.fullmatch(args.peering)):
        fail("--peering must be a lowercase DNS name (a-z, 0-9, '-', '.'), at most 253 "
             "characters")
    if not 10 <= args.peering_lifetime <= 300:
        fail("--peering-lifetime must be in 10..300 seconds (keep-alives are sent 5-10 s "
             "before it ends)")
    # Lazy: kopf and the kubernetes client load only for this command.
    from dptrain.operator import OperatorOptions, run
    from dptrain.operator._profiles import ConfigError, load_config, placements

    config = None
    if args.config:
        try:
            config = load_config(args.config)
            placements(config)  # every chosen profile places every accelerator of its kind
        except ConfigError as error:
            fail(f"--config {error}")

    options = OperatorOptions(
        namespaces=tuple(args.namespace), metrics_port=args.metrics_port,
        health_port=args.health_port, log_format=args.log_format, verbose=args.verbose,
        pod_api_server=args.pod_api_server, jobset=args.workload, cache_dir=args.cache_dir,
        timer_interval=args.timer_interval, stall_timeout=args.stall_timeout,
        restart_backoff=args.restart_backoff, peering=args.peering or None,
        priority=args.priority, peering_lifetime=args.peering_lifetime, config=config)
    run(options)
    return 0
