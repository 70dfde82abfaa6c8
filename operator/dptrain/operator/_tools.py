"""The operator's tools adapter: the planner and the accountant as decisions' ``Tools``.

:class:`OperatorTools` implements :class:`~dptrain.operator._observed.Tools`.

``make_plan`` is deterministic for the same spec and dataset size, so its results are memoised
in-process by (spec, N): a reconcile re-planning the same job (after an operator restart, or to
size pods again for a restart) costs a dictionary look-up, not a search.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict

from dptrain.api import DPTrainingJobSpec, PlanStatus
from dptrain.operator._accounting import Accountant
from dptrain.operator._children import PodSizing
from dptrain.planner import make_plan
from dptrain.planner._plan import Plan

_MEMO_SIZE = 2048


class OperatorTools:
    """Planner and accountant behind one small interface, with memoised plans."""

    def __init__(self, *, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.accountant = Accountant()
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
        """The planner's plan as ``status.plan`` (raises ValueError if no plan fits)."""
        return self._plan(spec, dataset_size).to_status()

    def pod_sizing(self, spec: DPTrainingJobSpec, plan: PlanStatus) -> PodSizing:
        """Pod resources, node selectors and tolerations for ``plan``'s hosts."""
        try:
            pod = self._plan(spec, plan.dataset_size).pod
        except ValueError:
            # An amended spec (e.g. more iterations) may not plan on its own; the pods of the
            # running plan only depend on its hosts, so fall back to a plain sizing.
            return PodSizing(hosts=plan.hosts)
        return PodSizing(hosts=plan.hosts, resources=pod.resources,
                         node_selector=pod.node_selector, tolerations=tuple(pod.tolerations))

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
