"""Memorization check (VaultGemma's empirical test) and canaries.

Prompt the model with the first ``prefix_length`` (50) tokens of a training sequence, greedy-decode
``suffix_length`` (50) tokens, and compare them with the true continuation: an *exact* match, and
an *approximate* match (token edit distance ≤ 10% of the suffix). Rates come with two-sided
Clopper–Pearson intervals. Canaries — random strings inserted into the corpus, each repeated many
times — are the sensitive case: a non-private model memorizes them, a DP model should not.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from dptrain.trainer._checkpoint import Checkpointer, shape_from_dict
from dptrain.trainer._data import PreparedDataset, load_dataset
from dptrain.trainer._model import Architecture, Decoder, build_model, greedy_continue
from dptrain.trainer._tokenizer import Tokenizer

PREFIX_LENGTH = 50
SUFFIX_LENGTH = 50
APPROXIMATE_FRACTION = 0.10


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval for ``successes / trials``."""
    if trials <= 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes,
                                                          trials - successes + 1))
    high = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1,
                                                                trials - successes))
    return low, high


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatchRate:
    """A match rate with its Clopper–Pearson interval."""

    matches: int
    samples: int
    low: float
    high: float

    @property
    def rate(self) -> float:
        """Matches / samples (0 when there are no samples)."""
        return self.matches / self.samples if self.samples else 0.0

    @classmethod
    def of(cls, matches: int, samples: int, confidence: float) -> MatchRate:
        """Rate and interval of ``matches`` out of ``samples``."""
        low, high = clopper_pearson(matches, samples, confidence)
        return cls(matches=matches, samples=samples, low=low, high=high)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemorizationResult:
    """Exact and approximate match rates over a set of prompts."""

    exact: MatchRate
    approximate: MatchRate
    prefix_length: int
    suffix_length: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``exact_match_rate``, ``approximate_match_rate``, ``samples``, intervals)."""
        return {"exact_match_rate": self.exact.rate,
                "exact_match_interval": [self.exact.low, self.exact.high],
                "approximate_match_rate": self.approximate.rate,
                "approximate_match_interval": [self.approximate.low, self.approximate.high],
                "samples": self.exact.samples, "prefix_length": self.prefix_length,
                "suffix_length": self.suffix_length, "confidence": self.confidence,
                "approximate_max_edit_fraction": APPROXIMATE_FRACTION}


def _decoder_fn(static: Decoder, suffix_length: int) -> Any:
    @jax.jit
    def decode(params: Any, prompts: jax.Array) -> jax.Array:
        model = eqx.combine(params, static)
        return jax.vmap(lambda p: greedy_continue(model, p, suffix_length))(prompts)
    return decode


def memorization(model: Decoder, sequences: np.ndarray, *, prefix_length: int = PREFIX_LENGTH,
                 suffix_length: int = SUFFIX_LENGTH, batch_size: int = 32,
                 confidence: float = 0.95) -> MemorizationResult:
    """Greedy-complete each sequence's prefix and count exact and approximate suffix matches.

    Args:
        model: the decoder.
        sequences: ``[S, ≥ prefix_length + suffix_length]`` token ids.
        prefix_length: prompt tokens.
        suffix_length: decoded tokens compared with the truth.
        batch_size: prompts decoded at once (one compiled shape; the last batch is padded).
        confidence: of the Clopper–Pearson intervals.
    """
    if sequences.ndim != 2 or sequences.shape[1] < prefix_length + suffix_length:
        raise ValueError(f"sequences must be [S, ≥{prefix_length + suffix_length}] "
                         f"(got {sequences.shape})")
    params, static = eqx.partition(model, eqx.is_array)
    decode = _decoder_fn(static, suffix_length)
    prompts = np.asarray(sequences[:, :prefix_length], dtype=np.int32)
    truth = np.asarray(sequences[:, prefix_length:prefix_length + suffix_length])
    count = prompts.shape[0]
    outputs = []
    for start in range(0, count, batch_size):
        chunk = prompts[start:start + batch_size]
        padded = np.zeros((batch_size, prefix_length), np.int32)
        padded[: chunk.shape[0]] = chunk
        outputs.append(np.asarray(decode(params, jnp.asarray(padded)))[: chunk.shape[0]])
    generated = np.concatenate(outputs) if outputs else np.zeros((0, suffix_length), np.int32)
    limit = math.floor(APPROXIMATE_FRACTION * suffix_length)
    exact = int(np.sum(np.all(generated == truth, axis=1)))
    approximate = sum(edit_distance(g.tolist(), t.tolist()) <= limit
                      for g, t in zip(generated, truth, strict=True))
    return MemorizationResult(exact=MatchRate.of(exact, count, confidence),
                              approximate=MatchRate.of(int(approximate), count, confidence),
                              prefix_length=prefix_length, suffix_length=suffix_length,
                              confidence=confidence)


def make_canaries(tokenizer: Tokenizer, *, count: int, length: int = PREFIX_LENGTH
                  + SUFFIX_LENGTH, seed: int = 0) -> list[list[int]]:
    """``count`` random canaries of ``length`` tokens (random lowercase letters and digits).

    Random text has no structure a model can generalise to, so reproducing a canary's suffix from
    its prefix can only come from memorizing it.
    """
    rng = np.random.default_rng([seed, 0xCA7A])
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    canaries = []
    for _ in range(count):
        text = "".join(rng.choice(list(alphabet), size=length * 2))
        canaries.append(tokenizer.encode(text)[:length])
    return canaries


def training_prompts(dataset: PreparedDataset, *, samples: int, seed: int = 0,
                     prefix_length: int = PREFIX_LENGTH,
                     suffix_length: int = SUFFIX_LENGTH) -> np.ndarray:
    """Up to ``samples`` training sequences (uniformly, without padding in the compared span)."""
    needed = prefix_length + suffix_length
    if dataset.manifest.sequence_length < needed:
        raise ValueError(f"the dataset's sequences ({dataset.manifest.sequence_length} tokens) "
                         f"are shorter than prefix + suffix ({needed})")
    rng = np.random.default_rng([seed, 0xA0D1])
    order = rng.permutation(dataset.num_sequences)
    pad = dataset.tokenizer.pad_id
    chosen: list[np.ndarray] = []
    for start in range(0, order.shape[0], 1024):
        rows = dataset.gather(order[start:start + 1024], pad)[:, :needed]
        chosen.extend(row for row in rows if np.all(row != pad))
        if len(chosen) >= samples:
            break
    return np.asarray(chosen[:samples], dtype=np.int32).reshape(-1, needed)


def audit_checkpoint(checkpoint_dir: str | os.PathLike[str], *, samples: int = 100,
                     data_dir: str | os.PathLike[str] | None = None, seed: int = 0,
                     step: int | None = None) -> dict[str, Any]:
    """Memorization of a trained checkpoint: on training sequences and on canaries, if any."""
    checkpointer = Checkpointer(checkpoint_dir)
    try:
        meta = checkpointer.read_meta(step)
        shape = shape_from_dict(meta["model_shape"])
        arch = Architecture.from_dict(meta.get("architecture") or {})
        params, static = eqx.partition(build_model(shape, key=jax.random.key(0), arch=arch),
                                       eqx.is_array)
        restored = checkpointer.restore(params, None, step=meta["step"])
    finally:
        checkpointer.close()
    model = eqx.combine(restored.params, static)
    dataset = load_dataset(data_dir or meta["dataset"]["dir"])
    prompts = training_prompts(dataset, samples=samples, seed=seed)
    result: dict[str, Any] = {"checkpoint": str(checkpoint_dir), "step": meta["step"],
                              **memorization(model, prompts).to_dict(),
                              "privacy_note": AUDIT_PRIVACY_NOTE}
    if dataset.manifest.canaries:
        canaries = np.asarray([c[:PREFIX_LENGTH + SUFFIX_LENGTH]
                               for c in dataset.manifest.canaries], dtype=np.int32)
        repeats = dataset.manifest.canary_repeats
        result["canaries"] = {**memorization(model, canaries).to_dict(), "repeats": repeats,
                              "repetition_note": canary_repetition_note(repeats)}
    return result


AUDIT_PRIVACY_NOTE = (
    "these figures are statistics of the training data (match rates of training sequences "
    "under the trained model), computed without noise and released outside the job's ε: "
    "share them only as you would share the training data")


def canary_repetition_note(repeats: int) -> str:
    """What a canary's repetition means for the guarantee it is tested against."""
    return (f"each canary was inserted {repeats}× into the training data; a sequence present "
            f"{repeats}× is protected only by group privacy ({repeats}·ε), so canaries "
            "repeated more than once are expected to be memorized more than single rows")


def default_checkpoint_dir(path: str | os.PathLike[str]) -> pathlib.Path:
    """Accept a run's output directory as well as its checkpoint directory."""
    candidate = pathlib.Path(path)
    nested = candidate / "checkpoints"
    return nested if nested.is_dir() and not any(candidate.glob("[0-9]*")) else candidate
