"""``make_plan``: from a job's budgets and pins to a :class:`Plan` (McKenna et al. 2025, §search).

Steps: check the budgets and pins; search (model, batch, steps) on log grids with σ from the σ
table and loss from the loss model (pins narrow the grid to one value); walk the ranking until a
configuration also fits the hardware budgets (accelerator-hours, deadline, memory); then
re-calibrate its σ exactly with the job's accountant, size the physical batch and the pods, and
report the runners-up and what bounds the plan. The same inputs and tables give the same plan.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import pathlib
from typing import Any

import numpy as np

from dptrain.api import DPTrainingJobSpec, FieldError, InvalidJobError
from dptrain.planner._accelerators import AcceleratorSpec, candidate_slices, get_accelerator
from dptrain.planner._defaults import default_loss_model
from dptrain.planner._errors import (
    ExtrapolationError,
    InfeasibleBudgetError,
    round_down,
    round_up,
)
from dptrain.planner._exact import ExactAccounting
from dptrain.planner._finalize import PlanContext, finalize
from dptrain.planner._loss_model import LossModel, TableLossModel
from dptrain.planner._paper import PaperAnchor, paper_optimum
from dptrain.planner._plan import Plan
from dptrain.planner._pods import size_pod
from dptrain.planner._presets import (
    BYTE_VOCAB_SIZE,
    MAX_SCALED_LAYERS,
    PRESETS,
    ModelShape,
    family_shape,
    get_preset,
)
from dptrain.planner._search import NEAR_OPTIMAL_RTOL, SearchResult, SearchSpace, search
from dptrain.planner._sigma_table import SigmaTable, default_cache_dir
from dptrain.planner._step_time import StepTimeModel, step_time_model
from dptrain.privacy import physical_batch_size_for

MAX_HARDWARE_TRIES = 200
SEARCHED_PRESETS = ("tiny", "small", "base", "medium", "large", "xl")
"""Named presets the unpinned search considers besides the scaled family (vaultgemma-1b has
Gemma's 256K vocabulary and is used only when pinned)."""
SUPPORT_T_FACTOR = 8.0
"""Guard rail: the loss model is trusted up to this multiple of its longest measured curve."""
SUPPORT_M_FACTOR = 2.0
"""Guard rail: … and within this factor of its smallest and largest model."""
SUPPORT_RATIO_FACTOR = 4.0
"""Guard rail: … and up to this multiple of its noisiest σ̄ (less noise is pessimistic: allowed)."""
PAPER_ABOVE_TABLE = 2.0
"""The paper's Table 2 anchors a plan when its optimal M exceeds the table's largest model by
more than this factor (the measured table cannot reach the configuration the paper implies)."""


def make_plan(spec: DPTrainingJobSpec, *, dataset_size: int,
              table: LossModel | str | os.PathLike[str] | None = None,
              model: ModelShape | None = None, sigma_table: SigmaTable | None = None,
              cache_dir: str | os.PathLike[str] | None = None,
              search_space: SearchSpace | None = None,
              now: dt.datetime | None = None, allow_extrapolation: bool = False,
              step_time: StepTimeModel | None = None) -> Plan:
    """Plan a DP training job.

    Args:
        spec: the job's spec (budgets and pins).
        dataset_size: N, sequences in the prepared dataset.
        table: the loss model, or a results CSV to build a :class:`TableLossModel` from;
            default: the table shipped with dptrain.
        model: pin a model shape directly (overrides ``spec.model.preset``).
        sigma_table: the σ table to use (default: one for the spec's δ under ``cache_dir``).
        cache_dir: where σ tables and exact calibrations are cached (default
            ``$DPTRAIN_CACHE_DIR`` or ``~/.cache/dptrain``).
        search_space: grid bounds.
        now: the time deadlines are measured from (default: the current time).
        allow_extrapolation: plan even when every affordable configuration rests on the loss
            model far outside its data (default: refuse, see :class:`ExtrapolationError`).
        step_time: per-step time model (default: the accelerator kind's).

    Raises:
        InvalidJobError: a pin breaks a rule (names the spec field).
        InfeasibleBudgetError: no configuration fits the budgets (names the budget, the
            shortfall and the nearest feasible value).
        ExtrapolationError: only far extrapolation would plan (see ``allow_extrapolation``).
    """
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    loss_model = _loss_model(table)
    space = search_space or SearchSpace()
    privacy, data, training, compute = spec.privacy, spec.data, spec.training, spec.compute
    n, seq_len, eps, delta = int(dataset_size), data.sequence_length, privacy.epsilon, privacy.delta
    if n < 1:
        raise InfeasibleBudgetError("data", f"the dataset has {n} sequences",
                                    field="spec.data.numSequences", required=1, available=n)
    if delta >= 1.0 / n:
        raise InfeasibleBudgetError(
            "data", f"δ = {delta:g} must be below 1/N = {1.0 / n:.3g} for N = {n} sequences; "
            f"nearest feasible: δ ≤ {round_down(0.1 / n):g}, or at least "
            f"{math.floor(1.0 / delta) + 1} sequences", field="spec.privacy.delta",
            required=1.0 / n, available=delta)
    accelerator = get_accelerator(compute.accelerator)
    shapes, pins = _check_pins(spec, n, model, accelerator)
    timing = step_time or step_time_model(accelerator.kind)
    util = compute.utilization or timing.peak_utilization or accelerator.default_utilization
    budget = _compute_budget(spec, accelerator, util)

    batches = (np.array([training.batch_size]) if training.batch_size is not None
               else space.batches(n))
    steps = (np.array([training.iterations]) if training.iterations is not None
             else space.steps())
    free = len(shapes) > 1 and training.batch_size is None and training.iterations is None
    anchor = paper_optimum(n, eps, budget, seq_len)
    source = "measured"
    if free and anchor.in_domain and \
            anchor.model_params > PAPER_ABOVE_TABLE * _table_max_params(loss_model):
        source = "paper"
        shapes, batches, steps = _anchored_grid(anchor, shapes, n, seq_len, budget, space)
    table_sigma = sigma_table or SigmaTable(delta, cache_dir=cache)
    fully_pinned = training.noise_multiplier is not None and training.iterations is not None
    one_point = len(shapes) == 1 and len(batches) == 1 and len(steps) == 1
    result = search(shapes, dataset_size=n, seq_len=seq_len, epsilon=eps,
                    # A single pinned point needs no table: its σ is calibrated exactly below
                    # (and an unreachable ε is reported there).
                    table=_placeholder_sigma if one_point else table_sigma,
                    loss_model=loss_model, batches=batches, steps=steps, compute_budget=budget,
                    sigma_pinned=None if fully_pinned else training.noise_multiplier)
    if result.n_compute_feasible == 0:
        _raise_compute(shapes, batches, steps, seq_len, budget, spec)
    if len(result) == 0:
        _raise_privacy(shapes, n, seq_len, eps, table_sigma, loss_model, batches, steps, budget,
                       training.noise_multiplier)

    deadline_s = _deadline_seconds(compute.deadline, now)
    # Object-storage checkpoints are staged per host and uploaded: orbax's multi-host save needs
    # one directory all hosts share, so a job with checkpoint.uri runs on one host.
    max_hosts = 1 if spec.checkpoint.uri is not None else compute.max_hosts
    slices = candidate_slices(accelerator, max_hosts=max_hosts,
                              max_chips_per_host=compute.max_chips_per_host,
                              topology=compute.tpu_topology)
    if spec.checkpoint.uri is not None and not any(sl.hosts == 1 for sl in slices):
        raise InfeasibleBudgetError(
            "compute", f"TPU topology {compute.tpu_topology} needs several hosts, and "
            "object-storage checkpoints are written by single-host jobs only; use a "
            "single-host topology, or checkpoint.volume (ReadWriteMany) with checkpoint.path",
            field="spec.checkpoint.uri")
    order = _preference(result, budget is not None or training.iterations is not None)
    if source == "paper":
        # The anchor's steps first, then shorter runs: the table cannot rank what it does not
        # reach, so its predicted losses play no part here.
        order = np.argsort(-result.steps, kind="stable")
    params = np.array([s.param_count for s in shapes], float)[result.model_index]
    collapsed = np.asarray(timing.collapsed(result.batch.astype(float) * seq_len), bool)
    supported = np.ones(len(result), bool)
    guard_notes: list[str] = []
    if source == "measured" and free:
        supported = _supported(loss_model, params, result.steps, result.ratio)
        if not supported.any():
            best = int(order[0])
            reasons = loss_model.extrapolation(float(params[best]), float(result.steps[best]),
                                               float(result.ratio[best]))
            if not allow_extrapolation:
                raise ExtrapolationError(
                    "refused: every affordable configuration rests on the loss model far "
                    "outside its data (" + "; ".join(reasons) + "); measure a table that "
                    "covers this budget (dptrain sweep), or plan anyway with "
                    "--allow-extrapolation", reasons)
            guard_notes.append("planned with --allow-extrapolation: " + "; ".join(reasons))
            supported[:] = True
    # Tiers: supported and not collapsed; supported but collapsed (only when nothing else
    # fits); each tier in the preference order.
    tiers = [order[supported[order] & ~collapsed[order]],
             order[supported[order] & collapsed[order]]]
    order = np.concatenate(tiers)
    context = PlanContext(source=source, anchor=anchor, timing=timing, util=util,
                       accelerator=accelerator,
                       eligible=supported & ~collapsed if len(tiers[0]) else supported,
                       notes=tuple(guard_notes))
    errors: list[InfeasibleBudgetError] = []
    for idx in order[:MAX_HARDWARE_TRIES]:
        shape = shapes[int(result.model_index[idx])]
        b, t = int(result.batch[idx]), int(result.steps[idx])
        physical = training.physical_batch_size or physical_batch_size_for(
            b, dataset_size=n, steps=t, delta=delta, epsilon_budget=eps)
        try:
            pod = size_pod(shape, accelerator, slices, seq_len=seq_len, iterations=t,
                           physical_batch=physical, optimizer=training.optimizer,
                           microbatch_size=training.microbatch_size,
                           physical_pinned=training.physical_batch_size is not None,
                           utilization=util, target_wall_seconds=deadline_s,
                           step_time=timing)
        except InfeasibleBudgetError as error:
            errors.append(error)
            continue
        if compute.accelerator_hours is not None and \
                pod.accelerator_hours > compute.accelerator_hours * (1 + 1e-9):
            errors.append(InfeasibleBudgetError(
                "compute", f"needs about {pod.accelerator_hours:.3g} accelerator-hours of "
                f"{accelerator.name}, {compute.accelerator_hours:g} available",
                field="spec.compute.acceleratorHours", required=pod.accelerator_hours,
                available=compute.accelerator_hours))
            continue
        return finalize(spec, shapes, result, int(idx), pod, n, loss_model, budget, pins,
                         ExactAccounting(cache), context)
    raise errors[0] if errors else InfeasibleBudgetError("compute", "no configuration fits")


def _table_max_params(loss_model: LossModel) -> float:
    models = loss_model.describe().get("model_params") or []
    return float(max(models)) if models else math.inf


def _supported(loss_model: LossModel, params: np.ndarray, steps: np.ndarray,
               ratio: np.ndarray) -> np.ndarray:
    """Configurations whose prediction stays near the loss model's data (the guard rails)."""
    info = loss_model.describe()
    models, measured = info.get("model_params"), info.get("measured_steps")
    ratios = info.get("noise_batch_ratios")
    ok = np.ones(len(params), bool)
    if models:
        ok &= (params <= SUPPORT_M_FACTOR * max(models)) & \
            (params >= min(models) / SUPPORT_M_FACTOR)
    if measured:
        ok &= steps <= SUPPORT_T_FACTOR * float(measured[-1])
    if ratios:
        ok &= ratio <= SUPPORT_RATIO_FACTOR * max(ratios)
    return ok


def _anchored_grid(anchor: PaperAnchor, shapes: list[ModelShape], n: int, seq_len: int,
                   budget: float | None,
                   space: SearchSpace) -> tuple[list[ModelShape], np.ndarray, np.ndarray]:
    """The paper-anchored grid: nearest model and batch, steps within the budget (and less)."""
    shape = min(shapes, key=lambda s: abs(math.log(s.param_count / anchor.model_params)))
    batch = int(min(n, max(1, round(anchor.batch_size))))
    steps = max(1, round(anchor.iterations))
    if budget is not None:
        steps = max(1, min(steps, math.floor(budget / (6.0 * shape.param_count * batch
                                                       * seq_len))))
    # Shorter runs too (down to a quarter), for when the pods' wall time, not the FLOPs, binds.
    shorter = {max(1, round(steps * 2.0 ** (-k / space.grid_per_octave)))
               for k in range(2 * space.grid_per_octave + 1)}
    return [shape], np.array([batch]), np.array(sorted(shorter))


def _placeholder_sigma(q: np.ndarray, steps: np.ndarray) -> np.ndarray:
    return np.ones(np.broadcast(q, steps).shape)


def _loss_model(table: LossModel | str | os.PathLike[str] | None) -> LossModel:
    if table is None:
        return default_loss_model()
    if isinstance(table, (str, os.PathLike)):
        return TableLossModel.from_csv(table)
    return table


def _check_pins(spec: DPTrainingJobSpec, n: int, model: ModelShape | None,
                accelerator: AcceleratorSpec) -> tuple[list[ModelShape], tuple[str, ...]]:
    """Validate pins against each other and the data; return the candidate shapes and pins."""
    training, data = spec.training, spec.data
    errors: list[FieldError] = []
    pins = [name for name, value in (
        ("spec.model.preset", spec.model.preset), ("spec.training.batchSize", training.batch_size),
        ("spec.training.iterations", training.iterations),
        ("spec.training.noiseMultiplier", training.noise_multiplier),
        ("spec.training.physicalBatchSize", training.physical_batch_size),
        ("spec.training.microbatchSize", training.microbatch_size),
        ("spec.training.learningRate", training.learning_rate)) if value is not None]
    shapes: list[ModelShape] = []
    if model is not None:
        shapes = [model]
        pins.insert(0, "model")
    elif spec.model.preset is not None:
        try:
            shapes = [get_preset(spec.model.preset)]
        except KeyError:
            errors.append(FieldError("spec.model.preset", "must be a known preset ("
                                     + ", ".join(PRESETS) + ", or scaled-L1 … scaled-L"
                                     + str(MAX_SCALED_LAYERS) + ")", repr(spec.model.preset)))
    else:
        seq = data.sequence_length
        named = [PRESETS[p] for p in SEARCHED_PRESETS if PRESETS[p].max_seq_len >= seq]
        family = [family_shape(k, vocab_size=BYTE_VOCAB_SIZE, max_seq_len=max(4096, seq))
                  for k in range(1, MAX_SCALED_LAYERS + 1)]
        shapes = sorted(named + family, key=lambda s: (s.param_count, s.name))
    if shapes and shapes[0].max_seq_len < data.sequence_length and len(shapes) == 1:
        errors.append(FieldError(
            "spec.data.sequenceLength", f"must be <= {shapes[0].max_seq_len}, the longest "
            f"sequence model {shapes[0].name} supports", str(data.sequence_length)))
    if training.batch_size is not None and training.batch_size > n:
        errors.append(FieldError("spec.training.batchSize", f"must be <= the dataset size "
                                 f"({n} sequences): q = batchSize/N must be <= 1",
                                 str(training.batch_size)))
    if training.physical_batch_size is not None:
        if training.batch_size is not None and training.physical_batch_size < training.batch_size:
            errors.append(FieldError(
                "spec.training.physicalBatchSize", f"must be >= spec.training.batchSize "
                f"({training.batch_size})", str(training.physical_batch_size)))
        if training.microbatch_size is not None and \
                training.microbatch_size > training.physical_batch_size:
            errors.append(FieldError(
                "spec.training.microbatchSize", f"must be <= spec.training.physicalBatchSize "
                f"({training.physical_batch_size})", str(training.microbatch_size)))
    if spec.compute.tpu_topology is not None:
        known = [s.topology for s in accelerator.slices]
        if accelerator.kind != "tpu":
            errors.append(FieldError("spec.compute.tpuTopology", f"is only valid for TPU "
                                     f"accelerators, not {accelerator.name}",
                                     spec.compute.tpu_topology))
        elif spec.compute.tpu_topology not in known:
            errors.append(FieldError("spec.compute.tpuTopology", f"must be a {accelerator.name} "
                                     f"topology ({', '.join(str(k) for k in known)})",
                                     spec.compute.tpu_topology))
    if errors:
        raise InvalidJobError(errors)
    return shapes, tuple(pins)


def _compute_budget(spec: DPTrainingJobSpec, accelerator: AcceleratorSpec,
                    util: float) -> float | None:
    budgets = []
    if spec.compute.flops is not None:
        budgets.append(spec.compute.flops)
    if spec.compute.accelerator_hours is not None:
        # Chip-hours at the assumed utilisation; the chosen pod is checked again below with
        # the physical batch and attention FLOPs, which 6·M·B·S·T leaves out.
        budgets.append(spec.compute.accelerator_hours * 3600.0 * accelerator.peak_flops * util)
    return min(budgets) if budgets else None


def _deadline_seconds(deadline: dt.datetime | None, now: dt.datetime | None) -> float | None:
    if deadline is None:
        return None
    current = now or dt.datetime.now(dt.UTC)
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=dt.UTC)
    if current.tzinfo is None:
        current = current.replace(tzinfo=dt.UTC)
    return max(0.0, (deadline - current).total_seconds())


