"""Semantic validation: the rules a JSON schema cannot state.

The same rules appear as CEL ``x-kubernetes-validations`` in the CRD where CEL can express
them, so the API server rejects what it can and the operator reports the rest.
"""

from __future__ import annotations

from dptrain.api._errors import FieldError, InvalidJobError
from dptrain.api._job import DPTrainingJob, DPTrainingJobSpec

TPU_ACCELERATORS = frozenset({"tpu-v5e", "tpu-v5p", "tpu-v6e"})


def semantic_errors(spec: DPTrainingJobSpec, *, dataset_size: int | None = None,
                    prefix: str = "spec") -> list[FieldError]:
    """Every semantic rule the spec breaks (empty if none).

    Args:
        spec: a structurally valid spec.
        dataset_size: N once known (from the spec or from data preparation).
        prefix: path prefix for field names.
    """
    errors: list[FieldError] = []
    data, training, compute = spec.data, spec.training, spec.compute

    if sum(x is not None for x in (data.path, data.builtin, data.uri)) != 1:
        errors.append(FieldError(f"{prefix}.data", "must set exactly one of path, builtin "
                                 "and uri"))
    if data.uri is not None and data.volume is not None:
        errors.append(FieldError(f"{prefix}.data.volume", "is exclusive with uri (object "
                                 "storage needs no volume)", data.volume.claim_name))
    if data.volume is not None and data.path is None:
        errors.append(FieldError(f"{prefix}.data.path", "is required when volume is set"))
    if data.tokenizer == "sentencepiece" and data.tokenizer_model is None:
        errors.append(FieldError(f"{prefix}.data.tokenizerModel",
                                 "is required when tokenizer is sentencepiece"))
    if (data.tokenizer == "huggingface" and data.tokenizer_model is None
            and spec.model.pretrained is None):
        errors.append(FieldError(f"{prefix}.data.tokenizerModel",
                                 "is required when tokenizer is huggingface, unless "
                                 "model.pretrained names a checkpoint with a tokenizer.json"))
    if data.format == "prepared" and data.builtin is not None:
        errors.append(FieldError(f"{prefix}.data.format",
                                 "must not be prepared for a builtin corpus"))
    if data.format == "instruction" and data.builtin is not None:
        errors.append(FieldError(f"{prefix}.data.format", "instruction needs a JSONL path of "
                                 "prompt/response records, not a builtin corpus"))
    if spec.evaluation is not None:
        errors += _evaluation_errors(spec, f"{prefix}.evaluation")

    n = dataset_size if dataset_size is not None else data.num_sequences
    if n is not None and spec.privacy.delta >= 1.0 / n:
        errors.append(FieldError(f"{prefix}.privacy.delta",
                                 f"must be below 1/N = {1.0 / n:.3g} for N = {n} sequences",
                                 f"{spec.privacy.delta:g}"))
    if n is not None and training.batch_size is not None and training.batch_size > n:
        errors.append(FieldError(f"{prefix}.training.batchSize",
                                 f"must not exceed the dataset size N = {n}",
                                 str(training.batch_size)))

    if (training.physical_batch_size is not None and training.batch_size is not None
            and training.physical_batch_size < training.batch_size):
        errors.append(FieldError(f"{prefix}.training.physicalBatchSize",
                                 "must be >= training.batchSize (the expected batch)",
                                 str(training.physical_batch_size)))
    if (training.microbatch_size is not None and training.physical_batch_size is not None
            and training.microbatch_size > training.physical_batch_size):
        errors.append(FieldError(f"{prefix}.training.microbatchSize",
                                 "must be <= training.physicalBatchSize",
                                 str(training.microbatch_size)))
    if (training.warmup_steps is not None and training.iterations is not None
            and training.warmup_steps >= training.iterations):
        errors.append(FieldError(f"{prefix}.training.warmupSteps",
                                 "must be < training.iterations", str(training.warmup_steps)))

    if spec.model.preset is not None and spec.model.pretrained is not None:
        errors.append(FieldError(f"{prefix}.model.pretrained",
                                 "is exclusive with model.preset (the checkpoint fixes the model)",
                                 spec.model.preset))
    if training.lora is not None:
        if spec.model.pretrained is None:
            errors.append(FieldError(f"{prefix}.training.lora",
                                     "needs model.pretrained (adapters fine-tune a pretrained "
                                     "checkpoint; train from scratch without lora)"))
        if len(set(training.lora.targets)) != len(training.lora.targets):
            errors.append(FieldError(f"{prefix}.training.lora.targets",
                                     "must name each linear map at most once",
                                     ",".join(training.lora.targets)))
    model_pinned = spec.model.preset is not None or spec.model.pretrained is not None
    fully_pinned = (model_pinned and training.batch_size is not None
                    and training.iterations is not None)
    if compute.flops is None and compute.accelerator_hours is None and not fully_pinned:
        errors.append(FieldError(
            f"{prefix}.compute",
            "must set flops or acceleratorHours unless the model (model.preset or "
            "model.pretrained), training.batchSize and training.iterations are all pinned"))
    if compute.tpu_topology is not None and compute.accelerator not in TPU_ACCELERATORS:
        errors.append(FieldError(f"{prefix}.compute.tpuTopology",
                                 "is only valid with a TPU accelerator", compute.accelerator))
    if spec.checkpoint.volume is not None and spec.checkpoint.path is None:
        errors.append(FieldError(f"{prefix}.checkpoint.path", "is required when volume is set"))
    if spec.pod_template_overrides is not None:
        for field, rule in spec.pod_template_overrides.mount_problems():
            errors.append(FieldError(f"{prefix}.podTemplateOverrides.{field}", rule))
    errors += _storage_errors(spec, prefix)
    return errors


