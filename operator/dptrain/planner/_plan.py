"""The plan: what to train, how long, with how much noise, on which pods — and why.

``Plan`` is the planner's answer for one job; ``Candidate`` a runner-up of the search.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from dptrain.api import PlanStatus
from dptrain.planner._pods import PodPlan
from dptrain.planner._presets import ModelShape

Bound = Literal["compute", "data", "privacy"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    """One configuration of the search, priced with the σ table.

    Attributes:
        model_preset: the model's name (a preset or ``scaled-L<n>``).
        model_params: M.
        batch_size: expected batch B.
        iterations: T.
        noise_multiplier: σ from the σ table (the chosen plan's is recalibrated exactly).
        noise_batch_ratio: σ̄ = σ/B.
        predicted_loss: L(M, T, σ̄).
        compute_flops: 6·M·B·S·T.
        wall_seconds: estimated training time on the chosen plan's pods (step-time model, at
            the expected batch; the pick's own estimate uses its truncation-safe physical
            batch, which for small batches is noticeably larger).
        utilization: the batch's utilisation as a fraction of the accelerator's peak.
    """

    model_preset: str
    model_params: int
    batch_size: int
    iterations: int
    noise_multiplier: float
    noise_batch_ratio: float
    predicted_loss: float
    compute_flops: float
    wall_seconds: float | None = None
    utilization: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """A training plan: model, batch, steps and noise within every budget, and the pods to run it.

    Attributes:
        model_shape: the model to build.
        batch_size: expected batch B (sequences); q = B/N.
        iterations: planned steps T.
        noise_multiplier: σ, calibrated exactly (or pinned).
        sampling_rate: q.
        physical_batch_size: fixed batch the Poisson batch is padded/truncated to.
        dataset_size: N sequences.
        sequence_length: S tokens.
        clip_norm: per-example clipping norm.
        learning_rate: peak learning rate.
        predicted_loss: the loss model's prediction at (M, max_steps, σ/B), if any.
        compute_flops: 6·M·B·S·T.
        max_steps: most steps within the ε budget (≤ iterations).
        epsilon_planned: ε after max_steps steps.
        epsilon_budget: the job's ε.
        delta: the job's δ.
        accountant: ``pld`` or ``rdp``.
        compute_budget: the compute budget in FLOPs, if any.
        pod: hardware and pod resources.
        near_optimal: runners-up within 1% of the best predicted loss (best first).
        bound: what limits the plan: ``compute`` (more FLOPs would lower the loss), ``data``
            (the batch is the whole dataset) or ``privacy`` (the noise the budget forces).
        warnings: extrapolation and other caveats.
        pinned: the spec fields that were pinned.
        loss_model: the loss model's description.
        loss_source: what the plan rests on: ``measured`` (the loss table) or ``paper`` (the
            paper's Table 2 optima, where the table cannot reach).
        paper_anchor: the configuration the paper's results imply for this budget.
        noise_regime: the σ̄ regime (``noise-dominated``, ``high-noise``,
            ``compute-efficient``, ``near-non-private``).
        noise_regime_guidance: the paper's guidance for that regime.
        step_time: the step-time model behind the wall-time estimates.
    """

    model_shape: ModelShape
    batch_size: int
    iterations: int
    noise_multiplier: float
    sampling_rate: float
    physical_batch_size: int
    dataset_size: int
    sequence_length: int
    clip_norm: float
    learning_rate: float
    predicted_loss: float | None
    compute_flops: float
    max_steps: int
    epsilon_planned: float
    epsilon_budget: float
    delta: float
    accountant: Literal["pld", "rdp"]
    compute_budget: float | None
    pod: PodPlan
    near_optimal: tuple[Candidate, ...] = ()
    bound: Bound = "privacy"
    warnings: tuple[str, ...] = ()
    pinned: tuple[str, ...] = ()
    loss_model: dict[str, Any] = dataclasses.field(default_factory=dict)
    loss_source: str = "measured"
    paper_anchor: dict[str, Any] = dataclasses.field(default_factory=dict)
    noise_regime: str = ""
    noise_regime_guidance: str = ""
    step_time: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def model_params(self) -> int:
        """M: all trainable parameters."""
        return self.model_shape.param_count

    @property
    def noise_batch_ratio(self) -> float:
        """σ̄ = σ/B."""
        return self.noise_multiplier / self.batch_size

    @property
    def hosts(self) -> int:
        """Pods of the workload."""
        return self.pod.hosts

    @property
    def chips_per_host(self) -> int:
        """Accelerators per pod (0 on CPU)."""
        return self.pod.chips_per_host

    def to_status(self, spec_generation: int | None = None) -> PlanStatus:
        """The plan as ``status.plan`` of the DPTrainingJob."""
        return PlanStatus(
            model_preset=self.model_shape.name, model_params=self.model_params,
            batch_size=self.batch_size, iterations=self.iterations,
            noise_multiplier=self.noise_multiplier, noise_batch_ratio=self.noise_batch_ratio,
            sampling_rate=self.sampling_rate, physical_batch_size=self.physical_batch_size,
            dataset_size=self.dataset_size, sequence_length=self.sequence_length,
            clip_norm=self.clip_norm, learning_rate=self.learning_rate,
            predicted_loss=self.predicted_loss, compute_flops=self.compute_flops,
            hosts=self.hosts, chips_per_host=self.chips_per_host,
            microbatch_size=self.pod.microbatch_size,
            accumulation_steps=self.pod.accumulation_steps, max_steps=self.max_steps,
            epsilon_planned=self.epsilon_planned, accountant=self.accountant,
            spec_generation=spec_generation)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (snake_case keys; ``to_status`` fields at the top level)."""
        out: dict[str, Any] = self.to_status().model_dump(mode="json", exclude={"spec_generation"})
        out.update({
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "compute_budget": self.compute_budget,
            "model_shape": dataclasses.asdict(self.model_shape),
            "pod": self.pod.to_dict(),
            "near_optimal": [c.to_dict() for c in self.near_optimal],
            "bound": self.bound,
            "warnings": list(self.warnings),
            "pinned": list(self.pinned),
            "loss_model": self.loss_model,
            "loss_source": self.loss_source,
            "paper_anchor": self.paper_anchor,
            "noise_regime": self.noise_regime,
            "noise_regime_guidance": self.noise_regime_guidance,
            "step_time": self.step_time,
        })
        return out
