"""The decoder's non-matmul hot spots, written for XLA:CPU with hand-written backward passes.

Mathematically nothing but softmax attention and the GeGLU activation; what changes is the
program XLA:CPU receives (measured with ``bench/model_profile.py`` at the peers' benchmark
shapes, batch 64 × 128 positions, 4 query heads sharing 1 key/value head):

* :func:`attention` runs the query heads of a key/value group as extra *rows* of one matmul
  (``[group, positions × heads, head_dim] @ [group, head_dim, keys]``: for multi-query attention
  a plain batched matmul per row, with no layout transpose), where the grouped einsum
  ``"lgrk,mgk->grlm"`` made XLA:CPU transpose the ``[B, heads, L, L]`` scores on the way in and
  out of every product. Its backward pass keeps only the softmax weights and writes
  ``dS = P ⊙ (dP − rowsum(dO ⊙ O))`` in one fusion (autodiff kept the scores, the mask's select
  and the weights, and reduced ``dP ⊙ P`` over the keys).
* :func:`geglu` is ``gelu_tanh(gate) · up`` with a backward pass from ``gate``, ``up`` and the
  forward's ``tanh`` in one fusion per output, where autodiff kept five intermediates of the
  width of the MLP.

Both batch under ``vmap`` (the per-example reference) like any JAX function and work on the
unbatched ``[L, ...]`` path and the batched ``[B, L, ...]`` path alike (leading axes ``...``).
Reverse mode only (``jax.custom_vjp``): nothing in dptrain takes forward-mode derivatives of
the model.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, cap: float | None = None
) -> jax.Array:
    """Softmax attention of queries ``[..., L, heads, hd]`` over keys/values ``[..., M, kv, hd]``.

    Query head ``h`` uses key/value head ``h // (heads // kv)`` (grouped-query attention).
    ``visible`` (``[L, M]`` bool) says which key each query may see; invisible scores become the
    dtype's finite minimum before the softmax (finite gradients on fully masked rows). ``cap``:
    attention-logit soft-capping ``cap·tanh(s/cap)`` before masking (None: off). The softmax runs
    in float32 whatever the compute dtype. Returns ``[..., L, heads, hd]``.
    """
    *lead, length, n_heads, head_dim = q.shape
    n_keys, n_kv = k.shape[-3], k.shape[-2]
    group = n_heads // n_kv
    # [..., L, kv, r, hd] -> [..., kv, L·r, hd]: a group's query heads are extra rows (a free
    # reshape for multi-query attention, kv = 1).
    rows = jnp.moveaxis(q.reshape(*lead, length, n_kv, group, head_dim), -3, -4)
    rows = rows.reshape(*lead, n_kv, length * group, head_dim)
    mask = jnp.broadcast_to(visible[:, None, :], (length, group, n_keys))
    mask = mask.reshape((1,) * (len(lead) + 1) + (length * group, n_keys))
    out = _attention_rows(rows, jnp.moveaxis(k, -2, -3), jnp.moveaxis(v, -2, -3), mask, cap)
    out = jnp.moveaxis(out.reshape(*lead, n_kv, length, group, head_dim), -4, -3)
    return out.reshape(*lead, length, n_heads, head_dim)


# Query blocks of causal_attention: at least CAUSAL_BLOCK positions each, at most CAUSAL_BLOCKS.
# At the peers' benchmark shape (128 positions: 2 blocks) the model's forward+backward took 8%
# less CPU time than without blocks; 4 blocks of 32 were no faster than 2 (more, smaller ops).
CAUSAL_BLOCK = 64
CAUSAL_BLOCKS = 4


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, cap: float | None = None
) -> jax.Array:
    """:func:`attention` of a sequence over itself when no query sees a later key.

    ``visible`` must be causal (``visible[l, m]`` False for ``m > l``; a sliding window is
    causal too). The queries are cut into up to :data:`CAUSAL_BLOCKS` blocks of at least
    :data:`CAUSAL_BLOCK` positions and block ``i`` attends to the keys up to its own end only:
    the skipped scores are invisible, whose softmax weights are exactly zero, so the result is
    :func:`attention`'s, for ``(n − 1)/2n`` less score work (``n`` blocks: 25% at 2).
    """
    length = q.shape[-3]
    n_blocks = max(1, min(CAUSAL_BLOCKS, length // CAUSAL_BLOCK))
    if n_blocks == 1:
        return attention(q, k, v, visible, cap)
    ends = [(i + 1) * length // n_blocks for i in range(n_blocks)]
    outs, start = [], 0
    for end in ends:
        outs.append(
            attention(
                q[..., start:end, :, :],
                k[..., :end, :, :],
                v[..., :end, :, :],
                visible[start:end, :end],
                cap,
            )
        )
        start = end
    return jnp.concatenate(outs, axis=-3)


def _scores(q: jax.Array, k: jax.Array, cap: float | None) -> tuple[jax.Array, jax.Array | None]:
    """Soft-capped scores ``q kᵀ`` and the ``tanh`` of the cap (None without a cap)."""
    scores = jnp.einsum("...nd,...md->...nm", q, k)
    if cap is None:
        return scores, None
    c = jnp.asarray(np.float32(cap), scores.dtype)
    t = jnp.tanh(scores / c)
    return t * c, t


def _softmax_rows(
    q: jax.Array, k: jax.Array, mask: jax.Array, cap: float | None
) -> tuple[jax.Array, jax.Array | None]:
    """Masked softmax weights (float32) and the cap's ``tanh``."""
    scores, t = _scores(q, k, cap)
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min).astype(jnp.float32)
    # As jax.nn.softmax: exp(s − max s) / Σ exp(s − max s).
    unnormalized = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True), t


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_rows(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cap: float | None
) -> jax.Array:
    """``softmax(mask(cap(q kᵀ))) v`` for ``q`` ``[..., N, hd]``, ``k, v`` ``[..., M, hd]``."""
    weights, _ = _softmax_rows(q, k, mask, cap)
    return jnp.einsum("...nm,...md->...nd", weights.astype(v.dtype), v)


