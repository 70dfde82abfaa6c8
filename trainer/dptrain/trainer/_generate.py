"""Text generation with a key/value cache: greedy, or temperature / top-k sampling.

The prompt is fed one position at a time through :meth:`Decoder.decode` (filling the cache),
then each new token attends to the cached keys and values only: ``O(T)`` work per token instead
of the full forward's ``O(T²)``. One compiled program per (prompt length, new tokens) shape.

Models come from a Hugging Face directory (``config.json`` + safetensors: an import or a
``dptrain export``) or from a dptrain checkpoint directory. Text is tokenized with the
directory's ``tokenizer.json`` (the ``tokenizers`` library), or with the tokenizer dptrain trained
with (recorded by ``dptrain export`` in ``config.json`` as ``dptrain_tokenizer``, or in the
checkpoint's prepared dataset).

Sampling randomness is not privacy-relevant (the model is already a DP release); it comes from
``seed`` so that a sample can be reproduced.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from dptrain.trainer._model import Decoder, empty_cache


class GenerationError(ValueError):
    """A model, tokenizer or request that generation cannot serve."""


class TextCodec(Protocol):
    """What generation needs of a tokenizer."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generation's result.

    Attributes:
        prompt_ids: the prompt's token ids (with the beginning-of-sequence token when used).
        new_ids: generated ids (up to and including the end-of-sequence token, if met).
        text: the generated text (None without a tokenizer).
        stopped: ``eos`` or ``length``.
    """

    prompt_ids: list[int]
    new_ids: list[int]
    text: str | None
    stopped: str


@functools.partial(jax.jit, static_argnames=("num_tokens", "greedy", "top_k"))
def _generate(model: Decoder, prompt: jax.Array, key: jax.Array, temperature: jax.Array, *,
              num_tokens: int, greedy: bool, top_k: int) -> jax.Array:
    length = prompt.shape[0] + num_tokens
    cache = empty_cache(model, length)

    def prefill(state: Any, xs: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
        cache, _ = state
        token, position = xs
        logits, cache = model.decode(token, position, cache)
        return (cache, logits), None

    (cache, logits), _ = jax.lax.scan(
        prefill, (cache, jnp.zeros((model.embedding.shape[0],), jnp.float32)),
        (prompt, jnp.arange(prompt.shape[0])))

    def choose(logits: jax.Array, step_key: jax.Array) -> jax.Array:
        if greedy:
            return jnp.argmax(logits).astype(jnp.int32)
        scaled = logits / temperature
        if top_k > 0:
            kth = jax.lax.top_k(scaled, top_k)[0][-1]
            scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        return jax.random.categorical(step_key, scaled).astype(jnp.int32)

    def step(state: Any, xs: tuple[jax.Array, jax.Array]) -> tuple[Any, jax.Array]:
        cache, logits = state
        position, step_key = xs
        token = choose(logits, step_key)
        logits, cache = model.decode(token, position, cache)
        return (cache, logits), token

    positions = prompt.shape[0] + jnp.arange(num_tokens)
    _, tokens = jax.lax.scan(step, (cache, logits),
                             (positions, jax.random.split(key, num_tokens)))
    return tokens


def generate_ids(model: Decoder, prompt_ids: Sequence[int], *, max_new_tokens: int,
                 greedy: bool = True, temperature: float = 1.0, top_k: int = 0,
                 eos_id: int | None = None, seed: int = 0) -> tuple[list[int], str]:
    """New token ids after ``prompt_ids`` (stopping after ``eos_id``) and why it stopped.

    Raises:
        GenerationError: an empty prompt, a too-long request, ids outside the vocabulary, or
            bad sampling settings.
    """
    vocab = int(model.embedding.shape[0])
    if not prompt_ids:
        raise GenerationError("the prompt has no tokens")
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
    if len(prompt_ids) + max_new_tokens > model.max_seq_len:
        raise GenerationError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens "
                              f"({max_new_tokens}) exceeds the model's {model.max_seq_len} "
                              "positions")
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise GenerationError(f"prompt token ids must be in [0, {vocab})")
    if not greedy and not temperature > 0:
        raise GenerationError(f"--temperature must be > 0, got {temperature}")
    if not 0 <= top_k <= vocab:
        raise GenerationError(f"--top-k must be in [0, {vocab}], got {top_k}")
    tokens = _generate(model, jnp.asarray(prompt_ids, jnp.int32), jax.random.key(seed),
                       jnp.float32(temperature), num_tokens=max_new_tokens, greedy=greedy,
                       top_k=top_k)
    out = [int(t) for t in np.asarray(tokens)]
    if eos_id is not None and eos_id in out:
        return out[: out.index(eos_id) + 1], "eos"
    return out, "length"


# ------------------------------------------------------------------------------ loading


class _HfTokenizer:
    def __init__(self, path: pathlib.Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))


class _DptrainTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids)))


def _dptrain_codec(info: dict[str, Any], base: pathlib.Path) -> TextCodec | None:
    """The tokenizer a dptrain data manifest describes.

    A SentencePiece model file is looked for beside an export first, then where the manifest says.
    """
    from dptrain.trainer._tokenizer import tokenizer_from_description

    if info.get("kind") not in ("byte", "sentencepiece", "huggingface"):
        return None
    if info.get("kind") in ("sentencepiece", "huggingface"):
        local = base / ("tokenizer.model" if info["kind"] == "sentencepiece" else "tokenizer.json")
        info = {**info, "model": str(local)} if local.is_file() else info
        if not info.get("model") or not pathlib.Path(str(info["model"])).is_file():
            return None
    try:
        return _DptrainTokenizer(tokenizer_from_description(info))
    except (ValueError, OSError, ImportError):
        return None


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to generate with.

    Attributes:
        model: the decoder.
        codec: its tokenizer (None: ids only).
        bos_id: beginning-of-sequence id prepended to text prompts (None: none).
        eos_id: end-of-sequence id generation stops after (None: never).
        source: ``huggingface`` or ``checkpoint``.
    """

    model: Decoder
    codec: TextCodec | None
    bos_id: int | None
    eos_id: int | None
    source: str


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def load_for_generation(path: str | pathlib.Path) -> LoadedModel:
    """The model (and tokenizer) of a Hugging Face directory or a dptrain checkpoint directory.

    Raises:
        GenerationError: neither kind of directory, or unreadable.
    """
    from dptrain.trainer._export import ExportError, load_checkpoint_model
    from dptrain.trainer._hf import PretrainedError, load_pretrained

    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise GenerationError(f"{directory}: not a directory")
    if (directory / "config.json").is_file():
        try:
            model, config = load_pretrained(directory)
        except PretrainedError as error:
            raise GenerationError(str(error)) from None
        codec: TextCodec | None = None
        if (directory / "tokenizer.json").is_file():
            codec = _HfTokenizer(directory / "tokenizer.json")
        elif isinstance(config.get("dptrain_tokenizer"), dict):
            codec = _dptrain_codec(config["dptrain_tokenizer"], directory)
        generation: dict[str, Any] = {}
        if (directory / "generation_config.json").is_file():
            generation = json.loads((directory / "generation_config.json").read_text())
        bos = _first_id(generation.get("bos_token_id", config.get("bos_token_id")))
        eos = _first_id(generation.get("eos_token_id", config.get("eos_token_id")))
        return LoadedModel(model=model, codec=codec, bos_id=bos, eos_id=eos,
                           source="huggingface")
    try:
        model, meta = load_checkpoint_model(directory)
    except ExportError as error:
        raise GenerationError(f"{directory}: neither a Hugging Face directory (config.json) "
                              f"nor a dptrain checkpoint: {error}") from None
    info = meta.get("tokenizer") or {}
    codec = _dptrain_codec(info, directory)
    if codec is None and meta.get("pretrained"):
        tokenizer_file = pathlib.Path(meta["pretrained"]["path"]) / "tokenizer.json"
        if tokenizer_file.is_file():
            codec = _HfTokenizer(tokenizer_file)
    return LoadedModel(model=model, codec=codec, bos_id=_first_id(info.get("bos_id")),
                       eos_id=_first_id(info.get("eos_id")), source="checkpoint")


def generate_text(loaded: LoadedModel, prompt: str | None = None, *,
                  prompt_ids: Sequence[int] | None = None, **options: Any) -> Generation:
    """Generate after a text prompt (tokenized, BOS prepended) or after raw ``prompt_ids``.

    Raises:
        GenerationError: no tokenizer for a text prompt, or a request :func:`generate_ids`
            rejects.
    """
    if prompt_ids is None:
        if loaded.codec is None:
            raise GenerationError("this model directory has no tokenizer (tokenizer.json); "
                                  "pass token ids instead of text")
        ids = loaded.codec.encode(prompt or "")
        if loaded.bos_id is not None:
            ids = [loaded.bos_id, *ids]
    else:
        ids = list(prompt_ids)
    new, stopped = generate_ids(loaded.model, ids, eos_id=loaded.eos_id, **options)
    text = None
    if loaded.codec is not None:
        shown = new[:-1] if stopped == "eos" else new
        text = loaded.codec.decode(shown)
    return Generation(prompt_ids=ids, new_ids=new, text=text, stopped=stopped)
