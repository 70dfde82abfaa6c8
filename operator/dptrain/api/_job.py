"""The DPTrainingJob custom resource as pydantic v2 models: the single source of the CRD.

Field names are snake_case in Python and camelCase on the wire (``alias_generator``). Models are
frozen; unknown fields are rejected (``extra="forbid"``), like ``kubectl --validate=strict``.
Every float rejects NaN and infinities.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema
from pydantic.alias_generators import to_camel

GROUP = "dptrain.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DPTrainingJob"
PLURAL = "dptrainingjobs"
SINGULAR = "dptrainingjob"
SHORT_NAMES = ("dptj",)

DEFAULT_TRAINER_IMAGE = "ghcr.io/dptrain/trainer:0.1.0"

# A DNS-1123 label: what Kubernetes requires of names that become labels and Service names.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A POSIX path without NUL or line breaks (RE2-compatible: the API server uses Go regexps);
# '..' components are refused by `_no_parent_components` and by a CEL rule in the CRD.
SAFE_PATH_PATTERN = r"^[^\x00\n\r]+$"
SAFE_PATH_CEL = ("self != '..' && !self.startsWith('../') && !self.endsWith('/..') && "
                 "!self.contains('/../')")


def _no_parent_components(value: str) -> str:
    if ".." in value.split("/"):
        raise ValueError("must not contain '..' path components")
    return value


DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=63)]
SafePath = Annotated[
    str,
    StringConstraints(pattern=SAFE_PATH_PATTERN, min_length=1, max_length=1024),
    AfterValidator(_no_parent_components),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 1024,
                    "pattern": SAFE_PATH_PATTERN,
                    "x-kubernetes-validations": [
                        {"rule": SAFE_PATH_CEL, "message": "must not contain '..' path components"}
                    ]}),
]

Accelerator = Literal[
    "cpu",
    "nvidia-a100-80gb",
    "nvidia-h100-80gb",
    "nvidia-h200",
    "tpu-v5e",
    "tpu-v5p",
    "tpu-v6e",
]

Phase = Literal[
    "Pending",
    "Preparing",
    "Planned",
    "Running",
    "Suspended",
    "Succeeded",
    "BudgetExhausted",
    "Failed",
]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "BudgetExhausted", "Failed"})


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
        # Strict: `true` is not 1.0 and "2" is not 2. The API server sees JSON numbers; a
        # manifest with a string or a boolean where a number belongs is a mistake to report.
        strict=True,
    )


class _Status(BaseModel):
    """Status is written by controllers: tolerant of fields a newer version may add."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
    )


# ----------------------------------------------------------------------------------------- spec


class PrivacySpec(_Model):
    """The privacy budget of the whole job, for one privacy unit (a sequence)."""

    epsilon: float = Field(gt=0, le=100)
    """Total ε the job may spend; training halts before any step that would exceed it."""
    delta: float = Field(gt=0, lt=1)
    """Total δ; must be below 1/N for a dataset of N sequences."""
    accountant: Literal["pld", "rdp"] = "pld"
    """Privacy accountant: PLD (tight, default) or RDP (faster, looser)."""
    unit: Literal["sequence"] = "sequence"
    """The privacy unit: one packed/split training sequence (VaultGemma's sequence-level DP)."""


class VolumeSource(_Model):
    """A PersistentVolumeClaim to mount, and where inside it to look."""

    claim_name: DnsLabel
    """Name of a PersistentVolumeClaim in the job's namespace."""
    sub_path: SafePath | None = None
    """Directory inside the claim (no '..')."""
    read_only: bool = True
    """Mount read-only (data) or read-write (checkpoints)."""


