"""The trainer's resolved configuration: one job, one plan, one prepared dataset.

``TrainConfig`` is what the training loop needs and nothing more; it is built from a
``DPTrainingJob`` and its plan (``status.plan`` from the operator, or ``make_plan`` locally), so
the loop's accounting uses exactly the plan's sampling rate, σ and physical batch.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from dptrain.api import DPTrainingJob, FieldError, InvalidJobError, PlanStatus
from dptrain.planner import ModelShape, get_preset, mechanism_of
from dptrain.privacy import DpSgdMechanism
from dptrain.trainer._data import PreparedDataset
from dptrain.trainer._evaluation import EvaluationSettings
from dptrain.trainer._lora import LoraConfig
from dptrain.trainer._model import Architecture


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs (public configuration; no arrays).

    The plan is kept as it is (``status.plan``: the operator's, or ``make_plan``'s locally):
    its mechanism, steps and optimisation settings are read from it, never copied, so the loop
    accounts exactly the plan the operator accounts (``dptrain.planner.mechanism_of``).

    Attributes:
        job_name: the DPTrainingJob's name (metrics label, checkpoint identity).
        plan: the plan to carry out (batch, iterations, σ, q, N, physical batch, clip norm,
            learning rate, accountant, maxSteps).
        shape: the model.
        data_dir: the prepared dataset's directory.
        sequence_length: tokens per sequence.
        warmup_steps: linear warm-up steps.
        weight_decay: decoupled weight decay.
        optimizer: ``adamw`` or ``sgd``.
        microbatch_size: rows per accumulation microbatch per device (None: all at once).
        clipping: ``ghost`` or ``per-example`` (how the clipped sum is computed; same result).
        seed: seed of the model's initialisation only (public; sampling and noise come from the
            secret job key).
        epsilon_budget: ε the job may spend.
        delta: δ.
        checkpoint_dir: where checkpoints and ``ledger.json`` go (with ``checkpoint_uri``: the
            local scratch orbax writes to before the upload).
        checkpoint_interval: save every this many steps (and at the end).
        checkpoint_keep: checkpoints to keep.
        output_dir: where ``metrics.jsonl``, the report and plots go.
        ledger_block: steps reserved in the ledger at a time (1: every step is recorded).
        metrics_port: Prometheus port, or None.
        progress: show a progress bar.
        initial_steps_charged: a known lower bound of steps already charged (e.g. the operator's).
        key_file: the job's secret key file (default: ``job.key`` in ``output_dir``).
        create_key: whether a fresh run may create the key file (local runs); pods only read
            the key the operator mounted.
        release_raw_statistics: also publish raw per-step statistics (an unaccounted release).
        architecture: the decoder's architecture switches (Gemma 2 features of pretrained
            models; the default is dptrain's from-scratch decoder).
        pretrained_dir: a Hugging Face checkpoint to initialise from (None: random init).
        evaluation: held-out evaluation (None: none); never touches the ledger.
        checkpoint_uri: ``spec.checkpoint.uri``: object storage holding the checkpoints and the
            ledger (None: ``checkpoint_dir`` only).
        lora: train LoRA adapters only (None: every parameter).
        precision: ``fp32`` or ``bf16`` (activations and matmuls; master weights, clipping and
            noise stay float32).
    """

    job_name: str
    plan: PlanStatus
    shape: ModelShape
    data_dir: pathlib.Path
    sequence_length: int
    warmup_steps: int
    weight_decay: float
    optimizer: str
    microbatch_size: int | None
    seed: int
    epsilon_budget: float
    delta: float
    checkpoint_dir: pathlib.Path
    checkpoint_interval: int
    checkpoint_keep: int
    output_dir: pathlib.Path
    ledger_block: int = 1
    clipping: str = "ghost"
    metrics_port: int | None = None
    progress: bool = True
    initial_steps_charged: int = 0
    key_file: pathlib.Path | None = None
    create_key: bool = True
    release_raw_statistics: bool = False
    architecture: Architecture = dataclasses.field(default_factory=Architecture)
    pretrained_dir: pathlib.Path | None = None
    evaluation: EvaluationSettings | None = None
    checkpoint_uri: str | None = None
    lora: LoraConfig | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        errors = []
        if self.sequence_length > self.shape.max_seq_len:
            errors.append(FieldError("spec.data.sequenceLength",
                                     f"must be at most {self.shape.max_seq_len}, the longest "
                                     f"sequence model {self.shape.name} allows",
                                     str(self.sequence_length)))
        if not 1 <= self.batch_size <= self.dataset_size:
            errors.append(FieldError("spec.training.batchSize",
                                     f"must be in [1, N={self.dataset_size}]",
                                     str(self.batch_size)))
        if self.physical_batch_size < 1:
            errors.append(FieldError("spec.training.physicalBatchSize", "must be ≥ 1",
                                     str(self.physical_batch_size)))
        if self.iterations < 1:
            errors.append(FieldError("spec.training.iterations", "must be ≥ 1",
                                     str(self.iterations)))
        if not self.noise_multiplier > 0:
            errors.append(FieldError("spec.training.noiseMultiplier", "must be > 0",
                                     str(self.noise_multiplier)))
        if self.ledger_block < 1:
            errors.append(FieldError("ledgerBlock", "must be ≥ 1", str(self.ledger_block)))
        if self.lora is not None and self.pretrained_dir is None:
            errors.append(FieldError("spec.training.lora", "needs spec.model.pretrained"))
        if errors:
            raise InvalidJobError(errors)

    @classmethod
    def pinned(cls, *, shape: ModelShape, dataset_size: int, sequence_length: int,
               batch_size: int, physical_batch_size: int, iterations: int,
               noise_multiplier: float, clip_norm: float, learning_rate: float,
               accountant: str, **settings: Any) -> TrainConfig:
        """A configuration whose plan is pinned by hand (no planner: sweeps, tests, benches).

        The plan runs every one of its ``iterations`` (``maxSteps`` = ``iterations``); the
        loop's budget guard still stops at the last step within ``epsilon_budget``.
        """
        plan = PlanStatus(
            model_preset=shape.name, model_params=shape.param_count, batch_size=batch_size,
            iterations=iterations, noise_multiplier=noise_multiplier,
            noise_batch_ratio=noise_multiplier / batch_size,
            sampling_rate=batch_size / dataset_size, physical_batch_size=physical_batch_size,
            dataset_size=dataset_size, sequence_length=sequence_length, clip_norm=clip_norm,
            learning_rate=learning_rate,
            compute_flops=6.0 * shape.param_count * batch_size * sequence_length * iterations,
            max_steps=iterations, epsilon_planned=0.0,
            accountant=accountant)  # type: ignore[arg-type]
        return cls(plan=plan, shape=shape, sequence_length=sequence_length, **settings)

    # The plan's fields the loop reads (one source: the plan).
    @property
    def batch_size(self) -> int:
        """Expected batch B = q·N (divisor of the noisy gradient sum)."""
        return self.plan.batch_size

    @property
    def dataset_size(self) -> int:
        """N (equals the prepared dataset's)."""
        return self.plan.dataset_size

    @property
    def physical_batch_size(self) -> int:
        """The accountant's B_max (the loop may round it up to fit devices)."""
        return self.plan.physical_batch_size

    @property
    def iterations(self) -> int:
        """Planned steps T."""
        return self.plan.iterations

    @property
    def noise_multiplier(self) -> float:
        """σ."""
        return self.plan.noise_multiplier

    @property
    def clip_norm(self) -> float:
        """C."""
        return self.plan.clip_norm

    @property
    def learning_rate(self) -> float:
        """Peak learning rate."""
        return self.plan.learning_rate

    @property
    def accountant(self) -> str:
        """``pld`` or ``rdp``."""
        return self.plan.accountant

    @property
    def sampling_rate(self) -> float:
        """q, as the plan states it (B / N)."""
        return self.plan.sampling_rate

    @property
    def mechanism(self) -> DpSgdMechanism:
        """The plan's mechanism at the job's δ (``dptrain.planner.mechanism_of``)."""
        return mechanism_of(self.plan, self.delta)


