"""Export a dptrain checkpoint as a Hugging Face model directory with a privacy model card.

``export_huggingface(checkpoint_dir, out)`` writes what ``transformers`` loads with
``AutoModelForCausalLM.from_pretrained(out)``:

* ``config.json`` (``vaultgemma``, or ``gemma2`` for models with post-norms; an imported model's
  own configuration is kept where it agrees) and ``model.safetensors`` (float32);
* ``generation_config.json`` (the imported one, or the special token ids of the tokenizer);
* the tokenizer files of an imported checkpoint (``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json``, ``tokenizer.model``) when present; a model trained with dptrain's
  byte tokenizer records it in ``config.json`` as ``dptrain_tokenizer`` (``dptrain generate``
  reads it; transformers ignores unknown keys);
* ``README.md``: a model card with the privacy statement.

A LoRA checkpoint (adapters only; the base is the pretrained checkpoint it records) is exported
merged (``W + (alpha/rank)·A B`` in float32) by default, or with ``adapter_only`` in PEFT's
adapter format: ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's key names,
``base_model.model.model.layers.{i}.{module}.lora_{A,B}.weight``), which
``peft.PeftModel.from_pretrained(base, OUT)`` loads onto the base model, with the model card and
the tokenizer files.

The privacy statement is computed, never copied from a possibly stale field: ε is recomputed with
the accountant from the mechanism recorded in the checkpoint and the *largest* count of steps
charged that any record holds (checkpoint, ``ledger.json`` beside it, ``report.json``), so it
never undercounts. It names ε, δ, the privacy unit, the sampling rate, σ, the steps, the
accountant, the clip norm and the dataset checksum. It never contains the secret job key (only
its public SHA-256 fingerprint, which the report publishes too).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import equinox as eqx
import jax

from dptrain.planner import ModelShape
from dptrain.trainer._checkpoint import Checkpointer, shape_from_dict
from dptrain.trainer._hf import hf_config, load_pretrained, read_config, save_tensors
from dptrain.trainer._lora import LoraConfig, add_adapters, merge, peft_config, peft_tensors, split
from dptrain.trainer._model import Architecture, Decoder, build_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")


class ExportError(ValueError):
    """The checkpoint cannot be exported (missing, unreadable, or the output is unusable)."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        output: the directory.
        files: file names written.
        step: the checkpoint's step.
        privacy: the privacy statement (also in ``README.md``).
    """

    output: pathlib.Path
    files: list[str]
    step: int
    privacy: dict[str, Any]


def load_checkpoint_model(checkpoint_dir: str | pathlib.Path, step: int | None = None, *,
                          merged: bool = True) -> tuple[Decoder, dict[str, Any]]:
    """The decoder saved in a dptrain checkpoint directory (default: the latest step) and meta.

    A LoRA checkpoint holds the adapters only: the base weights are read from the pretrained
    checkpoint its metadata records, and the adapters merged into them (``merged=False``: kept
    as adapters, ``Decoder.lora``).

    Raises:
        ExportError: no checkpoint there, one without the model's description, or a LoRA
            checkpoint whose base checkpoint cannot be read.
    """
    directory = pathlib.Path(checkpoint_dir)
    if not directory.is_dir():
        raise ExportError(f"{directory}: no such directory")
    checkpointer = Checkpointer(directory)
    try:
        if checkpointer.latest_step() is None:
            raise ExportError(f"{directory}: no complete checkpoint")
        meta = checkpointer.read_meta(step)
        try:
            shape = shape_from_dict(meta["model_shape"])
            arch = Architecture.from_dict(meta.get("architecture") or {})
        except (KeyError, TypeError, ValueError) as error:
            raise ExportError(f"{directory}: checkpoint metadata lacks the model "
                              f"description ({error})") from None
        lora = LoraConfig.from_dict(meta["lora"]) if meta.get("lora") else None
        template = build_model(shape, key=jax.random.key(0), arch=arch)
        if lora is not None:
            template = add_adapters(template, lora, key=jax.random.key(0))
        params, _, static = split(template)
        restored = checkpointer.restore(params, step=step)
    except FileNotFoundError as error:
        raise ExportError(f"{directory}: {error}") from None
    finally:
        checkpointer.close()
    meta = {**restored.meta, "step": restored.step}
    if lora is None:
        return eqx.combine(restored.params, static), meta
    base_dir = (meta.get("pretrained") or {}).get("path")
    try:
        base = load_pretrained(base_dir)[0] if base_dir else None
    except (OSError, ValueError) as error:
        raise ExportError(f"{directory}: a LoRA checkpoint needs its base model {base_dir} "
                          f"({error})") from None
    if base is None:
        raise ExportError(f"{directory}: a LoRA checkpoint without a recorded base model")
    frozen = split(add_adapters(base, lora, key=jax.random.key(0)))[1]
    model = eqx.combine(restored.params, frozen, static)
    return (merge(model) if merged else model), meta


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def privacy_statement(checkpoint_dir: pathlib.Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The model's privacy guarantee, from the checkpoint's records (never undercounting).

    Raises:
        ExportError: the checkpoint has no ledger record.
    """
    from dptrain.privacy import PrivacyLedger

    if "ledger" not in meta:
        raise ExportError(f"{checkpoint_dir}: checkpoint metadata has no privacy ledger")
    ledger = PrivacyLedger.from_dict(meta["ledger"])
    counts = [ledger.steps_charged]
    local = _read_json(checkpoint_dir / "ledger.json")
    if local and isinstance(local.get("steps_charged"), int):
        counts.append(local["steps_charged"])
    report = None
    for candidate in (checkpoint_dir / "report.json", checkpoint_dir.parent / "report.json"):
        report = _read_json(candidate)
        if report is not None:
            if isinstance(report.get("steps_charged"), int):
                counts.append(report["steps_charged"])
            break
    ledger = ledger.merge(max(counts))
    mechanism = ledger.mechanism
    plan = meta.get("plan", {})
    dataset = meta.get("dataset", {})
    return {
        "epsilon": ledger.epsilon_spent(), "delta": mechanism.delta,
        "epsilon_budget": ledger.epsilon_budget,
        "unit": "sequence", "sequence_length": dataset.get("sequence_length"),
        "sampling_rate": mechanism.sampling_rate, "noise_multiplier": mechanism.noise_multiplier,
        "steps": ledger.steps_charged, "steps_in_weights": int(meta["step"]),
        "accountant": mechanism.accountant, "clip_norm": plan.get("clip_norm"),
        "dataset_size": mechanism.dataset_size,
        "physical_batch_size": mechanism.physical_batch_size,
        "dataset_checksum": dataset.get("checksum"),
        "key_fingerprint": meta.get("key_fingerprint"),
        "audit": report.get("audit") if report else None,
    }


