"""The DPTrainingJob custom resource as pydantic v2 models: the single source of the CRD.

Field names are snake_case in Python and camelCase on the wire (``alias_generator``). Models are
frozen; unknown fields are rejected (``extra="forbid"``), like ``kubectl --validate=strict``.
Every float rejects NaN and infinities.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from dptrain.api._base import (
    DEFAULT_TRAINER_IMAGE,
    DNS_LABEL_PATTERN,
    Accelerator,
    DnsLabel,
    SafePath,
    _Model,
)
from dptrain.api._pod_overrides import PodTemplateOverrides
from dptrain.api._status import DPTrainingJobStatus
from dptrain.api._storage import ObjectUri, StorageSecretRef

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
    uri: ObjectUri | None = None
    """File or directory (key prefix) of documents in object storage: s3://BUCKET/KEY,
    gs://BUCKET/KEY or file:///PATH; exclusive with `path`, `builtin` and `volume`."""
    secret_ref: StorageSecretRef | None = None
    """Credentials for `uri` (default: the pod's identity, the cloud's default chain)."""
    builtin: Literal["stdlib-docs"] | None = None
    """A corpus that ships with dptrain (needs no download); exclusive with `path`."""
    volume: VolumeSource | None = None
    """PersistentVolumeClaim holding `path`."""
    format: Literal["jsonl", "text", "prepared", "instruction"] = "jsonl"
    """jsonl (one JSON object per line), text (one document per file), prepared (dptrain's), or
    instruction (JSONL prompt/response pairs: one example per sequence, never packed together,
    loss on the response tokens only; the privacy unit is one example)."""
    text_field: Annotated[str, StringConstraints(min_length=1, max_length=128)] = "text"
    """Key of the document text in each JSONL record."""
    prompt_field: Annotated[str, StringConstraints(min_length=1, max_length=128)] = "prompt"
    """Key of the prompt in each instruction record (format instruction; no loss on it)."""
    response_field: Annotated[str, StringConstraints(min_length=1, max_length=128)] = "response"
    """Key of the response in each instruction record (format instruction; the loss is on it)."""
    tokenizer: Literal["byte", "sentencepiece", "huggingface"] = "byte"
    """Byte-level tokenizer (default), a SentencePiece model, or a Hugging Face tokenizer.json
    (read with the `tokenizers` library)."""
    tokenizer_model: SafePath | None = None
    """SentencePiece .model file (sentencepiece), or tokenizer.json or its directory
    (huggingface; default: the model.pretrained checkpoint's)."""
    sequence_length: int = Field(default=1024, ge=16, le=32768)
    """Tokens per training sequence; documents are packed or split to this length (instruction
    examples are truncated or padded to it)."""
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


LoraTarget = Literal["q", "k", "v", "o", "gate", "up", "down"]


def _all_lora_targets() -> list[LoraTarget]:
    return ["q", "k", "v", "o", "gate", "up", "down"]


class LoraSpec(_Model):
    """Low-rank adapters (LoRA): train ``W + (alpha/rank)·A·B`` with the base weights frozen.

    Only the adapters are trained: per-example gradients, clipping and noise cover the adapters
    alone, and the optimizer keeps state for them only. ``B`` starts at zero (the model starts as
    the base), ``A`` random.
    """

    rank: int = Field(default=8, ge=1, le=4096)
    """Rank r of every adapter."""
    alpha: float = Field(default=16.0, gt=0, le=1e6)
    """Scale numerator: the adapter's update is multiplied by alpha / rank (as PEFT's
    lora_alpha)."""
    targets: Annotated[list[LoraTarget], Field(min_length=1, max_length=7)] = Field(
        default_factory=_all_lora_targets)
    """Linear maps that get an adapter: attention projections q, k, v, o and MLP gate, up,
    down (each at most once)."""


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
    lora: LoraSpec | None = None
    """Train low-rank adapters instead of every parameter (needs model.pretrained): the base
    weights stay bit-identical; export merges the adapters (or writes them alone in PEFT's
    format with `dptrain export --adapter-only`)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute precision: `bf16` runs activations and matmuls in bfloat16 while the master
    weights, optimizer state, per-example norms, clipping and noise stay float32."""
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    """Seed of the model's initialisation only (public). Batch sampling and noise come from a
    secret per-job key, never from this seed."""


class MonitoringSpec(_Model):
    """What the job publishes about its training data besides the DP loss estimate."""

    release_raw_statistics: bool = False
    """Also publish raw per-step statistics of the sampled rows (loss, realised batch, clipped
    fraction, gradient norms). An unaccounted release: they are not covered by the job's ε."""


class EvaluationSpec(_Model):
    """Held-out evaluation: a separate source (`data`) or a document-level split.

    Its statistics are published un-noised and are not covered by the job's ε (they are
    computed on documents the job does not train on).
    """

    data: DataSpec | None = None
    """A separate evaluation source, shaped like spec.data (path/builtin, volume, format and
    field names; the training tokenizer and sequence length are used). Exclusive with
    `holdoutFraction`."""
    holdout_fraction: float | None = Field(default=None, gt=0, le=0.5)
    """Fraction of spec.data's documents (instruction examples) held out for evaluation. The
    split is by document, before packing, so no held-out token is ever trained on."""
    interval_steps: int = Field(default=100, ge=1, le=10**8)
    """Evaluate every this many steps (and at the end)."""
    max_rows: int = Field(default=256, ge=1, le=10**7)
    """Evaluate on at most this many sequences (the first ones of the evaluation set)."""


class CheckpointSpec(_Model):
    """Where checkpoints and the local ledger live."""

    path: SafePath | None = None
    """Directory for checkpoints (inside `volume` when set); with `uri`, the local directory
    checkpoints are staged in before the upload (default: the run's output directory)."""
    volume: VolumeSource | None = None
    """PersistentVolumeClaim for checkpoints (mounted read-write)."""
    uri: ObjectUri | None = None
    """Directory (key prefix) for checkpoints and the ledger in object storage: s3://BUCKET/KEY,
    gs://BUCKET/KEY or file:///PATH; exclusive with `volume`. Checkpoints are written by orbax
    to local scratch (`path`) and uploaded, each step directory before its commit marker."""
    secret_ref: StorageSecretRef | None = None
    """Credentials for `uri` (default: the pod's identity, the cloud's default chain)."""
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
    evaluation: EvaluationSpec | None = None
    """Held-out evaluation (loss and perplexity on data not trained on)."""
    image: Annotated[str, StringConstraints(min_length=1, max_length=512,
                                            pattern=r"^[^\s]+$")] = DEFAULT_TRAINER_IMAGE
    """Trainer container image."""
    suspend: bool = False
    """Suspend: delete the workload, keep the ledger; resume recreates it from the checkpoint."""
    max_restarts: int = Field(default=3, ge=0, le=100)
    """Trainer failures retried (each from the ledger) before the job fails (not disruptions)."""
    pod_template_overrides: PodTemplateOverrides | None = None
    """A partial PodTemplateSpec applied last to the trainer and data-preparation pods
    (labels, annotations, scheduling, identity, volumes, env, resources); fields the operator
    owns are refused."""
    ttl_seconds_after_finished: int = Field(default=3600, ge=0, le=30 * 24 * 3600)
    """How long a finished or failed workload (its pods and their logs) is kept, in seconds."""


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
