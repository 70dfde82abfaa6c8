"""The DPTrainingJob's status: conditions, the plan, the ledger, progress, workload, dataset.

Written by the operator (and, for ``progress`` and ``dataset``, by the job's own pods under the
pod contract); tolerant of fields a newer version may add (``_Status``).
"""

from __future__ import annotations

from typing import Any, Literal

from dptrain.api._base import Phase, _Status

# --------------------------------------------------------------------------------------- status


class Condition(_Status):
    """A Kubernetes-style condition (one per type)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class TolerationStatus(_Status):
    """A toleration of the trainer pods (as in a pod spec)."""

    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = None


class PodsStatus(_Status):
    """The trainer pods of a plan, sized once with it (the workload is built from this).

    Resources fit the node allocatable of the accelerator profile's machine type, when the
    profile names one.
    """

    hosts: int = 1
    """Pods (one JAX process each)."""
    chips_per_host: int = 0
    """Accelerators per pod (0 on CPU)."""
    topology: str | None = None
    """TPU slice topology."""
    resources: dict[str, dict[str, str]] = {}  # noqa: RUF012 (pydantic copies defaults)
    """The trainer container's ``requests`` and ``limits``."""
    node_selector: dict[str, str] = {}  # noqa: RUF012
    tolerations: list[TolerationStatus] = []  # noqa: RUF012
    machine_type: str | None = None
    """The node machine type the pods were fitted to (None: the profile names none)."""
    profile: str | None = None
    """The accelerator profile that placed the pods."""


class PlanStatus(_Status):
    """The plan chosen for this job (by the planner, from budgets and pins)."""

    model_preset: str
    model_params: int
    batch_size: int
    iterations: int
    noise_multiplier: float
    noise_batch_ratio: float
    sampling_rate: float
    physical_batch_size: int
    dataset_size: int
    sequence_length: int
    clip_norm: float
    learning_rate: float
    predicted_loss: float | None = None
    compute_flops: float
    hosts: int = 1
    chips_per_host: int = 0
    microbatch_size: int | None = None
    accumulation_steps: int = 1
    max_steps: int
    """Most steps whose ε stays within the budget (≤ iterations)."""
    epsilon_planned: float
    """ε after `maxSteps` steps."""
    accountant: Literal["pld", "rdp"] = "pld"
    spec_generation: int | None = None
    """metadata.generation of the spec this plan was made for."""
    pods: PodsStatus | None = None
    """The trainer pods' sizing and placement (not part of the trainer's config)."""


class PrivacyLedgerStatus(_Status):
    """The privacy ledger, kept by the operator: steps charged only ever grow."""

    steps_charged: int = 0
    epsilon_spent: float = 0.0
    epsilon_budget: float
    delta: float
    accountant: Literal["pld", "rdp"] = "pld"
    last_charged_time: str | None = None

    def merge(self, *counts: int, charged_at: str | None = None) -> PrivacyLedgerStatus:
        """The ledger's merge rule (the one place it is written down): the maximum of counts.

        Returns this ledger with ``steps_charged`` raised to the largest of ``counts`` — never
        lowered — and, when that raised it, ``last_charged_time`` set to ``charged_at`` (if
        given). ``epsilon_spent`` is left to the accountant.
        """
        best = max((self.steps_charged, *counts))
        if best == self.steps_charged:
            return self
        update: dict[str, Any] = {"steps_charged": best}
        if charged_at is not None:
            update["last_charged_time"] = charged_at
        return self.model_copy(update=update)