def shape_for(preset: str, *, vocab_size: int) -> ModelShape:
    """The model named by a plan, with the tokenizer's vocabulary.

    Raises:
        InvalidJobError: an unknown preset (field ``spec.model.preset``).
    """
    try:
        shape = get_preset(preset)
    except KeyError as error:
        raise InvalidJobError([FieldError("spec.model.preset", str(error.args[0]), preset)]
                              ) from None
    return shape if shape.vocab_size == vocab_size else shape.with_vocab(vocab_size)


def config_from_plan(job: DPTrainingJob, plan: PlanStatus, *, dataset: PreparedDataset,
                     output_dir: pathlib.Path, shape: ModelShape | None = None,
                     checkpoint_dir: pathlib.Path | None = None, metrics_port: int | None = None,
                     progress: bool = True, ledger_block: int = 1,
                     initial_steps_charged: int = 0, key_file: pathlib.Path | None = None,
                     create_key: bool = True, base_dir: pathlib.Path | None = None,
                     evaluation: EvaluationSettings | None = None) -> TrainConfig:
    """The configuration that carries out ``plan`` for ``job`` on ``dataset``.

    ``base_dir`` resolves a relative ``spec.model.pretrained.path`` (default: the working
    directory).

    Raises:
        InvalidJobError: the plan does not fit the dataset or the model (names the field).
    """
    spec = job.spec
    manifest = dataset.manifest
    if plan.dataset_size != manifest.num_sequences:
        raise InvalidJobError([FieldError(
            "status.plan.datasetSize", f"the plan was made for N={plan.dataset_size} sequences "
            f"but the prepared dataset has {manifest.num_sequences}", str(plan.dataset_size))])
    vocab = int(manifest.tokenizer["vocab_size"])
    architecture, pretrained_dir = Architecture(), None
    if spec.model.pretrained is not None:
        model, architecture, pretrained_dir = pretrained_model(
            job, base_dir=base_dir or pathlib.Path.cwd())
        if model.vocab_size != vocab:
            raise InvalidJobError([FieldError(
                "spec.data.tokenizer", f"the tokenizer has {vocab} tokens but the pretrained "
                f"model's vocabulary has {model.vocab_size}; use the checkpoint's tokenizer",
                spec.data.tokenizer)])
    else:
        model = shape if shape is not None else shape_for(plan.model_preset, vocab_size=vocab)
    if model.vocab_size != vocab:
        model = model.with_vocab(vocab)
    training = spec.training
    warmup = (training.warmup_steps if training.warmup_steps is not None
              else max(0, round(0.05 * plan.iterations)))
    ckpt = checkpoint_dir or _resolve(output_dir, spec.checkpoint.path, "checkpoints")
    return TrainConfig(
        job_name=job.metadata.name, shape=model, data_dir=dataset.directory,
        plan=plan, sequence_length=manifest.sequence_length, warmup_steps=warmup,
        weight_decay=training.weight_decay, optimizer=training.optimizer,
        microbatch_size=plan.microbatch_size or training.microbatch_size, seed=training.seed,
        epsilon_budget=spec.privacy.epsilon, delta=spec.privacy.delta, checkpoint_dir=ckpt,
        checkpoint_interval=spec.checkpoint.interval_steps, checkpoint_keep=spec.checkpoint.keep,
        output_dir=output_dir, ledger_block=ledger_block, metrics_port=metrics_port,
        progress=progress, initial_steps_charged=initial_steps_charged, key_file=key_file,
        create_key=create_key, clipping=training.clipping,
        release_raw_statistics=spec.monitoring.release_raw_statistics,
        architecture=architecture, pretrained_dir=pretrained_dir, evaluation=evaluation,
        checkpoint_uri=spec.checkpoint.uri,
        lora=None if training.lora is None else LoraConfig(
            rank=training.lora.rank, alpha=training.lora.alpha,
            targets=tuple(training.lora.targets)),
        precision=training.precision)


