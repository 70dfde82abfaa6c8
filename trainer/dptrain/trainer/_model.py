"""A Gemma-2-style decoder (VaultGemma's variant) written for one example.

Every layer maps one unbatched sequence ``[L]`` to ``[L, vocab]``; batching is ``jax.vmap`` outside,
which is exactly the shape per-example DP gradients need (``vmap(grad(loss), in_axes=(None, 0))``).

Architecture (VaultGemma): RMSNorm pre-norm before attention and MLP, *no* post-norms; multi-query
attention (``n_kv_heads`` key/value heads shared by all query heads) with rotary position
embeddings; full causal attention in every layer; GeGLU MLP; input embedding scaled by
``sqrt(d_model)`` and tied with the output projection. Blocks are stacked on a leading axis and run
with ``lax.scan`` so that compile time does not grow with depth.

Every layer's ``forward(x, probes)`` also returns the inputs of its linear maps (its "taps") and
adds ``probes`` (zeros, or ``None``) to its linear outputs: differentiating a per-example loss with
respect to the probes gives each linear output's gradient without any weight gradient, which is
what ghost clipping (``_ghost.py``) needs. ``__call__`` is ``forward`` without probes, so the
mathematics is one code path.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dptrain.planner import ModelShape

_ROPE_BASE = 10_000.0
_NORM_EPS = 1e-6

Taps = dict[str, Any]  # layer name -> array (or nested Taps for the stacked blocks)


def _probe(y: jax.Array, probes: Taps | None, name: str) -> jax.Array:
    """``y`` plus its probe (the probe is zeros; its gradient is ``∂loss/∂y``)."""
    return y if probes is None else y + probes[name]


def host_rng(key: jax.Array) -> np.random.Generator:
    """A numpy stream determined by a JAX key, for initialisation.

    Initialising on the host avoids compiling a PRNG program per weight shape (seconds each on
    CPU) while staying a pure function of the key.
    """
    words = np.asarray(jax.random.key_data(key), dtype=np.uint64).ravel()
    return np.random.Generator(np.random.Philox(key=int(words[0]) << 32 | int(words[-1])))


def _normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int,
            scale: float = 1.0) -> jax.Array:
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale / math.sqrt(fan_in))
    return jnp.asarray(values)


class RMSNorm(eqx.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + scale)``, scale initialised to zero."""

    scale: jax.Array

    def __init__(self, dim: int) -> None:
        self.scale = jnp.zeros((dim,), jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise the last axis."""
        return self.forward(x)[0]

    def forward(self, x: jax.Array, probe: jax.Array | None = None) -> tuple[jax.Array,
                                                                            jax.Array]:
        """``(norm(x) + probe, x / rms(x))``: the output and the scale's input."""
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        normed = x * jax.lax.rsqrt(mean_square + _NORM_EPS)
        gain = (1.0 + self.scale).reshape((1,) * (x.ndim - 1) + (-1,))
        out = normed * gain
        return (out if probe is None else out + probe), normed


def rope_tables(length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sin, cos)`` of the rotary angles, ``[L, 1, head_dim // 2]`` float32 constants.

    Computed on the host once per shape: inside the program they would be recomputed by every
    layer and every example (``sin``/``cos`` are slow on XLA:CPU).
    """
    half = head_dim // 2
    inv_freq = _ROPE_BASE ** (-np.arange(half, dtype=np.float32) / np.float32(half))
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]  # [L, half]
    return np.sin(angles)[:, None, :], np.cos(angles)[:, None, :]


def apply_rope(x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Rotary position embedding of ``x`` (``[L, heads, head_dim]``) at positions ``0..L-1``.

    ``positions`` is accepted for callers of the older signature and must be ``arange(L)``.
    """
    del positions
    half = x.shape[-1] // 2
    sin, cos = rope_tables(x.shape[0], x.shape[-1])
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(eqx.Module):
    """Causal multi-query attention with RoPE (no biases)."""

    wq: jax.Array  # [d_model, n_heads, head_dim]
    wk: jax.Array  # [d_model, n_kv_heads, head_dim]
    wv: jax.Array  # [d_model, n_kv_heads, head_dim]
    wo: jax.Array  # [n_heads, head_dim, d_model]

    def __init__(self, shape: ModelShape, *, rng: np.random.Generator) -> None:
        d, h, g, k = shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim
        self.wq = _normal(rng, (d, h, k), d)
        self.wk = _normal(rng, (d, g, k), d)
        self.wv = _normal(rng, (d, g, k), d)
        self.wo = _normal(rng, (h, k, d), h * k)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Attend over ``x`` (``[L, d_model]``), each position seeing itself and the past."""
        return self.forward(x)[0]

    def forward(self, x: jax.Array, probes: Taps | None = None) -> tuple[jax.Array, Taps]:
        """The attention output and the input of ``wo`` (``[L, heads, head_dim]``)."""
        length = x.shape[0]
        n_heads, head_dim = self.wq.shape[1], self.wq.shape[2]
        n_kv = self.wk.shape[1]
        q = apply_rope(_probe(jnp.einsum("ld,dhk->lhk", x, self.wq), probes, "q"))
        k = apply_rope(_probe(jnp.einsum("ld,dgk->lgk", x, self.wk), probes, "k"))
        v = _probe(jnp.einsum("ld,dgk->lgk", x, self.wv), probes, "v")
        # Query heads are grouped over the shared key/value heads (one group per kv head).
        q = q.reshape(length, n_kv, n_heads // n_kv, head_dim) * np.float32(1 / math.sqrt(head_dim))
        scores = jnp.einsum("lgrk,mgk->grlm", q, k)
        causal = np.tril(np.ones((length, length), dtype=bool))
        # A finite minimum (not -inf) keeps gradients finite on fully masked entries.
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("grlm,mgk->lgrk", weights, v).reshape(length, n_heads, head_dim)
        return _probe(jnp.einsum("lhk,hkd->ld", out, self.wo), probes, "o"), {"o": out}


class GeGLU(eqx.Module):
    """``down(gelu(gate(x)) * up(x))``: Gemma's gated MLP."""

    w_gate: jax.Array  # [d_model, d_ff]
    w_up: jax.Array  # [d_model, d_ff]
    w_down: jax.Array  # [d_ff, d_model]

    def __init__(self, shape: ModelShape, *, rng: np.random.Generator) -> None:
        self.w_gate = _normal(rng, (shape.d_model, shape.d_ff), shape.d_model)
        self.w_up = _normal(rng, (shape.d_model, shape.d_ff), shape.d_model)
        self.w_down = _normal(rng, (shape.d_ff, shape.d_model), shape.d_ff)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the MLP position-wise to ``x`` (``[L, d_model]``)."""
        return self.forward(x)[0]

    def forward(self, x: jax.Array, probes: Taps | None = None) -> tuple[jax.Array, Taps]:
        """The MLP output and the input of ``w_down`` (``[L, d_ff]``)."""
        gate = _probe(x @ self.w_gate, probes, "gate")
        hidden = jax.nn.gelu(gate, approximate=True) * _probe(x @ self.w_up, probes, "up")
        return _probe(hidden @ self.w_down, probes, "down"), {"down": hidden}


class Block(eqx.Module):
    """One pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    attn_norm: RMSNorm
    attn: Attention
    mlp_norm: RMSNorm
    mlp: GeGLU

    def __init__(self, shape: ModelShape, *, rng: np.random.Generator) -> None:
        self.attn_norm = RMSNorm(shape.d_model)
        self.attn = Attention(shape, rng=rng)
        self.mlp_norm = RMSNorm(shape.d_model)
        self.mlp = GeGLU(shape, rng=rng)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The block's residual update of ``x`` (``[L, d_model]``)."""
        return self.forward(x)[0]

    def forward(self, x: jax.Array, probes: Taps | None = None) -> tuple[jax.Array, Taps]:
        """The block's output and its taps (inputs of every linear map and norm scale)."""
        get = (lambda name: None) if probes is None else probes.__getitem__
        attn_in, attn_normed = self.attn_norm.forward(x, get("attn_norm"))
        attn_out, attn_taps = self.attn.forward(attn_in, probes)
        x = x + attn_out
        mlp_in, mlp_normed = self.mlp_norm.forward(x, get("mlp_norm"))
        mlp_out, mlp_taps = self.mlp.forward(mlp_in, probes)
        taps = {"attn_norm": attn_normed, "attn_in": attn_in, "mlp_norm": mlp_normed,
                "mlp_in": mlp_in, **attn_taps, **mlp_taps}
        return x + mlp_out, taps


class Decoder(eqx.Module):
    """The decoder-only language model for one sequence of token ids."""

    embedding: jax.Array  # [vocab, d_model], tied with the output projection
    blocks: Block  # every array has a leading n_layers axis
    final_norm: RMSNorm
    max_seq_len: int = eqx.field(static=True)

    def __init__(self, shape: ModelShape, *, key: jax.Array) -> None:
        rng = host_rng(key)
        # A small fixed scale (GPT-2's 0.02) keeps initial logits near uniform at every width, so
        # the initial loss starts near ln(vocab) instead of above it.
        self.embedding = _normal(rng, (shape.vocab_size, shape.d_model), 1, scale=0.02)
        blocks = [Block(shape, rng=rng) for _ in range(shape.n_layers)]
        self.blocks = jax.tree_util.tree_map(lambda *layers: jnp.stack(layers), *blocks)
        self.final_norm = RMSNorm(shape.d_model)
        self.max_seq_len = shape.max_seq_len

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Next-token logits ``[L, vocab]`` for ``tokens`` (``[L]`` int)."""
        return self.forward(tokens)[0]

    def forward(self, tokens: jax.Array, probes: Taps | None = None) -> tuple[jax.Array, Taps]:
        """Logits and taps; ``probes`` (see :func:`zero_probes`) are added to linear outputs.

        Taps: ``blocks`` (each block's taps, stacked on a leading layer axis), ``final_norm``
        (the normalised input of the final norm's scale) and ``head`` (the input of the tied
        output projection).
        """
        if tokens.ndim != 1:
            raise ValueError(f"Decoder takes one sequence [L]; got shape {tokens.shape} "
                             "(batch with jax.vmap)")
        if tokens.shape[0] > self.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[0]} tokens exceeds the model's "
                             f"max_seq_len {self.max_seq_len}")
        d_model = self.embedding.shape[1]
        get = (lambda name: None) if probes is None else probes.__getitem__
        x = self.embedding[tokens] * np.float32(math.sqrt(d_model))
        if probes is not None:
            x = x + probes["embed"]
        arrays, static = eqx.partition(self.blocks, eqx.is_array)

        def layer(h: jax.Array, xs: tuple[Block, Taps | None]) -> tuple[jax.Array, Taps]:
            block_arrays, block_probes = xs
            return eqx.combine(block_arrays, static).forward(h, block_probes)

        x, block_taps = jax.lax.scan(layer, x, (arrays, get("blocks")))
        head, final_normed = self.final_norm.forward(x, get("final_norm"))
        logits = head @ self.embedding.T
        if probes is not None:
            logits = logits + probes["logits"]
        return logits, {"blocks": block_taps, "final_norm": final_normed, "head": head}


def zero_probes(model: Decoder, length: int) -> Taps:
    """Zeros shaped like every probed output of ``model`` on a sequence of ``length`` tokens."""
    attn, d_model = model.blocks.attn, model.embedding.shape[1]
    n_layers, _, n_heads, head_dim = attn.wq.shape
    n_kv, d_ff = attn.wk.shape[2], model.blocks.mlp.w_gate.shape[-1]

    def zeros(*shape: int) -> jax.Array:
        return jnp.zeros(shape, jnp.float32)

    blocks = {"attn_norm": zeros(n_layers, length, d_model), "q": zeros(n_layers, length, n_heads,
              head_dim), "k": zeros(n_layers, length, n_kv, head_dim),
              "v": zeros(n_layers, length, n_kv, head_dim), "o": zeros(n_layers, length, d_model),
              "mlp_norm": zeros(n_layers, length, d_model), "gate": zeros(n_layers, length, d_ff),
              "up": zeros(n_layers, length, d_ff), "down": zeros(n_layers, length, d_model)}
    return {"embed": zeros(length, d_model), "blocks": blocks,
            "final_norm": zeros(length, d_model),
            "logits": zeros(length, model.embedding.shape[0])}


def build_model(shape: ModelShape, *, key: jax.Array) -> Decoder:
    """A freshly initialised decoder of ``shape``."""
    return Decoder(shape, key=key)


def count_params(model: Decoder) -> int:
    """Number of trainable scalars in ``model``."""
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
    return sum(int(leaf.size) for leaf in leaves)


def sequence_loss(model: Decoder, tokens: jax.Array, pad_id: int = 0) -> jax.Array:
    """Mean next-token cross-entropy of one sequence ``[L]``; targets equal to ``pad_id`` count 0.

    A sequence that is all padding has loss 0 (and zero gradient).
    """
    return token_loss(model(tokens[:-1]), tokens[1:], pad_id)


def token_loss(logits: jax.Array, targets: jax.Array, pad_id: int = 0) -> jax.Array:
    """Mean cross-entropy of ``logits`` (``[L, vocab]``) against targets not equal to ``pad_id``."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
    weights = (targets != pad_id).astype(nll.dtype)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def greedy_continue(model: Decoder, prompt: jax.Array, num_tokens: int) -> jax.Array:
    """Greedy-decode ``num_tokens`` after ``prompt`` (``[P]``); returns the new tokens only.

    Recomputes the full forward per token (no KV cache): the audit runs on small models, and a
    fixed-length buffer keeps one compiled shape.
    """
    prompt_len = prompt.shape[0]
    buffer = jnp.concatenate([prompt, jnp.zeros((num_tokens,), prompt.dtype)])

    def step(i: jax.Array, buf: jax.Array) -> jax.Array:
        logits = model(buf)
        position = prompt_len + i
        next_token = jnp.argmax(logits[position - 1]).astype(buf.dtype)
        return buf.at[position].set(next_token)

    buffer = jax.lax.fori_loop(0, num_tokens, step, buffer)
    return buffer[prompt_len:]