def _attention_rows_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cap: float | None
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    weights, t = _softmax_rows(q, k, mask, cap)
    out = jnp.einsum("...nm,...md->...nd", weights.astype(v.dtype), v)
    return out, (q, k, v, mask, weights, out, t)


def _attention_rows_bwd(
    cap: float | None, residuals: tuple[jax.Array, ...], d_out: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, None]:
    q, k, v, mask, weights, out, t = residuals
    dtype = v.dtype
    d_weights = jnp.einsum("...nd,...md->...nm", d_out, v).astype(jnp.float32)
    d_v = _contract_rows(weights.astype(dtype), d_out)
    # Softmax's pullback, with Σ_m dP·P = Σ_d dO·O (a [N, hd] product, not [N, M]).
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    # Masked scores get exactly zero gradient (the select's transpose), even on a fully masked
    # row, where the weights are uniform rather than zero.
    d_scores = jnp.where(mask, weights * (d_weights - row), 0.0)
    if t is not None:
        d_scores = d_scores * (1.0 - jnp.square(t.astype(jnp.float32)))
    d_scores = d_scores.astype(dtype)
    d_q = jnp.einsum("...nm,...md->...nd", d_scores, k)
    d_k = _contract_rows(d_scores, q)
    return d_q, d_k, d_v, None


_attention_rows.defvjp(_attention_rows_fwd, _attention_rows_bwd)


def _contract_rows(a: jax.Array, b: jax.Array) -> jax.Array:
    """``aᵀ b`` over the rows: ``[..., N, M] × [..., N, D] → [..., M, D]``.

    Computed as ``(bᵀ a)ᵀ``: XLA:CPU runs ``"nd,nm->dm"`` in its fast matmul path and the
    ``[M, D]`` result is small, where ``"nm,nd->md"`` went to a slower contraction (1.6× the
    time at the benchmark's ``[64, 512, 128] × [64, 512, 32]``).
    """
    return jnp.swapaxes(jnp.einsum("...nd,...nm->...dm", b, a), -1, -2)


@jax.custom_vjp
def geglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``gelu(gate) · up``, GELU in its tanh approximation (``jax.nn.gelu(approximate=True)``)."""
    return jax.nn.gelu(gate, approximate=True) * up


def _geglu_fwd(
    gate: jax.Array, up: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    # jax.nn.gelu's own operations, keeping the tanh for the backward pass.
    c, a = np.sqrt(2.0 / np.pi).astype(gate.dtype), jnp.asarray(_GELU_A, gate.dtype)
    t = jnp.tanh(c * (gate + a * (gate * gate * gate)))
    return gate * (0.5 * (1.0 + t)) * up, (gate, up, t)


def _geglu_bwd(
    residuals: tuple[jax.Array, jax.Array, jax.Array], d_out: jax.Array
) -> tuple[jax.Array, jax.Array]:
    gate, up, t = residuals
    c, a = jnp.asarray(_GELU_C, gate.dtype), jnp.asarray(_GELU_A, gate.dtype)
    half = 0.5 * (1.0 + t)  # gelu(g) = g · half
    # d gelu / dg = half + g · ½(1 − t²) · c(1 + 3a g²)
    slope = half + 0.5 * gate * (1.0 - t * t) * c * (1.0 + 3.0 * a * gate * gate)
    return d_out * up * slope, d_out * gate * half


geglu.defvjp(_geglu_fwd, _geglu_bwd)


@jax.custom_vjp
def cross_entropy(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """``-log softmax(logits)[id]`` per position: logits ``[..., V]``, ids ``[...]`` (valid ids).

    ``logsumexp(logits) − logits[id]``; the backward pass is ``softmax − onehot(id)`` in one
    fusion (autodiff of ``log_softmax`` and ``take_along_axis`` kept the log-probabilities and
    scattered the gradient back into a zero array).
    """
    return _logsumexp(logits) - _pick(logits, ids)


def _logsumexp(logits: jax.Array) -> jax.Array:
    top = jnp.max(logits, axis=-1)
    return top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))


def _pick(logits: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]


def _cross_entropy_fwd(
    logits: jax.Array, ids: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    lse = _logsumexp(logits)
    return lse - _pick(logits, ids), (logits, ids, lse)


def _cross_entropy_bwd(
    residuals: tuple[jax.Array, ...], d_nll: jax.Array
) -> tuple[jax.Array, None]:
    logits, ids, lse = residuals
    vocab = jax.lax.broadcasted_iota(ids.dtype, logits.shape, logits.ndim - 1)
    onehot = (vocab == ids[..., None]).astype(logits.dtype)
    return d_nll[..., None] * (jnp.exp(logits - lse[..., None]) - onehot), None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