def _special_tokens(meta: dict[str, Any]) -> dict[str, int | None]:
    info = meta.get("tokenizer") or {}
    return {"pad_token_id": info.get("pad_id"), "bos_token_id": info.get("bos_id"),
            "eos_token_id": info.get("eos_id")}


def model_card(privacy: dict[str, Any], *, shape: ModelShape, config: dict[str, Any],
               meta: dict[str, Any], base_model: str | None) -> str:
    """``README.md``: what the model is and its differential-privacy guarantee."""
    def num(value: Any, fmt: str = ".6g") -> str:
        return "n/a" if value is None else format(value, fmt)

    base = (f"Fine-tuned with DP-SGD from the pretrained checkpoint `{base_model}`. The guarantee "
            "below covers the fine-tuning data only; the base model's own training data is not "
            "covered by it." if base_model else "Trained from scratch with DP-SGD by dptrain.")
    lora = meta.get("lora")
    if lora:
        base += (f" Only low-rank (LoRA) adapters were trained (rank {lora['rank']}, alpha "
                 f"{lora['alpha']:g}, on {', '.join(lora['targets'])}); the base weights were not "
                 "changed by fine-tuning.")
    audit = privacy.get("audit")
    audit_line = (f"| Empirical audit | {json.dumps(audit)} |\n" if audit else "")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- differential-privacy
- dp-sgd
- dptrain
---

# {meta.get("job", "dptrain model")}

A `{config["model_type"]}` causal language model ({shape.n_layers} layers, d_model {shape.d_model},
{shape.param_count:,} parameters) exported by dptrain. {base}

## Privacy

This model was trained with differential privacy: any single training **{privacy["unit"]}**
({num(privacy["sequence_length"], "d")} tokens) changes the distribution of the released weights
by at most (ε, δ) = ({num(privacy["epsilon"], ".4g")}, {num(privacy["delta"], ".3g")}).

| | |
|---|---|
| ε (spent) | {num(privacy["epsilon"], ".6g")} (budget {num(privacy["epsilon_budget"], ".6g")}) |
| δ | {num(privacy["delta"], ".3g")} |
| Privacy unit | {privacy["unit"]} |
| Sampling | Poisson, rate q = {num(privacy["sampling_rate"], ".6g")} \
(N = {num(privacy["dataset_size"], "d")}, fixed physical batch \
{num(privacy["physical_batch_size"], "d")}) |
| Noise multiplier σ | {num(privacy["noise_multiplier"], ".6g")} |
| Steps charged | {num(privacy["steps"], "d")} (weights include {privacy["steps_in_weights"]}) |
| Accountant | {privacy["accountant"]} |
| Clip norm C | {num(privacy["clip_norm"], ".6g")} |
| Dataset checksum | `{privacy["dataset_checksum"]}` |
{audit_line}
ε is recomputed by the accountant from the recorded mechanism and the largest count of steps
charged in any record of the run, so it covers every step whose gradient was released, including
steps charged after the exported checkpoint. Batch sampling and noise came from a secret per-job
key that is not part of this release.

