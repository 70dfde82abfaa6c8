"""The operator's tools adapter: the planner and the accountant as decisions' ``Tools``.

:class:`OperatorTools` implements :class:`~dptrain.operator._observed.Tools`.

``make_plan`` is deterministic for the same spec and dataset size, so its results are memoised
in-process by (spec, N): a reconcile re-planning the same job (after an operator restart, before
its status write landed) costs a dictionary look-up, not a search.

A plan carries its trainer pods (``status.plan.pods``), sized once here with the planner's pod and
fitted to the accelerator profile's nodes (``_fit``); workloads are built from that record and
never from a re-plan.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict

from dptrain.api import DPTrainingJobSpec, PlanStatus
from dptrain.operator._accounting import Accountant
from dptrain.operator._fit import size_pods
from dptrain.operator._profiles import Placements, placements
from dptrain.planner import make_plan
from dptrain.planner._plan import Plan

_MEMO_SIZE = 2048
_default_placements = placements


class OperatorTools:
    """Planner and accountant behind one small interface, with memoised plans."""

    def __init__(self, *, cache_dir: str | os.PathLike[str] | None = None,
                 placements: Placements | None = None) -> None:
        self.accountant = Accountant()
        self.placements = placements if placements is not None else _default_placements()
        self._cache_dir = cache_dir
        self._plans: OrderedDict[tuple[str, int], Plan] = OrderedDict()
        self._lock = threading.Lock()

    def _plan(self, spec: DPTrainingJobSpec, dataset_size: int) -> Plan:
        key = (json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True),
               dataset_size)
        with self._lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key]
        plan = make_plan(spec, dataset_size=dataset_size, cache_dir=self._cache_dir)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > _MEMO_SIZE:
                self._plans.popitem(last=False)
        return plan

    def plan(self, spec: DPTrainingJobSpec, dataset_size: int) -> PlanStatus:
        """The planner's plan as ``status.plan``, with its pods sized and fitted.

        Raises:
            ValueError: no plan fits the budgets (``InfeasibleBudgetError``), or its pods fit
                no node of the profile (``PodsDoNotFitError``).
        """
        plan = self._plan(spec, dataset_size)
        pods = size_pods(plan.pod, self.placements, spec.compute.accelerator)
        return plan.to_status().model_copy(update={"pods": pods})

    def enforce(self, plan: PlanStatus, budget: float, delta: float, *,
                iterations: int | None = None) -> PlanStatus:
        """See :meth:`Accountant.enforce`."""
        return self.accountant.enforce(plan, budget, delta, iterations=iterations)

    def epsilon_spent(self, plan: PlanStatus, delta: float, steps: int) -> float:
        """See :meth:`Accountant.epsilon_spent`."""
        return self.accountant.epsilon_spent(plan, delta, steps)

    def epsilon_exact(self, plan: PlanStatus, delta: float, steps: int) -> float:
        """See :meth:`Accountant.epsilon_exact`."""
        return self.accountant.epsilon_exact(plan, delta, steps)
