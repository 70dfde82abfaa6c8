"""The I/O edge of dataset budgets: the DPDataset's ledger, read and written safely.

The dataset's ledger of charges lives in its own ``status.charges`` (users' roles do not include
``/status``; trainers have no rights on DPDatasets). Every change of it goes through
:meth:`DatasetLedgers.change`: under an in-process :class:`asyncio.Lock` per dataset (the operator
is one process; kopf runs handlers of different jobs concurrently) it reads the dataset fresh,
applies a pure function to its charges, and writes them with a ``resourceVersion``-guarded
merge-patch (a 409 means someone else wrote in between: read and apply again). A reservation is
written this way *before* the job's workload is created, so an operator restart cannot lose it.

Deleting a DPDataset that has charged jobs is refused: while any charge has run, the dataset
carries the finalizer ``dptrain.io/dataset-ledger``, so a ``kubectl delete`` only marks it
(``DeletionBlocked`` condition, Warning event) and its record stays. Privacy loss cannot be undone,
so neither can its record; an administrator who really wants it gone removes the finalizer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pydantic

from dptrain.api import (
    API_VERSION,
    DATASET_PLURAL,
    PLURAL,
    Condition,
    DatasetCharge,
    DPDatasetSpec,
    DPDatasetStatus,
)
from dptrain.operator import _dataset_budget as budget
from dptrain.operator import _metrics
from dptrain.operator._conditions import set_condition
from dptrain.operator._kube import ApiError, KubeClient, resource_path
from dptrain.operator._observed import DatasetView

logger = logging.getLogger("dptrain.operator")

FINALIZER = "dptrain.io/dataset-ledger"

Change = Callable[[list[DatasetCharge]], list[DatasetCharge] | None]


def dataset_path(namespace: str, name: str, subresource: str | None = None) -> str:
    """REST path of a DPDataset."""
    return resource_path(API_VERSION, DATASET_PLURAL, namespace, name, subresource)


def parse_view(name: str, body: dict[str, Any] | None) -> DatasetView:
    """A DPDataset's body as a decision reads it (spec None: absent or unreadable)."""
    if body is None:
        return DatasetView(name=name)
    try:
        spec: DPDatasetSpec | None = DPDatasetSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError:
        spec = None
    return DatasetView(name=name, spec=spec, charges=tuple(_charges(body)),
                       uid=(body.get("metadata") or {}).get("uid"))


def _charges(body: dict[str, Any]) -> list[DatasetCharge]:
    out: list[DatasetCharge] = []
    for raw in (body.get("status") or {}).get("charges") or []:
        try:
            out.append(DatasetCharge.model_validate(raw))
        except pydantic.ValidationError:
            logger.warning("ignoring an unreadable charge on a DPDataset: %r", raw)
    return out


def _dump(charges: Sequence[DatasetCharge]) -> list[dict[str, Any]]:
    return [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in charges]


class DatasetLedgers:
    """Serialised, durable changes of DPDatasets' ledgers (see the module docstring)."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        #: Jobs waiting for budget on a dataset: poked when its ledger changes.
        self.waiting: dict[tuple[str, str], set[str]] = {}

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        """The in-process lock of one dataset."""
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    async def view(self, namespace: str, name: str) -> DatasetView:
        """The dataset as it is now."""
        return parse_view(name, await self.client.get(dataset_path(namespace, name)))

    async def change(self, namespace: str, name: str, change: Change) -> bool:
        """Apply ``change`` to the charges under the lock.

        Returns False if the dataset is gone or ``change`` declined (returned None).
        """
        async with self.lock(namespace, name):
            return await self._change_locked(namespace, name, change)

    async def _change_locked(self, namespace: str, name: str, change: Change) -> bool:
        for _ in range(10):
            body = await self.client.get(dataset_path(namespace, name))
            if body is None:
                return False
            charges = _charges(body)
            new = await asyncio.to_thread(change, list(charges))
            if new is None:
                return False
            if _dump(new) == _dump(charges):
                return True
            meta = body.get("metadata") or {}
            patch: dict[str, Any] = {"metadata": {"resourceVersion": meta.get("resourceVersion")},
                                     "status": {"charges": _dump(new)}}
            try:
                await self.client.merge_patch(dataset_path(namespace, name, "status"), patch)
            except ApiError as error:
                if error.status == 409:
                    continue  # written in between: read again and re-apply
                raise
            if any(c.steps_charged > 0 for c in new) and FINALIZER not in (
                    meta.get("finalizers") or []):
                await self._add_finalizer(namespace, name)
            return True
        raise ApiError(409, "Conflict", f"DPDataset {namespace}/{name} kept changing")

    async def _add_finalizer(self, namespace: str, name: str) -> None:
        for _ in range(10):
            body = await self.client.get(dataset_path(namespace, name))
            if body is None:
                return
            meta = body.get("metadata") or {}
            finalizers = list(meta.get("finalizers") or [])
            if FINALIZER in finalizers:
                return
            try:
                await self.client.merge_patch(dataset_path(namespace, name), {"metadata": {
                    "resourceVersion": meta.get("resourceVersion"),
                    "finalizers": [*finalizers, FINALIZER]}})
                return
            except ApiError as error:
                if error.status != 409:
                    raise

    async def reserve(self, namespace: str, name: str, spec: DPDatasetSpec | None,
                      charge: DatasetCharge) -> bool:
        """Write ``charge`` if it still fits (re-checked on the fresh ledger, under the lock)."""
        def apply(charges: list[DatasetCharge]) -> list[DatasetCharge] | None:
            assert spec is not None
            if not budget.admit(spec, charges, charge).fits:
                return None
            return budget.with_charge(charges, charge)

        async with self.lock(namespace, name):
            view = await self.view(namespace, name)
            if view.spec is None:
                return False
            spec = view.spec
            return await self._change_locked(namespace, name, apply)

    async def record_steps(self, namespace: str, name: str, uid: str, steps: int,
                           final: bool) -> None:
        """Copy a job's ledger count into its charge (never lowered)."""
        await self.change(namespace, name,
                          lambda charges: budget.update_steps(charges, uid, steps, final))