## Use

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("PATH_TO_THIS_DIRECTORY")
```

or `dptrain generate PATH_TO_THIS_DIRECTORY --prompt "..."`.
"""


def export_huggingface(checkpoint_dir: str | pathlib.Path, output: str | pathlib.Path, *,
                       step: int | None = None, overwrite: bool = False,
                       adapter_only: bool = False) -> ExportResult:
    """Write a Hugging Face model directory for a dptrain checkpoint.

    ``adapter_only``: for a LoRA checkpoint, write the adapters alone in PEFT's format
    (``adapter_config.json``, ``adapter_model.safetensors``) instead of the merged model.

    Raises:
        ExportError: the checkpoint cannot be read, ``adapter_only`` for a checkpoint without
            adapters, or ``output`` exists and is not empty (unless ``overwrite``).
    """
    source = pathlib.Path(checkpoint_dir)
    out = pathlib.Path(output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ExportError(f"{out}: exists and is not an empty directory (use --overwrite)")
    model, meta = load_checkpoint_model(source, step, merged=not adapter_only)
    if adapter_only:
        return _export_adapters(source, out, model, meta)
    privacy = privacy_statement(source, meta)
    shape = shape_from_dict(meta["model_shape"])
    pretrained_dir = None
    base_config = None
    if meta.get("pretrained"):
        pretrained_dir = pathlib.Path(meta["pretrained"]["path"])
        try:
            base_config = read_config(pretrained_dir)
        except ValueError:
            base_config = None  # moved since training: the configuration is rebuilt
    tokenizer_info = meta.get("tokenizer") or {}
    config = hf_config(shape, model.arch, base=base_config,
                       special_tokens=None if base_config else _special_tokens(meta))
    if not base_config and tokenizer_info.get("kind") in ("byte", "sentencepiece", "huggingface"):
        config["dptrain_tokenizer"] = {k: v for k, v in tokenizer_info.items() if k != "model"}
    out.mkdir(parents=True, exist_ok=True)
    files = ["config.json", "model.safetensors", "generation_config.json", "README.md"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_tensors(model, out / "model.safetensors")
    generation = (_read_json(pretrained_dir / "generation_config.json")
                  if pretrained_dir is not None else None)
    if generation is None:
        generation = {key: value for key, value in _special_tokens(meta).items()
                      if value is not None}
        generation = generation or {key: config[key] for key in
                                    ("bos_token_id", "eos_token_id", "pad_token_id")
                                    if config.get(key) is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if pretrained_dir is not None:
        for name in TOKENIZER_FILES:
            if (pretrained_dir / name).is_file():
                shutil.copyfile(pretrained_dir / name, out / name)
                files.append(name)
    elif tokenizer_info.get("kind") in ("sentencepiece", "huggingface") \
            and tokenizer_info.get("model"):
        model_file = pathlib.Path(tokenizer_info["model"])
        name = "tokenizer.model" if tokenizer_info["kind"] == "sentencepiece" else "tokenizer.json"
        if model_file.is_file():
            shutil.copyfile(model_file, out / name)
            files.append(name)
    (out / "README.md").write_text(model_card(
        privacy, shape=shape, config=config, meta=meta,
        base_model=str(pretrained_dir) if pretrained_dir is not None else None))
    return ExportResult(output=out, files=files, step=int(meta["step"]), privacy=privacy)


def _export_adapters(source: pathlib.Path, out: pathlib.Path, model: Decoder,
                     meta: dict[str, Any]) -> ExportResult:
    """PEFT's adapter directory for a LoRA checkpoint (``model`` keeps its adapters)."""
    if model.lora is None or not meta.get("lora"):
        raise ExportError(f"{source}: --adapter-only needs a LoRA checkpoint "
                          "(spec.training.lora); this one trained every parameter")
    from safetensors.numpy import save_file

    privacy = privacy_statement(source, meta)
    shape = shape_from_dict(meta["model_shape"])
    base_dir = pathlib.Path(meta["pretrained"]["path"])
    lora = LoraConfig.from_dict(meta["lora"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(
        json.dumps(peft_config(lora, base_model=str(base_dir)), indent=2) + "\n")
    save_file(peft_tensors(model.lora), str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    files = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out / name)
            files.append(name)
    config = hf_config(shape, model.arch, base=read_config(base_dir))
    card = model_card(privacy, shape=shape, config=config, meta=meta, base_model=str(base_dir))
    card = card.replace(
        "## Use\n", "## Use\n\nThese are LoRA adapters (rank "
        f"{lora.rank}, alpha {lora.alpha:g}, on {', '.join(lora.targets)}) in PEFT's format; "
        "load them onto the base model:\n\n```python\nfrom peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\nbase = AutoModelForCausalLM."
        f"from_pretrained({str(base_dir)!r})\nmodel = PeftModel.from_pretrained(base, "
        "\"PATH_TO_THIS_DIRECTORY\")\n```\n\nMerged into the base weights, they are:\n", 1)
    (out / "README.md").write_text(card)
    return ExportResult(output=out, files=files, step=int(meta["step"]), privacy=privacy)
