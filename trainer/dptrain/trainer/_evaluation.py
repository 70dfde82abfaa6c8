"""Held-out evaluation: loss and perplexity on documents the job does not train on.

The evaluation set is either a separate source (``spec.evaluation.data``) or the held-out side
of a document-level split of ``spec.data`` (``spec.evaluation.holdoutFraction``; the split is
made before packing, ``dptrain.trainer._data``), prepared with the training tokenizer at the
training sequence length. :class:`Evaluator` computes the token-weighted mean next-token
cross-entropy over its first ``maxRows`` sequences and its exponential (perplexity).

Formal guarantees:
    1. Evaluation never touches the privacy ledger and draws no randomness: it reads the
       parameters and the evaluation rows only, so the steps charged, the batches and the noise
       of a run are the same with and without it (``tests/test_trainer_evaluation.py``).
    2. A held-out split is disjoint from the training data by construction: each document
       (instruction example) is on exactly one side, decided before packing.
    3. Its statistics are published un-noised and are *not* covered by the job's ε: they are
       computed on documents the job does not train on (:data:`PRIVACY_NOTE`, in the report,
       the status and the docs).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dptrain.api import DPTrainingJob
from dptrain.trainer._data import (
    DataError,
    DocumentSource,
    PreparedDataset,
    prepare_or_reuse,
    source_from_spec,
)
from dptrain.trainer._mesh import replicate, to_host
from dptrain.trainer._model import Decoder, input_ids, target_weights, token_nll
from dptrain.trainer._tokenizer import Tokenizer

PRIVACY_NOTE = ("held-out evaluation statistics are computed without noise on data the job does "
                "not train on; they are not covered by the job's (ε, δ)")
EVAL_DATA_DIR = "eval-data"
EVAL_HISTORY_FILE = "evaluation.jsonl"
_EVAL_BATCH = 16


def data_source(job: DPTrainingJob, base_dir: pathlib.Path) -> DocumentSource:
    """The training documents of ``job``: ``spec.data``, minus a held-out split if any."""
    data = job.spec.data
    source = source_from_spec(path=data.path, builtin=data.builtin, fmt=data.format,
                              text_field=data.text_field, base_dir=base_dir,
                              prompt_field=data.prompt_field,
                              response_field=data.response_field, uri=data.uri)
    evaluation = job.spec.evaluation
    if evaluation is not None and evaluation.holdout_fraction is not None:
        return source.with_split("train", evaluation.holdout_fraction)
    return source


def evaluation_source(job: DPTrainingJob, base_dir: pathlib.Path) -> DocumentSource | None:
    """The evaluation documents of ``job`` (None without ``spec.evaluation``)."""
    evaluation = job.spec.evaluation
    if evaluation is None:
        return None
    if evaluation.holdout_fraction is not None:
        data = job.spec.data
        source = source_from_spec(path=data.path, builtin=data.builtin, fmt=data.format,
                                  text_field=data.text_field, base_dir=base_dir,
                                  prompt_field=data.prompt_field,
                                  response_field=data.response_field, uri=data.uri)
        return source.with_split("holdout", evaluation.holdout_fraction)
    separate = evaluation.data
    assert separate is not None  # validation: exactly one of data and holdoutFraction
    return source_from_spec(path=separate.path, builtin=separate.builtin, fmt=separate.format,
                            text_field=separate.text_field, base_dir=base_dir,
                            prompt_field=separate.prompt_field,
                            response_field=separate.response_field, uri=separate.uri)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluationSettings:
    """What the loop evaluates, and how often.

    Attributes:
        data_dir: the prepared evaluation set.
        interval_steps: evaluate every this many steps (and at the end).
        max_rows: evaluate on at most this many (the first) sequences.
        source: ``holdout`` (a split of spec.data) or ``separate``.
    """

    data_dir: pathlib.Path
    interval_steps: int
    max_rows: int
    source: str = "separate"


def prepare_evaluation(job: DPTrainingJob, tokenizer: Tokenizer, *, sequence_length: int,
                       out_dir: pathlib.Path, base_dir: pathlib.Path,
                       progress: bool = True) -> EvaluationSettings | None:
    """Prepare (or reuse) ``job``'s evaluation set under ``out_dir``; None without one.

    Raises:
        DataError: the evaluation data cannot be read, or holds no tokens.
    """
    evaluation = job.spec.evaluation
    source = evaluation_source(job, base_dir)
    if evaluation is None or source is None:
        return None
    prepared = prepare_or_reuse(source, tokenizer, sequence_length=sequence_length,
                                out_dir=out_dir, progress=progress)
    return EvaluationSettings(
        data_dir=prepared.directory, interval_steps=evaluation.interval_steps,
        max_rows=evaluation.max_rows,
        source="holdout" if evaluation.holdout_fraction is not None else "separate")


def _sums(model: Decoder, tokens: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and count of the loss-carrying targets of one sequence."""
    targets = tokens[1:]
    nll = token_nll(model(input_ids(tokens[:-1])), targets)
    weights = target_weights(targets, pad_id)
    return jnp.sum(nll.astype(jnp.float32) * weights), jnp.sum(weights)


