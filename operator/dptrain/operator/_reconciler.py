"""The I/O edge of reconciliation: read the job and its children, decide, act.

One :class:`Reconciler` serves all jobs of an operator process. For each job it runs at most one
reconcile at a time (a single-flight loop: triggers that arrive meanwhile collapse into one more
pass), always on a fresh read of the job, so concurrent triggers (watch events, timers, Job
status changes, requeues) can never interleave writes to one job's status. There is one
operator replica (``strategy: Recreate``), so an in-process lock is enough.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Mapping
from typing import Any

from dptrain.api import (
    API_VERSION,
    DATASET_KIND,
    PLURAL,
    TERMINAL_PHASES,
)
from dptrain.operator import _metrics
from dptrain.operator._apply import (
    JOBSET_API,
    ReconcilerConfig,
    apply_decision,
    workload_path,
)
from dptrain.operator._children import (
    ANNOTATION_RESTART,
    LABEL_COMPONENT,
    LABEL_JOB,
    ChildNames,
    JobRef,
)
from dptrain.operator._conditions import timestamp
from dptrain.operator._dataset_reconciler import (
    DatasetLedgers,
    reconcile_dataset,
)
from dptrain.operator._decisions import decide
from dptrain.operator._draft import Decision
from dptrain.operator._kube import ApiError, KubeClient, resource_path
from dptrain.operator._observation import (
    body_after,
    child_state,
    config_state,
    dataset_ref,
    fingerprint,
)
from dptrain.operator._observed import ChildState, Observed, Settings
from dptrain.operator._peering import standing_by
from dptrain.operator._pod_status import pods_view
from dptrain.operator._tools import OperatorTools

__all__ = ["JOBSET_API", "SELF_TRIGGERS", "Reconciler", "ReconcilerConfig", "fingerprint"]

logger = logging.getLogger("dptrain.operator")

DEFAULT_CONFIG = ReconcilerConfig()
SELF_TRIGGERS = frozenset({"requeue", "dataset", "timer"})
"""Triggers the operator schedules itself (kopf's peering pause does not stop them)."""


@dataclasses.dataclass
class _JobState:
    running: bool = False
    dirty: bool = False
    failures: int = 0
    fingerprint: str | None = None
    requeue: asyncio.TimerHandle | None = None
    requeue_at: float = 0.0


class Reconciler:
    """Reconciles DPTrainingJobs: observe → :func:`decide` → act."""

    def __init__(self, client: KubeClient, tools: OperatorTools,
                 config: ReconcilerConfig = DEFAULT_CONFIG) -> None:
        self.client = client
        self.tools = tools
        self.config = config
        self._jobs: dict[tuple[str, str], _JobState] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.ledgers = DatasetLedgers(client)
        self._dataset_running: set[tuple[str, str]] = set()
        self._dataset_dirty: set[tuple[str, str]] = set()
        self._dataset_seen: dict[tuple[str, str], tuple[float, float]] = {}
        self._datasets: set[tuple[str, str]] = set()

    # ----------------------------------------------------------------------- triggering

    def changed(self, body: Mapping[str, Any]) -> bool:
        """Whether a watch event's body differs from what was last reconciled."""
        meta = body.get("metadata") or {}
        state = self._jobs.get((meta.get("namespace", ""), meta.get("name", "")))
        return state is None or state.fingerprint != fingerprint(body)

    async def poke(self, namespace: str, name: str, trigger: str) -> None:
        """Reconcile a job now, or once more right after the reconcile in flight."""
        if trigger in SELF_TRIGGERS and await self._standing_by(namespace):
            # kopf paused this replica (a peer is active) but not our own requeues: drop it.
            # When this replica resumes, kopf lists every job again and pokes each.
            return
        state = self._jobs.setdefault((namespace, name), _JobState())
        state.dirty = True
        if state.running:
            return
        state.running = True
        try:
            while state.dirty:
                state.dirty = False
                await self._reconcile_timed(namespace, name, trigger, state)
        finally:
            state.running = False

    async def _standing_by(self, namespace: str) -> bool:
        """Whether another replica is active for ``namespace`` (kopf's peering rule)."""
        peer = self.config.peering
        if peer is None:
            return False
        try:
            body = await self.client.get(peer.path(namespace))
        except ApiError as error:
            logger.warning("cannot read the peering object %s (%s): not acting", peer.name,
                           error)
            return True
        return standing_by(body, peer.identity, peer.priority, dt.datetime.now(dt.UTC))

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted job: its requeue and its metric series."""
        state = self._jobs.pop((namespace, name), None)
        if state is not None and state.requeue is not None:
            state.requeue.cancel()
        _metrics.forget_job(namespace, name)

    def forget_dataset(self, namespace: str, name: str) -> None:
        """Drop a deleted DPDataset from the sweep."""
        self._datasets.discard((namespace, name))
        self._dataset_seen.pop((namespace, name), None)

    async def sweep(self, interval: float) -> None:
        """Every ``interval`` seconds, look at every known job and dataset (the safety net).

        It notices stalled trainers and anything a lost watch event hid (e.g. a job deleted
        while the operator was down, whose dataset charge becomes final). Jobs and datasets are
        known from their watch events, the initial listing included. A replica that stands by
        (peering) skips it. Not a ``kopf.timer``: kopf's timers force a finalizer.
        """
        while True:
            await asyncio.sleep(interval)
            for namespace, name in list(self._jobs):
                self._spawn(self.poke(namespace, name, "timer"))
            for namespace, name in list(self._datasets):
                if not await self._standing_by(namespace):
                    self._spawn(self.reconcile_dataset(namespace, name))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _schedule(self, namespace: str, name: str, delay: float, state: _JobState) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        if state.requeue is not None and not state.requeue.cancelled():
            if state.requeue_at <= when:
                return  # an earlier look is already scheduled
            state.requeue.cancel()

        def fire() -> None:
            state.requeue = None
            task = asyncio.ensure_future(self.poke(namespace, name, "requeue"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        state.requeue = loop.call_at(when, fire)
        state.requeue_at = when

    async def close(self) -> None:
        """Cancel pending requeues and in-flight requeue tasks."""
        for state in self._jobs.values():
            if state.requeue is not None:
                state.requeue.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.client.close()

    # ----------------------------------------------------------------------- one pass

    async def _reconcile_timed(self, namespace: str, name: str, trigger: str,
                               state: _JobState) -> None:
        started = time.perf_counter()
        try:
            requeue = await self.reconcile(namespace, name, state)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # any failure: count it, log it, retry with backoff
            state.failures += 1
            delay = min(60.0, self.config.error_backoff * 2 ** (state.failures - 1))
            _metrics.RECONCILE_ERRORS.labels(trigger).inc()
            logger.warning("reconcile of %s/%s failed (%s: %s); retrying in %.1fs",
                           namespace, name, type(error).__name__, error, delay)
            self._schedule(namespace, name, delay, state)
        else:
            state.failures = 0
            if requeue is not None:
                self._schedule(namespace, name, requeue, state)
        finally:
            _metrics.RECONCILE_DURATION.labels(trigger).observe(time.perf_counter() - started)

    async def reconcile(self, namespace: str, name: str,
                        state: _JobState | None = None) -> float | None:
        """One reconcile of one job; returns when to look again (seconds), if ever."""
        body = await self.client.get(resource_path(API_VERSION, PLURAL, namespace, name))
        if body is None:
            self.forget(namespace, name)
            return None
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            return None  # the children go with it (ownerReferences); nothing to start now
        observed = await self._observe(body)
        ref = dataset_ref(body)
        if ref is not None:
            observed = dataclasses.replace(observed,
                                           dataset=await self.ledgers.view(namespace, ref))
        now = dt.datetime.now(dt.UTC)
        decision = await asyncio.to_thread(decide, body, observed, now, tools=self.tools,
                                           settings=self._decision_settings())
        for line in decision.warnings:
            logger.warning("%s/%s: %s", namespace, name, line)
        if ref is not None and decision.reserve is not None:
            # Durable before the workload exists: re-checked on the fresh ledger, under the
            # dataset's lock, and written with a resourceVersion guard.
            spec = observed.dataset.spec if observed.dataset is not None else None
            if not await self.ledgers.reserve(namespace, ref, spec, decision.reserve):
                if state is not None:
                    state.dirty = True  # someone took the budget first: decide again
                return 0.5
        await apply_decision(self.client, self.config, self.tools, body, decision, now)
        if ref is not None:
            await self._dataset_after(body, ref, observed, decision, now)
        if state is not None:
            state.fingerprint = fingerprint(body_after(body, decision))
            if self._jobs.get((namespace, name)) is not state:
                return None  # deleted while this pass ran: its series must stay gone
        self._observe_metrics(namespace, name, body, decision)
        return decision.requeue_after

    async def _dataset_after(self, body: Mapping[str, Any], ref: str, observed: Observed,
                             decision: Decision, now: dt.datetime) -> None:
        """Events on the dataset, its charge following the job's ledger, waiting jobs noted."""
        meta = body.get("metadata") or {}
        namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid", "")
        key = (namespace, ref)
        if decision.phase == "Pending" and not decision.create:
            self.ledgers.waiting.setdefault(key, set()).add(name)
        else:
            self.ledgers.waiting.get(key, set()).discard(name)
        view = observed.dataset
        if view is None or view.uid is None:
            return
        dataset = {"apiVersion": API_VERSION, "kind": DATASET_KIND,
                   "metadata": {"name": ref, "namespace": namespace, "uid": view.uid}}
        for event in decision.dataset_events:
            try:
                await self.client.post_event(dataset, type_=event.type, reason=event.reason,
                                             message=event.message, now=timestamp(now))
            except ApiError as error:
                logger.warning("could not post event %s on DPDataset %s/%s: %s", event.reason,
                               namespace, ref, error)
        privacy = dict((body.get("status") or {}).get("privacy") or {})
        privacy.update(decision.status.get("privacy") or {})
        steps = int(privacy.get("stepsCharged") or 0)
        final = decision.phase in TERMINAL_PHASES
        # The view read at the start of this pass: record_steps re-reads under the lock.
        own = next((c for c in view.charges if c.uid == uid), None)
        if own is not None and (steps > own.steps_charged
                                or (final and own.state != "Charged")):
            await self.ledgers.record_steps(namespace, ref, uid, steps, final)

    async def reconcile_dataset(self, namespace: str, name: str) -> None:
        """Summarise a DPDataset's ledger and poke the jobs waiting for its budget.

        Single-flight per dataset: triggers that arrive during a pass (every charge update is a
        watch event) collapse into one more pass, so a burst of progress reports costs one or
        two compositions, not one each.
        """
        key = (namespace, name)
        self._datasets.add(key)
        if key in self._dataset_running:
            self._dataset_dirty.add(key)
            return
        self._dataset_running.add(key)
        freed = False
        try:
            while True:
                self._dataset_dirty.discard(key)
                freed = await self._dataset_pass(namespace, name) or freed
                if key not in self._dataset_dirty:
                    break
        finally:
            self._dataset_running.discard(key)
        if not freed:
            return
        for job in list(self.ledgers.waiting.get((namespace, name), ())):
            task = asyncio.ensure_future(self.poke(namespace, job, "dataset"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _dataset_pass(self, namespace: str, name: str) -> bool:
        """One summary pass; True when budget freed (a release or a budget raise)."""
        now = dt.datetime.now(dt.UTC)

        async def post(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
            try:
                await self.client.post_event(body, type_=type_, reason=reason,
                                             message=message, now=timestamp(now))
            except ApiError as error:
                logger.warning("could not post event %s: %s", reason, error)

        seen = await reconcile_dataset(self.ledgers, namespace, name, now, post)
        last = self._dataset_seen.get((namespace, name))
        if seen is not None:
            self._dataset_seen[(namespace, name)] = seen
        # Wake the waiting jobs only when budget freed: every status write of the dataset is an
        # event, and most free nothing.
        return seen is not None and (last is None or seen[0] < last[0] or seen[1] > last[1])

    def _decision_settings(self) -> Settings:
        kind = ("JobSet", JOBSET_API) if self.config.use_jobset else ("Job", "batch/v1")
        return dataclasses.replace(self.config.decisions, workload_kind=kind[0],
                                   workload_api_version=kind[1])

    async def _observe(self, body: Mapping[str, Any]) -> Observed:
        job = JobRef.from_body(body)
        names = ChildNames.of(job.name)
        paths = {"workload": workload_path(self.config, job.namespace, names.workload),
                 "prepare": resource_path("batch/v1", "jobs", job.namespace, names.prepare),
                 "export": resource_path("batch/v1", "jobs", job.namespace, names.export)}
        states: dict[str, ChildState | None] = {}
        bodies: dict[str, dict[str, Any] | None] = {}
        for key, path in paths.items():
            bodies[key] = await self.client.get(path)
            state, foreign = child_state(bodies[key], job.uid)
            if foreign:
                # Left over from an earlier job of the same name: it is not ours to keep.
                await self.client.delete(path)
            states[key] = state
        config = await self.client.get(resource_path("v1", "configmaps", job.namespace,
                                                     names.config_map))
        pods = None
        if states["workload"] is not None:
            # Scheduling, disruptions and termination messages are on the pods (_pod_status).
            selector = f"{LABEL_JOB}={job.name},{LABEL_COMPONENT}=trainer"
            listed = await self.client.list(resource_path("v1", "pods", job.namespace),
                                            label_selector=selector)
            # Only this attempt's pods: an earlier attempt's may still be terminating.
            attempt = ((bodies["workload"] or {}).get("metadata") or {}).get(
                "annotations", {}).get(ANNOTATION_RESTART)
            pods = pods_view(p for p in listed
                             if ((p.get("metadata") or {}).get("annotations") or {}).get(
                                 ANNOTATION_RESTART) == attempt)
        prepare_pods = None
        if states["prepare"] is not None and states["prepare"].failed:
            # Its last words go into the DataPrepared condition.
            prepare_pods = pods_view(await self.client.list(
                resource_path("v1", "pods", job.namespace),
                label_selector=f"{LABEL_JOB}={job.name},{LABEL_COMPONENT}=prepare"))
        return Observed(workload=states["workload"], prepare=states["prepare"],
                        export=states["export"],
                        config=config_state(config), config_observed=True, pods=pods,
                        prepare_pods=prepare_pods)

    @staticmethod
    def _observe_metrics(namespace: str, name: str, body: Mapping[str, Any],
                         decision: Decision) -> None:
        privacy = dict((body.get("status") or {}).get("privacy") or {})
        privacy.update(decision.status.get("privacy") or {})
        if "epsilonBudget" not in privacy and decision.spec is not None:
            # Accepted but not planned yet (Pending, Preparing, waiting for a dataset): the
            # ledger does not exist, but the budget is known and nothing is spent. Dashboards
            # and alerts see the job from the start, not only once it is planned.
            privacy = {"epsilonBudget": decision.spec.privacy.epsilon, "epsilonSpent": 0.0,
                       "stepsCharged": 0, **privacy}
        evaluation = (decision.status.get("evaluation")
                      or (body.get("status") or {}).get("evaluation") or {})
        _metrics.observe_job(
            namespace, name, phase=decision.phase,
            epsilon_spent=privacy.get("epsilonSpent"),
            epsilon_budget=privacy.get("epsilonBudget"),
            steps_charged=privacy.get("stepsCharged"),
            eval_loss=evaluation.get("loss"), eval_perplexity=evaluation.get("perplexity"))