def _preference(result: SearchResult, bounded: bool) -> np.ndarray:
    """Indices in the order to try.

    Best loss first; without a compute budget, the cheapest configuration within 1% of the best
    loss first (more compute buys < 1%).
    """
    if bounded:
        return np.arange(len(result))
    near = result.loss <= result.loss[0] * (1 + NEAR_OPTIMAL_RTOL)
    near_idx = np.flatnonzero(near)
    cheapest = near_idx[np.lexsort((near_idx, result.flops[near_idx]))]
    rest = np.flatnonzero(~near)
    return np.concatenate([cheapest, rest])


def _raise_compute(shapes: list[ModelShape], batches: np.ndarray, steps: np.ndarray,
                   seq_len: int, budget: float | None, spec: DPTrainingJobSpec) -> None:
    cheapest = 6.0 * min(s.param_count for s in shapes) * float(batches.min()) * seq_len * \
        float(steps.min())
    assert budget is not None  # without a budget every configuration is affordable
    field = "spec.compute.flops" if spec.compute.flops is not None and \
        spec.compute.flops <= budget * (1 + 1e-9) else "spec.compute.acceleratorHours"
    raise InfeasibleBudgetError(
        "compute", f"not one configuration is affordable: the cheapest needs "
        f"C = 6·M·B·S·T = {cheapest:.3g} FLOPs, {cheapest - budget:.3g} more than the "
        f"{budget:.3g} available; nearest feasible: {round_up(cheapest):.3g} FLOPs",
        field=field, required=cheapest, available=budget)