class Evaluator:
    """Loss and perplexity of parameters on the first ``max_rows`` rows of a prepared set."""

    def __init__(self, static: Any, dataset: PreparedDataset, *, max_rows: int, pad_id: int,
                 mesh: Mesh, source: str = "separate", batch: int = _EVAL_BATCH) -> None:
        rows = min(max_rows, dataset.num_sequences)
        tokens = np.asarray(dataset.sequences[:rows], dtype=np.int32)
        size = min(batch, rows)
        padded = -(-rows // size) * size
        if padded > rows:  # all-padding rows carry no target: they add exactly zero
            tokens = np.concatenate(
                [tokens, np.full((padded - rows, tokens.shape[1]), pad_id, np.int32)])
        targets = tokens[:, 1:]
        if not np.any((targets >= 0) & (targets != pad_id)):
            raise DataError(f"spec.evaluation: the evaluation set {dataset.directory} has no "
                            "target tokens to evaluate")
        self.rows, self.source, self._mesh = rows, source, mesh
        self._batches = [tokens[i:i + size] for i in range(0, padded, size)]

        @jax.jit
        def batch_sums(params: Any, frozen: Any,
                       batch_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
            # LoRA: the trained adapters, the frozen base and the rest make the model.
            model = (eqx.combine(params, static) if frozen is None
                     else eqx.combine(params, frozen, static))
            nll, count = jax.vmap(lambda row: _sums(model, row, pad_id))(batch_tokens)
            return jnp.sum(nll), jnp.sum(count)

        self._batch_sums = batch_sums

    def __call__(self, params: Any, step: int, frozen: Any = None) -> dict[str, Any]:
        """The evaluation record of ``params`` (at model step ``step``; LoRA: ``frozen`` base)."""
        total, count = 0.0, 0.0
        for batch in self._batches:
            nll, tokens = to_host(self._batch_sums(params, frozen, replicate(self._mesh, batch)))
            total += float(nll)
            count += float(tokens)
        loss = total / count  # > 0: the constructor checked there are targets
        return {"step": int(step), "loss": loss,
                # exp overflows past ~709 nats; no language model's loss comes near it.
                "perplexity": math.exp(min(loss, 700.0)),
                "rows": self.rows, "tokens": int(count), "source": self.source}


def evaluation_status(record: dict[str, Any]) -> dict[str, Any] | None:
    """``status.progress.evaluation`` (camelCase ``dptrain.api.EvaluationStatus``).

    None for a non-finite loss (a diverged model: JSON has no NaN; the history and the log keep
    it).
    """
    if not math.isfinite(record["loss"]):
        return None
    return {"step": record["step"], "loss": record["loss"], "perplexity": record["perplexity"],
            "rows": record["rows"], "tokens": record["tokens"], "source": record["source"],
            "privacy": PRIVACY_NOTE}