class MechanismFingerprint(_Status):
    """The DP-SGD mechanism a trainer runs, as it reports it with each progress report.

    The operator compares it with the plan it accounts (``MechanismMismatch`` on a difference).
    """

    sampling_rate: float
    """q the sampler uses (expected batch / N)."""
    noise_multiplier: float
    """σ as used on the device: float32, rounded up (never below the planned σ)."""
    delta: float
    """δ the trainer accounts at."""
    dataset_size: int
    """N, sequences in the data it samples from."""
    physical_batch_size: int
    """Rows per step (the Poisson batch is padded/truncated to it)."""
    clip_norm: float
    """Per-example clipping norm C."""
    accountant: Literal["pld", "rdp"]
    """The trainer's accountant."""
    dataset_checksum: str | None = None
    """Checksum of the source documents it trains on."""


class EvaluationStatus(_Status):
    """Held-out evaluation as the trainer last measured it.

    Not covered by the job's ε: computed (un-noised) on documents the job does not train on.
    """

    step: int
    """Model step the evaluated parameters include."""
    loss: float
    """Mean next-token cross-entropy per evaluated token (nats)."""
    perplexity: float
    """exp(loss)."""
    rows: int
    """Sequences evaluated."""
    tokens: int
    """Target tokens evaluated (padding and prompts excluded)."""
    source: Literal["holdout", "separate"] = "separate"
    """A document-level split of spec.data (holdout) or spec.evaluation.data (separate)."""
    privacy: str | None = None
    """What ε covers here (it does not cover these statistics)."""


class ArtifactsStatus(_Status):
    """Where a finished job's outputs lie (volume-qualified when on a PersistentVolumeClaim)."""

    checkpoint: str | None = None
    """The checkpoint directory (orbax checkpoints and ledger.json)."""
    export: str | None = None
    """The Hugging Face export (config.json, model.safetensors, tokenizer, model card)."""
    report: str | None = None
    """report.json (ε, losses, evaluation, plots beside it)."""
    export_error: str | None = None
    """Why the automatic export failed (the checkpoint and the ledger stand)."""


class ProgressStatus(_Status):
    """Progress as reported by the trainer (advisory; the ledger is kept separately)."""

    steps_charged: int = 0
    step: int = 0
    loss: float | None = None
    """DP estimate of the training loss (released under the job's ε)."""
    tokens_per_second: float | None = None
    """Throughput of the physical batch (public: padding rows included)."""
    last_update: str | None = None
    end_state: str | None = None
    raw_loss: float | None = None
    """Raw loss of the sampled rows: only with spec.monitoring.releaseRawStatistics, an
    unaccounted release (not covered by ε)."""
    unaccounted_release: str | None = None
    """Set when raw statistics of the training data are published outside ε."""
    mechanism: MechanismFingerprint | None = None
    """The mechanism the trainer runs (checked against the plan)."""
    evaluation: EvaluationStatus | None = None
    """The latest held-out evaluation (the operator copies it to status.evaluation)."""
    artifacts: ArtifactsStatus | None = None
    """The finished run's outputs (the operator copies them to status.artifacts)."""


class WorkloadRef(_Status):
    """The child workload running the trainer."""

    api_version: str
    kind: str
    name: str


class DatasetStatus(_Status):
    """Prepared data: where it lies and how many sequences it holds."""

    num_sequences: int
    location: str | None = None
    checksum: str | None = None


class DPTrainingJobStatus(_Status):
    """Observed state of a DPTrainingJob."""

    phase: Phase = "Pending"
    conditions: list[Condition] = []  # noqa: RUF012 (pydantic copies defaults)
    plan: PlanStatus | None = None
    privacy: PrivacyLedgerStatus | None = None
    progress: ProgressStatus | None = None
    workload: WorkloadRef | None = None
    dataset: DatasetStatus | None = None
    evaluation: EvaluationStatus | None = None
    """The latest held-out evaluation (not covered by ε; copied from the trainer's report)."""
    artifacts: ArtifactsStatus | None = None
    """Where the finished job's checkpoint, export and report lie."""
    restarts: int = 0
    """Trainer restarts counted against ``spec.maxRestarts``."""
    disruptions: int = 0
    """Restarts after a disruption (preemption, node drain), not counted."""
    observed_generation: int | None = None