async def reconcile_dataset(ledgers: DatasetLedgers, namespace: str, name: str,
                            now: dt.datetime,
                            post_event: Callable[[dict[str, Any], str, str, str],
                                                 Awaitable[None]]) -> tuple[float, float] | None:
    """Release charges of deleted jobs, publish the summary, guard deletion, set metrics.

    Returns (committed ε, budget) when the dataset exists and is readable.
    """
    client = ledgers.client
    path = dataset_path(namespace, name)
    body = await client.get(path)
    if body is None:
        _metrics.forget_dataset(namespace, name)
        return None
    view = parse_view(name, body)

    async def job_alive(charge: DatasetCharge) -> bool:
        job = await client.get(resource_path(API_VERSION, PLURAL, namespace, charge.job))
        return job is not None and (job.get("metadata") or {}).get("uid") == charge.uid

    gone = [c.uid for c in view.charges if c.state != "Charged" and not await job_alive(c)]
    if gone:
        def drop(charges: list[DatasetCharge]) -> list[DatasetCharge]:
            for uid in gone:
                charges = budget.release(charges, uid)
            return charges

        await ledgers.change(namespace, name, drop)
        body = await client.get(path)
        if body is None:
            return None
        view = parse_view(name, body)
    meta = body.get("metadata") or {}
    old = DPDatasetStatus.model_validate(body.get("status") or {})
    conditions: list[Condition] = list(old.conditions)
    generation = int(meta.get("generation") or 1)
    if view.spec is None:
        conditions, _ = set_condition(conditions, type_="Ready", status="False",
                                      reason="InvalidSpec", message="the spec is not readable",
                                      now=now, generation=generation)
        await client.merge_patch(path + "/status", {"status": {"conditions": [
            c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in conditions]}})
        return None
    summary = await asyncio.to_thread(budget.summarize, view.spec, view.charges)
    budget_eps = view.spec.privacy.epsilon
    ran = [c for c in view.charges if c.steps_charged > 0]
    fits = summary.remaining > 0
    conditions, _ = set_condition(
        conditions, type_="Ready", status="True", reason="LedgerReady",
        message=f"{len(view.charges)} job(s) charged", now=now, generation=generation)
    conditions, changed = set_condition(
        conditions, type_="BudgetAvailable", status="True" if fits else "False",
        reason="Available" if fits else "Exhausted",
        message=f"ε spent {summary.spent:.4g}, reserved {summary.reserved:.4g}, remaining "
                f"{summary.remaining:.4g} of {budget_eps:g}", now=now, generation=generation)
    if changed and not fits:
        await post_event(body, "Warning", "BudgetExhausted",
                         f"no ε left: {summary.committed:.4g} of {budget_eps:g} committed")
    deleting = bool(meta.get("deletionTimestamp"))
    if deleting and ran:
        conditions, changed = set_condition(
            conditions, type_="DeletionBlocked", status="True", reason="ChargedJobs",
            message=f"{len(ran)} job(s) have spent this dataset's budget; its record is kept "
                    f"(finalizer {FINALIZER})", now=now, generation=generation)
        if changed:
            await post_event(body, "Warning", "DeletionBlocked",
                             f"{len(ran)} job(s) have spent this dataset's budget; the record "
                             "is kept")
    status = {
        "epsilonSpent": summary.spent, "epsilonReserved": summary.reserved,
        "epsilonRemaining": summary.remaining, "epsilonBudget": budget_eps,
        "jobs": len(view.charges), "observedGeneration": generation,
        "conditions": [c.model_dump(mode="json", by_alias=True, exclude_none=True)
                       for c in conditions],
    }
    current = {k: (body.get("status") or {}).get(k) for k in status}
    if current != status:
        await client.merge_patch(path + "/status", {"status": status})
    _metrics.observe_dataset(namespace, name, spent=summary.spent, reserved=summary.reserved,
                             budget=budget_eps)
    if deleting and not ran and FINALIZER in (meta.get("finalizers") or []):
        finalizers = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
        await client.merge_patch(path, {"metadata": {"finalizers": finalizers}})
    return summary.committed, budget_eps