class DataSpec(_Model):
    """Where the documents come from and how they become fixed-length sequences."""

    path: SafePath | None = None
    """File or directory of documents (inside `volume` when set, else on the host)."""
    builtin: Literal["stdlib-docs"] | None = None
    """A corpus that ships with dptrain (needs no download); exclusive with `path`."""
    volume: VolumeSource | None = None
    """PersistentVolumeClaim holding `path`."""
    format: Literal["jsonl", "text", "prepared"] = "jsonl"
    """jsonl (one JSON object per line), text (one document per file), prepared (dptrain's)."""
    text_field: Annotated[str, StringConstraints(min_length=1, max_length=128)] = "text"
    """Key of the document text in each JSONL record."""
    tokenizer: Literal["byte", "sentencepiece", "huggingface"] = "byte"
    """Byte-level tokenizer (default), a SentencePiece model, or a Hugging Face tokenizer.json
    (read with the `tokenizers` library)."""
    tokenizer_model: SafePath | None = None
    """SentencePiece .model file (sentencepiece), or tokenizer.json or its directory
    (huggingface; default: the model.pretrained checkpoint's)."""
    sequence_length: int = Field(default=1024, ge=16, le=32768)
    """Tokens per training sequence; documents are packed or split to this length."""
    num_sequences: int | None = Field(default=None, ge=1, le=10**13)
    """Dataset size N in sequences, when known; otherwise data preparation measures it."""
    dataset_ref: DnsLabel | None = None
    """Name of a DPDataset in the job's namespace whose budget this job is charged to."""


class ComputeSpec(_Model):
    """The compute budget and the hardware to spend it on."""

    flops: float | None = Field(default=None, gt=0, le=1e30)
    """Training compute budget in FLOPs (C = 6·M·B·S·T)."""
    accelerator_hours: float | None = Field(default=None, gt=0, le=1e7)
    """Budget in accelerator-hours (chips × hours) on `accelerator`."""
    accelerator: Accelerator = "cpu"
    """Accelerator type the job runs on."""
    tpu_topology: Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]*(x[1-9][0-9]*){1,2}$",
                                                   max_length=32)] | None = None
    """TPU slice topology (e.g. 4x4); TPU accelerators only."""
    max_hosts: int = Field(default=16, ge=1, le=4096)
    """Upper limit on the number of hosts (pods) of the workload."""
    max_chips_per_host: int | None = Field(default=None, ge=1, le=16)
    """Upper limit on accelerators per host (default: the accelerator's usual host)."""
    utilization: float | None = Field(default=None, gt=0, le=1)
    """Assumed model-FLOP utilisation for wall-time estimates (default per accelerator)."""
    deadline: Annotated[dt.datetime | None, Field(strict=False)] = None
    """Optional wall-clock deadline; plans that would finish later are rejected."""


class PretrainedSpec(_Model):
    """A pretrained checkpoint to start from (its architecture and weights)."""

    format: Literal["huggingface"] = "huggingface"
    """Checkpoint format: a Hugging Face directory (config.json + *.safetensors) of model type
    vaultgemma or gemma2."""
    path: SafePath
    """The checkpoint directory (inside `volume` when set, else on the host)."""
    volume: VolumeSource | None = None
    """PersistentVolumeClaim holding `path`."""


class ModelSpec(_Model):
    """Pin the model instead of letting the planner choose."""

    preset: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]{0,62}$")] | None = None
    """Named model preset (tiny, small, base, medium, large, xl, vaultgemma-1b)."""
    pretrained: PretrainedSpec | None = None
    """Fine-tune a pretrained checkpoint (exclusive with `preset`): the model is fixed, the
    planner plans batch, iterations, σ and learning rate for it."""


class TrainingSpec(_Model):
    """Pins for the planner and optimiser settings. Unset fields are chosen by the planner."""

    batch_size: int | None = Field(default=None, ge=1, le=10**8)
    """Expected (logical) batch size B in sequences; q = B / N."""
    iterations: int | None = Field(default=None, ge=1, le=10**8)
    """Training steps T."""
    noise_multiplier: float | None = Field(default=None, gt=0, le=1e4)
    """σ; noise standard deviation is σ·clipNorm on the summed gradient."""
    clip_norm: float = Field(default=1.0, gt=0, le=1e6)
    """Per-example L2 clipping norm C."""
    learning_rate: float | None = Field(default=None, gt=0, le=10)
    """Peak learning rate (default chosen by the planner)."""
    warmup_steps: int | None = Field(default=None, ge=0, le=10**8)
    """Linear warm-up steps before cosine decay."""
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    """AdamW decoupled weight decay."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimiser applied to the privatised gradient (post-processing: no privacy cost)."""
    physical_batch_size: int | None = Field(default=None, ge=1, le=10**8)
    """Fixed batch the Poisson batch is padded/truncated to (≥ batchSize)."""
    microbatch_size: int | None = Field(default=None, ge=1, le=10**6)
    """Examples per accumulation microbatch (memory knob, no effect on results)."""
    clipping: Literal["ghost", "per-example"] = "ghost"
    """How clipped per-example gradients are summed: `ghost` (norms and the clipped sum from
    activations and output gradients; no per-example gradients in memory) or `per-example`
    (materialised per-example gradients, the reference). Same results; ghost is faster and
    smaller."""
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    """Seed of the model's initialisation only (public). Batch sampling and noise come from a
    secret per-job key, never from this seed."""


