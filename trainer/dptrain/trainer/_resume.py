"""Resuming a run: what a checkpoint records, when it may be resumed, and the job's key.

A checkpoint's metadata (public, like everything the job publishes) holds the plan as it is
(``status.plan``'s form), the training settings, the ledger, the model shape, the dataset's
identity and the fingerprint of the secret key, never the key. A checkpoint is resumed only by
the same key, seed, model (shape and architecture), data and plan, up to the fields a spec change
may alter (:data:`RESUMABLE_PLAN_FIELDS`); checkpoints written before plans were stored as they
are, or before architectures were recorded, are read too.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from dptrain.api import FieldError, InvalidJobError
from dptrain.privacy import PrivacyLedger
from dptrain.trainer._checkpoint import shape_to_dict
from dptrain.trainer._config import TrainConfig
from dptrain.trainer._keys import LOCAL_KEY_FILE, MissingKeyError, local_key, read_key


def checkpoint_meta(config: TrainConfig, ledger: PrivacyLedger, checksum: str,
                     fingerprint: str) -> dict[str, Any]:
    return {"job": config.job_name, "seed": config.seed, "key_fingerprint": fingerprint,
            "ledger": ledger.to_dict(), "model_shape": shape_to_dict(config.shape),
            "architecture": config.architecture.to_dict(),
            "pretrained": None if config.pretrained_dir is None else {
                "format": "huggingface", "path": str(config.pretrained_dir)},
            "dataset": {"checksum": checksum, "num_sequences": config.dataset_size,
                        "sequence_length": config.sequence_length, "dir": str(config.data_dir)},
            # The plan as it is (status.plan's form), and what the job adds to it.
            "plan": config.plan.model_dump(mode="json", by_alias=True, exclude_none=True),
            "training": {"optimizer": config.optimizer, "epsilon_budget": config.epsilon_budget,
                         "delta": config.delta},
            "precision": config.precision,
            # Adapters (None: full fine-tuning): the checkpoint's params are then the adapters
            # alone, and the base is the pretrained checkpoint's.
            "lora": None if config.lora is None else config.lora.to_dict()}


#: Fields an accepted spec change may alter on resume: they do not change the mechanism (the
#: budget only moves where the ledger stops; more iterations only extend the schedule, and with
#: them the plan's maxSteps, planned ε, compute and predicted loss; the generation just counts).
RESUMABLE_PLAN_FIELDS = frozenset({"epsilon_budget", "iterations", "maxSteps", "epsilonPlanned",
                                   "specGeneration", "computeFlops", "predictedLoss"})
#: The plan record of checkpoints written before plans were stored as they are.
_LEGACY_PLAN_KEYS = {"batch_size": "batchSize", "iterations": "iterations",
                     "noise_multiplier": "noiseMultiplier", "clip_norm": "clipNorm",
                     "physical_batch_size": "physicalBatchSize",
                     "learning_rate": "learningRate", "accountant": "accountant"}


def run_identity(meta: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """What must match for a checkpoint to be resumed, and whether the record is the old one.

    The plan and the training settings, without the fields a resume may change.
    """
    plan = dict(meta.get("plan") or {})
    legacy = "batch_size" in plan  # written before plans were stored as they are
    if legacy:
        identity = {_LEGACY_PLAN_KEYS[k]: v for k, v in plan.items() if k in _LEGACY_PLAN_KEYS}
        identity.update({k: plan.get(k) for k in ("optimizer", "epsilon_budget", "delta")})
    else:
        identity = {**plan, **(meta.get("training") or {})}
    return {k: v for k, v in identity.items() if k not in RESUMABLE_PLAN_FIELDS}, legacy


def same_run(meta: dict[str, Any], expected: dict[str, Any]) -> bool:
    got, legacy = run_identity(meta)
    want, _ = run_identity(expected)
    if legacy:  # the flat record held fewer fields: compare those it has
        want = {k: want.get(k) for k in got}
    return got == want


def check_compatible(meta: dict[str, Any], expected: dict[str, Any],
                     where: pathlib.Path | str) -> None:
    field = "spec.checkpoint.uri" if isinstance(where, str) else "spec.checkpoint.path"
    if meta.get("key_fingerprint") != expected["key_fingerprint"]:
        raise InvalidJobError([FieldError(
            field, f"the checkpoint in {where} was made with another secret "
            f"job key (fingerprint {meta.get('key_fingerprint') or 'absent'}, this run's "
            f"{expected['key_fingerprint']}); restore the job's key file or use a fresh "
            "checkpoint directory")])
    for key in ("seed", "model_shape", "plan", "architecture", "lora"):
        if key == "plan":
            same = same_run(meta, expected)
        else:  # an older checkpoint without an architecture: the expected one
            got = meta.get(key, expected[key] if key == "architecture" else None)
            if key == "lora":  # older checkpoints: no adapters
                got, want = meta.get(key), expected.get(key)
                same = got == want
                if not same:
                    raise InvalidJobError([FieldError(
                        "spec.training.lora", f"the checkpoint in {where} was trained "
                        f"{'with adapters ' + str(got) if got else 'without adapters'}, this "
                        f"run {'with ' + str(want) if want else 'without'}; use a fresh "
                        "checkpoint directory")])
                continue
            same = got == expected[key]
        if not same:
            raise InvalidJobError([FieldError(
                field, f"the checkpoint in {where} belongs to another "
                f"configuration ({key} differs); use a fresh checkpoint directory")])
    if meta.get("dataset", {}).get("checksum") != expected["dataset"]["checksum"]:
        raise InvalidJobError([FieldError(
            field, f"the checkpoint in {where} was trained on other data "
            "(dataset checksum differs)")])


def read_history(path: pathlib.Path, up_to_step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record["step"] <= up_to_step:
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def job_key(config: TrainConfig, *, resuming: bool) -> bytes:
    """The job's secret key (see ``dptrain.trainer._keys``).

    Raises:
        InvalidJobError: the key is missing for a resumed run, or missing where it must be
            provided (pods), or unreadable.
    """
    path = config.key_file or config.output_dir / LOCAL_KEY_FILE
    try:
        if config.create_key:
            return local_key(path, resuming=resuming)
        if not path.is_file():
            raise MissingKeyError(f"{path}: the job's secret key is not there (the operator "
                                  "mounts it from the job's Secret)")
        return read_key(path)
    except (MissingKeyError, ValueError, OSError) as error:
        raise InvalidJobError([FieldError("key file", str(error))]) from None
