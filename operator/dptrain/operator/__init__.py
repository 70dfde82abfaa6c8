"""The dptrain Kubernetes operator (kopf): DPTrainingJob → plan → JAX workload, ε enforced.

Handlers are thin (``_handlers``): they trigger a level-triggered reconcile (``_reconciler``)
that reads the job and its children, calls the pure :func:`decide` (``_decisions``, with its
parts ``_observed``, ``_draft``, ``_spec_changes``, ``_phases`` and ``_admission``; the planner
and the accountant behind ``_tools``) and the pure ``build_*`` functions (``_children``), and
writes the result. The operator keeps the privacy ledger with its own accountant
(``_accounting``) in an annotation (``_ledger_record``).
"""

from dptrain.api import CONFIG_PATH
from dptrain.operator._accounting import Accountant, mechanism_of
from dptrain.operator._children import (
    ChildNames,
    JobRef,
    PodSizing,
    build_config_map,
    build_role,
    build_role_binding,
    build_service_account,
    trainer_config,
)
from dptrain.operator._decisions import decide
from dptrain.operator._draft import Decision, Event
from dptrain.operator._metrics import REGISTRY
from dptrain.operator._observed import ChildState, Observed, Settings
from dptrain.operator._runner import OperatorOptions, operate, run
from dptrain.operator._workloads import (
    build_headless_service,
    build_jobset,
    build_prepare_job,
    build_trainer_job,
)

__all__ = [
    "CONFIG_PATH",
    "REGISTRY",
    "Accountant",
    "ChildNames",
    "ChildState",
    "Decision",
    "Event",
    "JobRef",
    "Observed",
    "OperatorOptions",
    "PodSizing",
    "Settings",
    "build_config_map",
    "build_headless_service",
    "build_jobset",
    "build_prepare_job",
    "build_role",
    "build_role_binding",
    "build_service_account",
    "build_trainer_job",
    "decide",
    "mechanism_of",
    "operate",
    "run",
    "trainer_config",
]
