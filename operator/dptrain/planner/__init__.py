"""The DP scaling-law planner: budgets in, a training plan and pod sizes out (pure Python).

``make_plan(spec, dataset_size=N)`` searches model size, batch, steps and noise the way McKenna et
al. (2025) do — a σ table from our accountant and a loss model interpolated from measured
results — and sizes the pods that run the plan. Cost is counted in time as well as FLOPs (a
step-time model; batches that leave the hardware idle are not picked unless nothing else fits);
beyond the measured table the plan rests on the paper's published optima (Table 2); far
extrapolation of the table is refused unless allowed. No JAX: the operator imports this.
"""

from dptrain.planner._accelerators import (
    ACCELERATORS,
    AcceleratorSpec,
    Slice,
    candidate_slices,
    get_accelerator,
)
from dptrain.planner._defaults import (
    DEFAULT_PROVENANCE,
    DEFAULT_TABLE,
    default_loss_model,
    default_provenance,
)
from dptrain.planner._errors import ExtrapolationError, InfeasibleBudgetError
from dptrain.planner._finalize import DEFAULT_LEARNING_RATE
from dptrain.planner._loss_model import LossModel, TableLossModel
from dptrain.planner._paper import TABLE2, PaperAnchor, noise_regime, paper_optimum
from dptrain.planner._plan import Bound, Candidate, Plan
from dptrain.planner._plan_privacy import (
    GEOMETRIC_POINTS,
    LINEAR_POINTS,
    PlanMechanismFields,
    mechanism_of,
    plan_curve,
    plan_grid,
)
from dptrain.planner._planner import frontier, make_plan
from dptrain.planner._pods import (
    DEFAULT_TARGET_WALL_SECONDS,
    MemoryEstimate,
    PodPlan,
    memory_estimate,
    size_pod,
)
from dptrain.planner._presets import (
    BYTE_VOCAB_SIZE,
    MAX_SCALED_LAYERS,
    PRESETS,
    ModelShape,
    family_shape,
    get_preset,
    scaled_shape,
)
from dptrain.planner._pretrained import FIXED_BY_PRETRAINED, pretrained_shape, pretrained_status
from dptrain.planner._search import SearchSpace
from dptrain.planner._sigma_table import SigmaSurface, SigmaTable, default_cache_dir
from dptrain.planner._step_time import (
    COLLAPSE_FRACTION,
    STEP_TIME_MODELS,
    StepTimeModel,
    step_time_model,
)
from dptrain.planner._sweep_table import REQUIRED_COLUMNS, read_results_csv

__all__ = [
    "ACCELERATORS",
    "BYTE_VOCAB_SIZE",
    "COLLAPSE_FRACTION",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_PROVENANCE",
    "DEFAULT_TABLE",
    "DEFAULT_TARGET_WALL_SECONDS",
    "FIXED_BY_PRETRAINED",
    "GEOMETRIC_POINTS",
    "LINEAR_POINTS",
    "MAX_SCALED_LAYERS",
    "PRESETS",
    "REQUIRED_COLUMNS",
    "STEP_TIME_MODELS",
    "TABLE2",
    "AcceleratorSpec",
    "Bound",
    "Candidate",
    "ExtrapolationError",
    "InfeasibleBudgetError",
    "LossModel",
    "MemoryEstimate",
    "ModelShape",
    "PaperAnchor",
    "Plan",
    "PlanMechanismFields",
    "PodPlan",
    "SearchSpace",
    "SigmaSurface",
    "SigmaTable",
    "Slice",
    "StepTimeModel",
    "TableLossModel",
    "candidate_slices",
    "default_cache_dir",
    "default_loss_model",
    "default_provenance",
    "family_shape",
    "frontier",
    "get_accelerator",
    "get_preset",
    "make_plan",
    "mechanism_of",
    "memory_estimate",
    "noise_regime",
    "paper_optimum",
    "plan_curve",
    "plan_grid",
    "pretrained_shape",
    "pretrained_status",
    "read_results_csv",
    "scaled_shape",
    "size_pod",
    "step_time_model",
]
