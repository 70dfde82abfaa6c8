"""What one reconcile decision reads: the observed children, the settings and the tools.

Plain, frozen records built by the reconciler (``_reconciler``) from what it read, and the
:class:`Tools` protocol through which decisions reach the planner and the accountant (the
operator's ``_tools.OperatorTools``; tests pass fakes).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any, Protocol

from dptrain.api import (
    DatasetCharge,
    DPDatasetSpec,
    DPTrainingJobSpec,
    PlanStatus,
)
from dptrain.operator._pod_status import PodsView


class Tools(Protocol):
    """The deterministic, possibly slow functions a decision needs."""

    def plan(self, spec: DPTrainingJobSpec, dataset_size: int) -> PlanStatus:
        """The planner's plan (raises ValueError, e.g. InfeasibleBudgetError, if none fits)."""
        ...

    def enforce(self, plan: PlanStatus, budget: float, delta: float, *,
                iterations: int | None = None) -> PlanStatus:
        """The plan with maxSteps/epsilonPlanned from the operator's own accountant."""
        ...

    def epsilon_spent(self, plan: PlanStatus, delta: float, steps: int) -> float:
        """ε after ``steps`` steps of the plan (never below the true value)."""
        ...

    def epsilon_exact(self, plan: PlanStatus, delta: float, steps: int) -> float:
        """The exact ε of ``steps`` steps of the plan's mechanism."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Timing knobs of the decisions (seconds)."""

    stall_timeout: float = 900.0
    restart_backoff: float = 10.0
    max_restart_backoff: float = 300.0
    report_grace: float = 30.0
    pod_poll: float = 15.0
    """How often pods that are not all scheduled are looked at again (pods are not watched)."""
    workload_api_version: str = "batch/v1"
    workload_kind: str = "Job"
    export: bool = True
    """Export finished models (on a checkpoint volume) with an export Job."""

    def backoff(self, restarts: int) -> float:
        """Delay before restart number ``restarts`` (1-based): exponential, capped."""
        return float(min(self.max_restart_backoff,
                         self.restart_backoff * 2.0 ** max(0, restarts - 1)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChildState:
    """What the operator observed of a child Job (or JobSet)."""

    name: str
    complete: bool = False
    failed: bool = False
    deleting: bool = False
    suspended: bool = False
    """``spec.suspend`` is true: waiting for admission (Kueue), or preempted by it."""
    message: str = ""
    created: dt.datetime | None = None
    finished: dt.datetime | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConfigState:
    """The trainer's ConfigMap as observed.

    Attributes:
        config: its parsed ``config.json`` (None: missing or not JSON).
        immutable: whether it is marked ``immutable: true``.
    """

    config: Mapping[str, Any] | None
    immutable: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetView:
    """The DPDataset a job refers to, as read for this reconcile.

    Attributes:
        name: the dataset's name.
        spec: its spec (None: it does not exist, or its spec is unreadable).
        charges: its ledger of charges (``status.charges``).
        uid: its uid (None: it does not exist).
    """

    name: str
    spec: DPDatasetSpec | None = None
    charges: tuple[DatasetCharge, ...] = ()
    uid: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Observed:
    """The children that exist now (None: absent).

    ``config`` is looked at only when ``config_observed`` (the reconciler read the ConfigMap).
    """

    workload: ChildState | None = None
    prepare: ChildState | None = None
    export: ChildState | None = None
    config: ConfigState | None = None
    config_observed: bool = False
    dataset: DatasetView | None = None
    pods: PodsView | None = None
    """The workload's trainer pods (None: not looked at, or no workload)."""
    prepare_pods: PodsView | None = None
    """The data-preparation pods, looked at when that Job failed."""
