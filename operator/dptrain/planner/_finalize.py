"""The chosen configuration, priced exactly: σ, maxSteps, the pods, runners-up and the bound.

:func:`finalize` turns the search's pick into a :class:`~dptrain.planner.Plan`: σ recalibrated
with the job's accountant (or the pinned σ checked), the most steps within the budget, the
truncation-safe physical batch, the predicted loss, the runners-up within 1 % (with their wall
times) and which budget binds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dptrain.api import DPTrainingJobSpec
from dptrain.planner._accelerators import AcceleratorSpec
from dptrain.planner._errors import InfeasibleBudgetError, round_up
from dptrain.planner._exact import ExactAccounting
from dptrain.planner._loss_model import LossModel
from dptrain.planner._paper import PaperAnchor, noise_regime
from dptrain.planner._plan import Bound, Candidate, Plan
from dptrain.planner._plan_privacy import PricedPoint, mechanism_of
from dptrain.planner._pods import PodPlan
from dptrain.planner._presets import (
    ModelShape,
)
from dptrain.planner._search import NEAR_OPTIMAL_RTOL, SearchResult, SearchSpace
from dptrain.planner._step_time import StepTimeModel
from dptrain.privacy import PrivacyParameterError, physical_batch_size_for

DEFAULT_LEARNING_RATE = {"adamw": 1e-3, "sgd": 0.1}
"""Peak learning rate when neither the spec nor the loss table suggests one."""
MAX_RUNNERS_UP = 10
MIN_RUNNERS_UP = 3
"""Alternatives shown even when fewer are within 1% (each with its wall time)."""


@dataclasses.dataclass(frozen=True)
class PlanContext:
    """What the search decided besides the ranking, for the plan's report."""

    source: str
    anchor: PaperAnchor
    timing: StepTimeModel
    util: float
    accelerator: AcceleratorSpec
    eligible: np.ndarray
    notes: tuple[str, ...]


def finalize(spec: DPTrainingJobSpec, shapes: list[ModelShape], result: SearchResult,
              idx: int, pod: PodPlan, n: int, loss_model: LossModel, budget: float | None,
              pins: tuple[str, ...], exact: ExactAccounting, context: PlanContext) -> Plan:
    privacy, training = spec.privacy, spec.training
    shape = shapes[int(result.model_index[idx])]
    b, t = int(result.batch[idx]), int(result.steps[idx])
    q = b / n
    physical = pod.physical_batch_size
    warnings: list[str] = []
    try:
        if training.noise_multiplier is not None:
            sigma = training.noise_multiplier
        else:
            sigma = exact.noise_multiplier(epsilon_budget=privacy.epsilon, delta=privacy.delta,
                                           sampling_rate=q, steps=t,
                                           accountant=privacy.accountant, dataset_size=n,
                                           physical_batch_size=physical)
    except PrivacyParameterError as error:
        if training.physical_batch_size is not None:
            safe = physical_batch_size_for(b, dataset_size=n, steps=t, delta=privacy.delta,
                                           epsilon_budget=privacy.epsilon)
            if training.physical_batch_size < safe:
                raise InfeasibleBudgetError(
                    "privacy", f"the pinned physical batch {training.physical_batch_size} "
                    f"truncates Poisson batches of expected size {b} too often to certify "
                    f"(ε, δ) over {t} steps; nearest feasible: physicalBatchSize >= {safe}",
                    field="spec.training.physicalBatchSize", required=safe,
                    available=training.physical_batch_size) from None
        raise InfeasibleBudgetError(
            "privacy", f"no noise multiplier reaches ε = {privacy.epsilon:g} in {t} steps at "
            f"q = {q:.3g} ({error})", field="spec.privacy.epsilon",
            available=privacy.epsilon) from None
    # The same plan → mechanism mapping the operator and the trainer use on status.plan.
    mechanism = mechanism_of(PricedPoint(sampling_rate=q, noise_multiplier=sigma,
                                         accountant=privacy.accountant, dataset_size=n,
                                         physical_batch_size=physical), privacy.delta)
    max_steps = (t if training.noise_multiplier is None
                 else exact.max_steps(epsilon_budget=privacy.epsilon, mechanism=mechanism, cap=t))
    if max_steps == 0:
        first = exact.epsilon(mechanism, 1)
        raise InfeasibleBudgetError(
            "privacy", f"not one step fits: one step with σ = {sigma:g} at q = {q:.3g} spends "
            f"ε = {first:.3g} > {privacy.epsilon:g}; nearest feasible: ε ≥ {round_up(first):g} "
            f"or a larger spec.training.noiseMultiplier", field="spec.privacy.epsilon",
            required=first, available=privacy.epsilon)
    if max_steps < t:
        warnings.append(f"the pinned noise multiplier {sigma:g} affords only {max_steps} of the "
                        f"{t} pinned iterations within ε = {privacy.epsilon:g}: training will "
                        f"stop there (BudgetExhausted)")
    eps_planned = exact.epsilon(mechanism, max_steps)
    ratio = sigma / b
    predicted: float | None = float(loss_model.predict(
        np.array(shape.param_count), np.array(max_steps), np.array(ratio)))
    warnings += list(context.notes)
    if context.source == "paper":
        predicted = None
        warnings.append(f"planned from the paper's published optima (no measured table reaches "
                        f"this budget): "
                        f"{context.anchor.note}; no loss is predicted for this model family "
                        f"(the paper's BERT cross-entropy there is "
                        f"{context.anchor.paper_ce:.2f}: compare trends only)")
        if budget is not None and context.anchor.compute < budget * 0.99:
            warnings.append(f"the paper's results saturate at {context.anchor.compute:.3g} "
                            f"FLOPs for this (N, ε): the rest of the {budget:.3g} budget would "
                            f"not lower the loss")
    else:
        warnings += [f"loss model: {w}" for w in
                     loss_model.extrapolation(shape.param_count, max_steps, ratio)]
    if not context.eligible[idx] or bool(context.timing.collapsed(
            float(b) * spec.data.sequence_length)):
        warnings.append(f"batch {b} leaves the {context.accelerator.name} mostly idle "
                        f"(utilisation below half its peak): chosen only because no larger "
                        f"batch fits the budgets")
    provenance = loss_model.describe().get("metadata") or {}
    if context.source == "measured" and provenance.get("measured") is False:
        warnings.append(f"loss model: the table is {provenance.get('kind', 'not measured')} "
                        f"(not measured); predicted losses are indicative only")
    if budget is None and training.iterations is None:
        warnings.append("no compute budget: chose the cheapest configuration within 1% of the "
                        "best predicted loss")
    lr = training.learning_rate or loss_model.learning_rate(shape.param_count, ratio, t) or \
        DEFAULT_LEARNING_RATE[training.optimizer]
    flops = 6.0 * shape.param_count * b * spec.data.sequence_length * t
    regime, guidance = noise_regime(ratio)
    return Plan(
        model_shape=shape, batch_size=b, iterations=t, noise_multiplier=float(sigma),
        sampling_rate=q, physical_batch_size=physical, dataset_size=n,
        sequence_length=spec.data.sequence_length, clip_norm=training.clip_norm,
        learning_rate=float(lr), predicted_loss=predicted, compute_flops=flops,
        max_steps=int(max_steps), epsilon_planned=float(eps_planned),
        epsilon_budget=privacy.epsilon, delta=privacy.delta, accountant=privacy.accountant,
        compute_budget=budget, pod=pod,
        near_optimal=_runners_up(result, idx, shapes, context, pod, spec.data.sequence_length),
        bound=_bound(result, idx, b, t, n, budget, spec), warnings=tuple(warnings), pinned=pins,
        loss_model=loss_model.describe(), loss_source=context.source,
        paper_anchor=context.anchor.to_dict(), noise_regime=regime,
        noise_regime_guidance=guidance, step_time=context.timing.to_dict())