class MonitoringSpec(_Model):
    """What the job publishes about its training data besides the DP loss estimate."""

    release_raw_statistics: bool = False
    """Also publish raw per-step statistics of the sampled rows (loss, realised batch, clipped
    fraction, gradient norms). An unaccounted release: they are not covered by the job's ε."""


class CheckpointSpec(_Model):
    """Where checkpoints and the local ledger live."""

    path: SafePath | None = None
    """Directory for checkpoints (inside `volume` when set)."""
    volume: VolumeSource | None = None
    """PersistentVolumeClaim for checkpoints (mounted read-write)."""
    interval_steps: int = Field(default=100, ge=1, le=10**8)
    """Save every this many steps (and at the end)."""
    keep: int = Field(default=3, ge=1, le=100)
    """Checkpoints to keep."""


class DPTrainingJobSpec(_Model):
    """What to train, on what, under which privacy, compute and data budgets."""

    privacy: PrivacySpec
    """The privacy budget (required)."""
    data: DataSpec
    """The training documents (required)."""
    compute: ComputeSpec = ComputeSpec()
    """The compute budget and hardware."""
    model: ModelSpec = ModelSpec()
    """Optional model pin."""
    training: TrainingSpec = TrainingSpec()
    """Optional training pins and optimiser settings."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """Checkpoint location and cadence."""
    monitoring: MonitoringSpec = MonitoringSpec()
    """What the job publishes beyond its DP loss estimate."""
    image: Annotated[str, StringConstraints(min_length=1, max_length=512,
                                            pattern=r"^[^\s]+$")] = DEFAULT_TRAINER_IMAGE
    """Trainer container image."""
    suspend: bool = False
    """Suspend: delete the workload, keep the ledger; resume recreates it from the checkpoint."""
    max_restarts: int = Field(default=3, ge=0, le=100)
    """Trainer failures retried (each resuming from the ledger) before the job fails."""


# --------------------------------------------------------------------------------------- status


class Condition(_Status):
    """A Kubernetes-style condition (one per type)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


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


class PrivacyLedgerStatus(_Status):
    """The privacy ledger, kept by the operator: steps charged only ever grow."""

    steps_charged: int = 0
    epsilon_spent: float = 0.0
    epsilon_budget: float
    delta: float
    accountant: Literal["pld", "rdp"] = "pld"
    last_charged_time: str | None = None


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
    conditions: list[Condition] = []
    plan: PlanStatus | None = None
    privacy: PrivacyLedgerStatus | None = None
    progress: ProgressStatus | None = None
    workload: WorkloadRef | None = None
    dataset: DatasetStatus | None = None
    restarts: int = 0
    observed_generation: int | None = None


class ObjectMeta(BaseModel):
    """The subset of Kubernetes ObjectMeta that dptrain reads; the rest passes through."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=63)]
    namespace: Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN,
                                                max_length=63)] | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class DPTrainingJob(BaseModel):
    """A differentially private training job."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True, allow_inf_nan=False, strict=True)

    api_version: Literal["dptrain.io/v1alpha1"] = "dptrain.io/v1alpha1"
    kind: Literal["DPTrainingJob"] = "DPTrainingJob"
    metadata: ObjectMeta
    spec: DPTrainingJobSpec
    status: DPTrainingJobStatus | None = None

    def to_manifest(self) -> dict[str, Any]:
        """The job as a Kubernetes object (camelCase, unset optional fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