def _raise_privacy(shapes: list[ModelShape], n: int, seq_len: int, eps: float,
                   table: SigmaTable, loss_model: LossModel, batches: np.ndarray,
                   steps: np.ndarray, budget: float | None, sigma: float | None) -> None:
    # Walk ε up in quarter-octaves until some configuration fits: the nearest feasible budget.
    for k in range(1, 41):
        candidate = eps * 2.0 ** (k / 4)
        if candidate > 100:
            break
        trial = search(shapes, dataset_size=n, seq_len=seq_len, epsilon=candidate, table=table,
                       loss_model=loss_model, batches=batches, steps=steps,
                       compute_budget=budget, sigma_pinned=sigma)
        if len(trial):
            raise InfeasibleBudgetError(
                "privacy", f"ε = {eps:g} is too small for any noise multiplier in range with "
                f"these pins and data; about {candidate - eps:.3g} more is needed: nearest "
                f"feasible ε ≈ {round_up(candidate):g}", field="spec.privacy.epsilon",
                required=candidate, available=eps)
    raise InfeasibleBudgetError(
        "privacy", f"ε = {eps:g} is too small for any noise multiplier in range, and no ε up "
        f"to 100 would do with these pins", field="spec.privacy.epsilon", available=eps)


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The JSON keys of ``dptrain plan --json``."""
    return plan.to_dict()


def frontier(spec: DPTrainingJobSpec, *, dataset_size: int, epsilons: list[float],
             compute_budgets: list[float | None],
             table: LossModel | str | os.PathLike[str] | None = None,
             model: ModelShape | None = None, sigma_table: SigmaTable | None = None,
             cache_dir: str | os.PathLike[str] | None = None,
             search_space: SearchSpace | None = None) -> list[dict[str, Any]]:
    """The privacy–utility–compute frontier: best predicted loss per (compute budget, ε).

    Priced with the σ table (no exact re-calibration), with the spec's pins. Infeasible points
    have ``loss`` None.
    """
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    loss_model = _loss_model(table)
    space = search_space or SearchSpace()
    n, training = int(dataset_size), spec.training
    shapes, _ = _check_pins(spec, n, model, get_accelerator(spec.compute.accelerator))
    batches = (np.array([training.batch_size]) if training.batch_size is not None
               else space.batches(n))
    steps = (np.array([training.iterations]) if training.iterations is not None
             else space.steps())
    sig = sigma_table or SigmaTable(spec.privacy.delta, cache_dir=cache)
    fully_pinned = training.noise_multiplier is not None and training.iterations is not None
    points: list[dict[str, Any]] = []
    for budget in compute_budgets:
        for eps in epsilons:
            result = search(shapes, dataset_size=n, seq_len=spec.data.sequence_length,
                            epsilon=eps, table=sig, loss_model=loss_model, batches=batches,
                            steps=steps, compute_budget=budget,
                            sigma_pinned=None if fully_pinned else training.noise_multiplier)
            best = len(result) > 0
            points.append({
                "compute_budget": budget, "epsilon": eps,
                "loss": float(result.loss[0]) if best else None,
                "model_params": shapes[int(result.model_index[0])].param_count if best else None,
                "batch_size": int(result.batch[0]) if best else None,
                "iterations": int(result.steps[0]) if best else None})
    return points