# Evaluation data is read with the training tokenizer at the training sequence length.
_TRAINING_ONLY = ("tokenizer", "tokenizer_model", "sequence_length", "num_sequences",
                  "dataset_ref")


def _evaluation_errors(spec: DPTrainingJobSpec, prefix: str) -> list[FieldError]:
    evaluation = spec.evaluation
    assert evaluation is not None
    errors: list[FieldError] = []
    data = evaluation.data
    if (data is None) == (evaluation.holdout_fraction is None):
        errors.append(FieldError(prefix, "must set exactly one of data and holdoutFraction"))
    if evaluation.holdout_fraction is not None and spec.data.format == "prepared":
        errors.append(FieldError(f"{prefix}.holdoutFraction", "needs documents to split: "
                                 "spec.data.format must not be prepared",
                                 f"{evaluation.holdout_fraction:g}"))
    if data is None:
        return errors
    if (data.path is None) == (data.builtin is None):
        errors.append(FieldError(f"{prefix}.data", "must set exactly one of path and builtin"))
    if data.volume is not None and data.path is None:
        errors.append(FieldError(f"{prefix}.data.path", "is required when volume is set"))
    if data.format == "prepared":
        errors.append(FieldError(f"{prefix}.data.format", "must be jsonl, text or instruction "
                                 "(evaluation data is prepared with the training tokenizer)",
                                 data.format))
    if data.format == "instruction" and data.builtin is not None:
        errors.append(FieldError(f"{prefix}.data.format", "instruction needs a JSONL path of "
                                 "prompt/response records, not a builtin corpus"))
    for name in _TRAINING_ONLY:
        if name in data.model_fields_set:
            camel = "".join(w.capitalize() if i else w for i, w in enumerate(name.split("_")))
            errors.append(FieldError(f"{prefix}.data.{camel}", "must not be set: evaluation "
                                     "uses the training data's tokenizer and sequence length"))
    return errors


def _storage_errors(spec: DPTrainingJobSpec, prefix: str) -> list[FieldError]:
    """The object-storage rules: uri exclusive with local paths, one Secret per role."""
    errors: list[FieldError] = []
    checkpoint, data = spec.checkpoint, spec.data
    if checkpoint.uri is not None and checkpoint.volume is not None:
        errors.append(FieldError(f"{prefix}.checkpoint.uri", "is exclusive with volume "
                                 "(object storage needs no volume)", checkpoint.uri))
    for field, section in (("data", data), ("checkpoint", checkpoint)):
        if section.secret_ref is not None and section.uri is None:
            errors.append(FieldError(f"{prefix}.{field}.secretRef", "is only used with uri",
                                     section.secret_ref.name))
    refs = (data.secret_ref, checkpoint.secret_ref)
    if all(r is not None for r in refs) and refs[0] != refs[1]:
        env_refs = {r.name for r in refs if r is not None and r.key_file is None}
        key_refs = {(r.name, r.key_file) for r in refs if r is not None and r.key_file}
        if len(env_refs) > 1 or len(key_refs) > 1:
            errors.append(FieldError(
                f"{prefix}.checkpoint.secretRef", "must be the same as data.secretRef when both "
                "are of one kind (both become the trainer's environment, so their variables "
                "would collide)", checkpoint.secret_ref.name if checkpoint.secret_ref else ""))
    return errors


def validate_job(job: DPTrainingJob, *, dataset_size: int | None = None) -> None:
    """Raise :class:`InvalidJobError` if the job breaks any semantic rule."""
    errors = semantic_errors(job.spec, dataset_size=dataset_size)
    if errors:
        raise InvalidJobError(errors)