def _devices(pod: PodPlan, accelerator: AcceleratorSpec) -> tuple[int, int]:
    """(JAX devices the batch is split over, chips/cores whose peak FLOP/s add up)."""
    if accelerator.kind == "cpu":
        return pod.hosts, pod.hosts * int(pod.resources["requests"]["cpu"])
    return pod.hosts * pod.chips_per_host, pod.hosts * pod.chips_per_host


def _runners_up(result: SearchResult, chosen: int, shapes: list[ModelShape],
                context: PlanContext, pod: PodPlan, seq_len: int) -> tuple[Candidate, ...]:
    """Eligible configurations near the best, with their wall time on the chosen pods.

    Within 1% of the best eligible loss (at least ``MIN_RUNNERS_UP`` alternatives), best first,
    one per (model, batch).
    """
    eligible = np.flatnonzero(context.eligible)
    if len(eligible) == 0:
        return ()
    limit = float(result.loss[eligible].min()) * (1 + NEAR_OPTIMAL_RTOL)
    seen = {(int(result.model_index[chosen]), int(result.batch[chosen]))}
    out: list[Candidate] = []
    split, chips = _devices(pod, context.accelerator)
    for i in eligible:
        if (result.loss[i] > limit and len(out) >= MIN_RUNNERS_UP) or \
                len(out) >= MAX_RUNNERS_UP:
            break
        key = (int(result.model_index[i]), int(result.batch[i]))
        if key in seen:
            continue
        seen.add(key)
        shape = shapes[key[0]]
        out.append(Candidate(
            model_preset=shape.name, model_params=shape.param_count,
            batch_size=int(result.batch[i]), iterations=int(result.steps[i]),
            noise_multiplier=float(result.sigma[i]), noise_batch_ratio=float(result.ratio[i]),
            predicted_loss=float(result.loss[i]), compute_flops=float(result.flops[i]),
            wall_seconds=float(result.steps[i]) * float(context.timing.step_seconds(
                float(result.flops[i]) / float(result.steps[i]),
                float(result.batch[i]) * seq_len / split, devices=chips,
                peak_flops_per_device=context.accelerator.peak_flops,
                peak_utilization=context.util)),
            utilization=float(context.timing.relative_utilization(
                float(result.batch[i]) * seq_len / split))))
    return tuple(out)


def _bound(result: SearchResult, idx: int, b: int, t: int, n: int, budget: float | None,
           spec: DPTrainingJobSpec) -> Bound:
    """Why the search stopped where it did.

    ``compute``: the next grid step in T would break the compute budget; ``data``: the batch is
    the whole dataset; else ``privacy``: the noise the ε budget forces.
    """
    step = 2.0 ** (1.0 / SearchSpace().grid_per_octave)
    if budget is not None and result.flops[idx] * step > budget:
        return "compute"
    if b * step > n:
        return "data"
    return "privacy"
