"""kopf handlers: thin triggers of the :class:`~dptrain.operator._reconciler.Reconciler`.

Reconciliation is level-triggered: every handler only says "look at job X now" and the
reconciler reads the whole state and acts (see ``_decisions``). The triggers are:

- watch events of DPTrainingJobs (creation, resume after an operator restart through the
  initial listing, spec edits, the trainer's ``status.progress`` and the data-preparation pod's
  ``status.dataset``); events caused only by the operator's own status writes are skipped;
- watch events of the Jobs (and JobSets) the operator created (they finish or fail);
- a periodic sweep over every known job and dataset, the safety net that also notices stalled
  trainers (:meth:`Reconciler.sweep`);
- deletion of a job (its metric series go; its children go by ownerReference).

No handler needs a finalizer, so kopf puts none on DPTrainingJobs or DPDatasets (and removes the
``dptrain.io/operator`` finalizer that earlier versions left): a job deleted while the operator
is down is gone at once, its children with it (ownerReferences). The sweep is ours and not a
``kopf.timer`` because kopf's timers and daemons always require a finalizer.

Handlers declare the kwargs they use and take ``**_``; they are plain async functions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from dptrain.api import DATASET_PLURAL, GROUP, PLURAL, VERSION
from dptrain.operator import _dataset_budget as dataset_budget
from dptrain.operator._children import LABEL_JOB, LABEL_MANAGED_BY, MANAGER
from dptrain.operator._kube import KubeClient
from dptrain.operator._peering import collection_path, peering_object
from dptrain.operator._reconciler import JOBSET_API, Reconciler, ReconcilerConfig
from dptrain.operator._tools import OperatorTools

logger = logging.getLogger("dptrain.operator")


@dataclasses.dataclass(kw_only=True)
class OperatorMemo:
    """What the handlers share (kopf passes it as ``memo``)."""

    config: ReconcilerConfig
    jobset: str = "auto"
    cache_dir: str | None = None
    timer_interval: float = 60.0
    namespaces: tuple[str, ...] = ()
    connection: kopf.ConnectionInfo | None = None
    reconciler: Reconciler | None = None
    sweeper: asyncio.Task[None] | None = None


def _reconciler(memo: Any) -> Reconciler:
    state: OperatorMemo = memo.dptrain
    if state.reconciler is None:
        if state.connection is None:
            raise kopf.TemporaryError("not logged in yet", delay=1)
        state.reconciler = Reconciler(
            KubeClient(state.connection),
            OperatorTools(cache_dir=state.cache_dir, placements=state.config.placements),
            state.config)
    return state.reconciler


async def login(*, memo: Any, logger: Any, settings: kopf.OperatorSettings,
                **_: Any) -> kopf.ConnectionInfo | None:
    """Log in as the kubernetes client would (in-cluster, else kubeconfig); keep the creds."""
    info = kopf.login_via_client(logger=logger, settings=settings)
    memo.dptrain.connection = info
    return info


async def startup(*, memo: Any, settings: kopf.OperatorSettings, logger: Any,
                  **_: Any) -> None:
    """Operator settings, and whether JobSet is served."""
    if memo.dptrain.connection is None:  # kopf runs startup before its login activity
        memo.dptrain.connection = kopf.login_via_client(logger=logger, settings=settings)
    # No handler requires a finalizer; kopf removes this one (left by earlier versions).
    settings.persistence.finalizer = "dptrain.io/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix="operator.dptrain.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="operator.dptrain.io")
    settings.posting.level = logging.WARNING  # our own events describe every transition
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    state: OperatorMemo = memo.dptrain
    # Charged jobs' PLDs survive restarts: the first admission after one reads them back.
    dataset_budget.persist_under(state.cache_dir)
    peer = state.config.peering
    if peer is not None:
        # kopf only patches an existing peering object, and a replica stays paused until it
        # sees one: create it (a CR cannot ship in the same Helm release or kustomization as
        # its CRD on a first install). Idempotent: AlreadyExists is fine.
        client = _reconciler(memo).client
        for namespace in ([None] if peer.clusterwide else state.namespaces):
            await client.create(collection_path(namespace), peering_object(peer.name, namespace))
    if state.jobset != "auto":
        use = state.jobset == "jobset"
    else:
        reconciler = _reconciler(memo)
        discovery = await reconciler.client.get(f"/apis/{JOBSET_API}")
        use = any(r.get("name") == "jobsets" for r in (discovery or {}).get("resources", []))
    state.config = dataclasses.replace(state.config, use_jobset=use)
    if state.reconciler is not None:
        state.reconciler.config = state.config
    logger.info("workloads run as %s", "JobSets" if use else "Indexed Jobs + headless Services")
    if state.sweeper is None:
        state.sweeper = asyncio.create_task(_reconciler(memo).sweep(state.timer_interval))


async def cleanup(*, memo: Any, **_: Any) -> None:
    """Stop the sweep, cancel requeues and close the HTTP session."""
    if memo.dptrain.sweeper is not None:
        memo.dptrain.sweeper.cancel()
        memo.dptrain.sweeper = None
    if memo.dptrain.reconciler is not None:
        await memo.dptrain.reconciler.close()


async def job_event(*, event: kopf.RawEvent, body: kopf.Body, name: str,
                    namespace: str | None, memo: Any, **_: Any) -> None:
    """Any watch event of a DPTrainingJob (including the listing after a restart)."""
    if namespace is None:
        return
    reconciler = _reconciler(memo)
    if event.get("type") == "DELETED":
        reconciler.forget(namespace, name)
        ref = ((body.get("spec") or {}).get("data") or {}).get("datasetRef")
        if isinstance(ref, str) and ref:
            # Its charge becomes final (or its unused reservation is released).
            await reconciler.reconcile_dataset(namespace, ref)
        return
    if event.get("type") is not None and not reconciler.changed(body):
        return  # caused by our own status writes: nothing a decision depends on moved
    await reconciler.poke(namespace, name, "event")


async def workload_event(*, namespace: str | None, labels: Mapping[str, str], memo: Any,
                         **_: Any) -> None:
    """A child Job/JobSet changed (finished, failed, was deleted): look at its owner."""
    owner = labels.get(LABEL_JOB)
    if owner and namespace is not None:
        await _reconciler(memo).poke(namespace, owner, "workload")


async def dataset_event(*, event: kopf.RawEvent, name: str, namespace: str | None, memo: Any,
                        **_: Any) -> None:
    """Any watch event of a DPDataset: summarise its ledger, wake the jobs waiting on it."""
    if namespace is None:
        return
    if event.get("type") == "DELETED":
        _reconciler(memo).forget_dataset(namespace, name)
        return
    await _reconciler(memo).reconcile_dataset(namespace, name)


def register(registry: kopf.OperatorRegistry, *, timer_interval: float = 60.0) -> None:
    """Register the handlers in ``registry``.

    ``timer_interval`` is unused here: :func:`startup` starts the sweep
    (:meth:`Reconciler.sweep`) with the memo's interval.
    """
    del timer_interval
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(job_event)
    managed: dict[str, Any] = {LABEL_MANAGED_BY: MANAGER, LABEL_JOB: kopf.PRESENT}
    kopf.on.event("batch", "v1", "jobs", labels=managed, registry=registry)(workload_event)
    kopf.on.event("jobset.x-k8s.io", "v1alpha2", "jobsets", labels=managed,
                  registry=registry, id="jobset_event")(workload_event)
    kopf.on.event(GROUP, VERSION, DATASET_PLURAL, registry=registry)(dataset_event)