def pretrained_model(job: DPTrainingJob, *, base_dir: pathlib.Path
                     ) -> tuple[ModelShape, Architecture, pathlib.Path]:
    """Shape, architecture and directory of ``spec.model.pretrained`` (relative to ``base_dir``).

    Raises:
        InvalidJobError: unreadable, or a configuration dptrain cannot represent (the field names
            the config key).
    """
    from dptrain.trainer._hf import (
        PretrainedError,
        UnsupportedConfigError,
        read_config,
        shape_and_arch,
    )

    pretrained = job.spec.model.pretrained
    assert pretrained is not None
    directory = _resolve(base_dir, pretrained.path, "pretrained")
    try:
        shape, architecture = shape_and_arch(read_config(directory))
    except UnsupportedConfigError as error:
        raise InvalidJobError([FieldError(f"spec.model.pretrained.path: config.json {error.key}",
                                          str(error), str(directory))]) from None
    except PretrainedError as error:
        raise InvalidJobError([FieldError("spec.model.pretrained.path", str(error),
                                          str(directory))]) from None
    return shape, architecture, directory


def _resolve(base: pathlib.Path, path: str | None, default: str) -> pathlib.Path:
    if path is None:
        return base / default
    candidate = pathlib.Path(path)
    return candidate if candidate.is_absolute() else base / candidate
