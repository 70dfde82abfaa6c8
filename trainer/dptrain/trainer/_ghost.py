"""Ghost (book-keeping) clipping: per-example norms and the clipped sum without per-example grads.

``vmap(grad)`` materialises one gradient per example (batch × parameters of memory). For the
decoder's layers the per-example gradient is a known product of two small tensors, so its norm
and the clipped sum can be had from those tensors alone (Li et al. 2022 "ghost clipping"; Bu et
al. 2023 "book-keeping"):

* a linear map ``y = x W`` (``x``: ``[L, i]``, output gradient ``δ = ∂loss/∂y``: ``[L, o]``) has
  per-example gradient ``xᵀδ``, with ``‖xᵀδ‖² = ⟨x xᵀ, δ δᵀ⟩`` (the "ghost norm", ``L²(i+o)``
  work) or, when cheaper, ``‖xᵀδ‖²`` computed directly (``L·i·o`` work, ``i·o`` memory per
  example; only chosen when that is no more than the ghost norm's);
* the tied embedding's gradient is ``√d·scatter(δ_embed at tokens) + δ_logitsᵀ h``: its squared
  norm is the input part by token-equality grouping (``d·Σ_{l,m: t_l = t_m} δ_l·δ_m``), the output
  part as a linear map, and twice their inner product (``√d·Σ_l δ_l · Σ_m δ_logits[m, t_l] h_m``);
* RMSNorm scales (``d`` numbers) get exact per-example gradients ``Σ_l δ_l ⊙ x̂_l`` — the pre-norms,
  the final norm and, in Gemma-2-style models, the post-norms alike.

* a LoRA adapter ``y = x W + s·(x A) B`` (``W`` frozen) has per-example gradients
  ``∇B = (s·x A)ᵀ δ`` and ``∇A = xᵀ (s·δ Bᵀ)``: two linear maps whose inputs and output gradients
  come from the same taps and probes (``x A`` and ``δ Bᵀ`` are ``[L, rank]``), so their norms and
  clipped sums are the linear case above. A model holding adapters trains only them
  (``_lora.split``): only the adapters' norms are computed, and only their linear outputs probed.

Soft-capping, sliding windows and the query scale have no parameters: they only shape the output
gradients ``δ``, which the backward pass computes through them, so the norms stay exact.

The output gradients ``δ`` come from one backward pass with respect to zero "probes" added to
every linear output (``Decoder.forward``), which computes no weight gradient; the inputs ``x``
are the forward's taps. The clipped sum ``Σ_b c_b g_b`` is then book-kept from the same tensors
(``Σ_b c_b x_bᵀδ_b``: the non-private weight gradient's work), without a second backward pass.

Formal guarantees:
    1. Exactness: :func:`ghost_norms` returns the squared L2 norm of each example's full gradient
       (all parameters jointly) and :func:`weighted_grad_sum` returns ``Σ_b w_b ∇loss_b``; both
       equal the ``vmap(grad)`` reference up to floating-point reassociation (tested to 1e-5
       relative on every preset shape, and on LoRA adapters, where the gradient is the
       adapters').
    2. A row with weight 0 (padding, or a non-finite norm) contributes exactly zero, even when its
       activations or gradients are NaN or infinite (selected away, not multiplied by zero).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from dptrain.trainer._model import Adapters, Decoder, Taps, input_ids, token_loss, zero_probes

Params = Any

# Per-block RMSNorms (post-norms exist only in Gemma-2-style models).
_NORMS = ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm")


class GhostTape(NamedTuple):
    """What the clipped sum is book-kept from: each example's taps and output gradients."""

    tokens: jax.Array  # [B, L] the model's input tokens (targets excluded)
    taps: Taps  # inputs of every linear map / norm scale, leading batch axis
    grads: Taps  # ∂loss_b/∂(probed output), same structure as zero_probes, leading batch axis


def _sq_norm_linear(x: jax.Array, delta: jax.Array) -> jax.Array:
    """``‖x_bᵀ δ_b‖²`` per leading index for ``x`` ``[..., L, i]`` and ``delta`` ``[..., L, o]``."""
    length, fan_in, fan_out = x.shape[-2], x.shape[-1], delta.shape[-1]
    if fan_in * fan_out <= length * (fan_in + fan_out):
        grad = jnp.einsum("...li,...lo->...io", x, delta)
        return jnp.sum(jnp.square(grad), axis=(-2, -1))
    gram_x = jnp.einsum("...li,...mi->...lm", x, x)
    gram_d = jnp.einsum("...lo,...mo->...lm", delta, delta)
    return jnp.sum(gram_x * gram_d, axis=(-2, -1))


def _flat(a: jax.Array, dims: int) -> jax.Array:
    """Merge the trailing ``dims`` axes (heads × head_dim → one feature axis)."""
    return a.reshape(*a.shape[: a.ndim - dims], -1)


def _linear_pairs(tape: GhostTape) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``(input, output gradient)`` of every block linear map, ``[B, layers, L, features]``."""
    taps, grads = tape.taps["blocks"], tape.grads["blocks"]
    return {"wq": (taps["attn_in"], _flat(grads["q"], 2)),
            "wk": (taps["attn_in"], _flat(grads["k"], 2)),
            "wv": (taps["attn_in"], _flat(grads["v"], 2)),
            "wo": (_flat(taps["o"], 2), grads["o"]),
            "w_gate": (taps["mlp_in"], grads["gate"]),
            "w_up": (taps["mlp_in"], grads["up"]),
            "w_down": (taps["down"], grads["down"])}


def _lora_inputs(tape: GhostTape) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``(input, output gradient)`` of each LoRA target's linear map, ``[B, layers, L, f]``."""
    taps, grads = tape.taps["blocks"], tape.grads["blocks"]
    inputs = {"q": taps["attn_in"], "k": taps["attn_in"], "v": taps["attn_in"],
              "o": _flat(taps["o"], 2), "gate": taps["mlp_in"], "up": taps["mlp_in"],
              "down": taps["down"]}
    return {name: (inputs[name], _flat(grads[name], grads[name].ndim - 3)) for name in grads}


def _lora_pairs(tape: GhostTape, lora: Adapters) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``(input, output gradient)`` of every adapter matrix.

    ``A``: ``(x, s·δBᵀ)``; ``B``: ``(s·xA, δ)`` (``s`` the adapters' scale).
    """
    pairs = {}
    for name, (x, delta) in _lora_inputs(tape).items():
        a, b = lora.a[name], lora.b[name]  # [n, in, r], [n, r, out]
        pairs["a/" + name] = (x, lora.scale * jnp.einsum("bnlo,nro->bnlr", delta, b))
        pairs["b/" + name] = (lora.scale * jnp.einsum("bnli,nir->bnlr", x, a), delta)
    return pairs


def _norm_scale_grads(tape: GhostTape) -> dict[str, jax.Array]:
    """Exact per-example gradients of the RMSNorm scales (``[B, layers, d]`` / ``[B, d]``)."""
    taps, grads = tape.taps, tape.grads
    return {name: jnp.einsum("bnld,bnld->bnd", taps["blocks"][name], grads["blocks"][name])
            for name in _NORMS if name in taps["blocks"]} | {
        "final_norm": jnp.einsum("bld,bld->bd", taps["final_norm"], grads["final_norm"])}


def _embedding_sq_norms(tape: GhostTape) -> jax.Array:
    """Squared norm of each example's tied-embedding gradient (input gather + output head)."""
    delta_in, delta_out, head = tape.grads["embed"], tape.grads["logits"], tape.taps["head"]
    tokens, d_model = tape.tokens, delta_in.shape[-1]
    same = (tokens[:, :, None] == tokens[:, None, :]).astype(delta_in.dtype)
    input_part = d_model * jnp.sum(same * jnp.einsum("bld,bmd->blm", delta_in, delta_in),
                                   axis=(1, 2))
    output_part = _sq_norm_linear(head, delta_out)
    # Row t_l of the head's gradient, Σ_m δ_logits[m, t_l] h_m, met by the input part at l.
    at_tokens = jnp.take_along_axis(delta_out, tokens[:, None, :], axis=2)  # [B, m, l]
    rows = jnp.einsum("bml,bmd->bld", at_tokens, head)
    cross = 2.0 * math.sqrt(d_model) * jnp.sum(delta_in * rows, axis=(1, 2))
    return input_part + output_part + cross


def ghost_norms(static: Decoder, params: Params, tokens: jax.Array, pad_id: int = 0, *,
                compute_dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array, GhostTape]:
    """Per-example squared gradient norms and losses of ``tokens`` (``[B, L+1]``), and the tape.

    ``static`` may hold frozen arrays (a LoRA model's base): the gradient is ``params``'. With a
    ``compute_dtype`` of bfloat16 the forward and backward run in it, and the taps and output
    gradients are cast to float32 before any norm or sum (float32 clipping).

    Returns:
        ``(squared_norms [B], losses [B], tape)``; the tape feeds :func:`weighted_grad_sum`.
    """
    model = cast_floating(eqx.combine(params, static), compute_dtype)
    # Marked targets (an instruction's prompt) are read as plain ids and carry no loss.
    inputs, targets = input_ids(tokens[:, :-1]), tokens[:, 1:]
    lora = model.lora
    probes = zero_probes(model, inputs.shape[1], dtype=compute_dtype,
                         targets=None if lora is None else tuple(lora.a))

    def loss(probe: Taps, row: jax.Array, target: jax.Array) -> tuple[jax.Array, Taps]:
        logits, taps = model.forward(row, probe)
        return token_loss(logits, target, pad_id), taps

    per_example = jax.vmap(jax.value_and_grad(loss, has_aux=True), in_axes=(None, 0, 0))
    (losses, taps), grads = per_example(probes, inputs, targets)
    to32 = functools.partial(jax.tree_util.tree_map, lambda a: a.astype(jnp.float32))
    tape = GhostTape(tokens=inputs, taps=to32(taps), grads=to32(grads))
    if lora is not None:  # only the adapters are trained
        adapters = eqx.combine(params, static).lora  # float32 master copy
        assert adapters is not None
        squares = [jnp.sum(_sq_norm_linear(x, d), axis=1)
                   for x, d in _lora_pairs(tape, adapters).values()]
        return sum(squares[1:], squares[0]), losses, tape
    squares = [jnp.sum(_sq_norm_linear(x, d), axis=1) for x, d in _linear_pairs(tape).values()]
    squares += [jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)
                for g in _norm_scale_grads(tape).values()]
    squares.append(_embedding_sq_norms(tape))
    return sum(squares[1:], squares[0]), losses, tape


def _select(a: jax.Array, keep: jax.Array) -> jax.Array:
    """``a`` with rows where ``keep`` is False replaced by exact zeros (NaN-safe)."""
    return jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0.0)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """``tree`` with its floating arrays cast to ``dtype`` (no-op for float32 arrays)."""
    def cast(a: Any) -> Any:
        if eqx.is_array(a) and jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype:
            return a.astype(dtype)
        return a
    return jax.tree_util.tree_map(cast, tree)


def weighted_grad_sum(params: Params, tape: GhostTape, weights: jax.Array,
                      static: Decoder | None = None) -> Params:
    """``Σ_b weights_b ∇loss_b``, shaped like ``params``; rows of weight 0 contribute zero.

    ``static``: the rest of the model when ``params`` are LoRA adapters (their base arrays).
    """
    keep = weights != 0
    w = jnp.where(keep, weights, 0.0)

    def scaled(delta: jax.Array) -> jax.Array:
        return _select(delta, keep) * w.reshape((-1,) + (1,) * (delta.ndim - 1))

    if getattr(params, "lora", None) is not None:
        adapters = params.lora if static is None else eqx.combine(params, static).lora
        sums = {key: jnp.einsum("bnli,bnlo->nio", _select(x, keep), scaled(delta))
                for key, (x, delta) in _lora_pairs(tape, adapters).items()}
        return eqx.tree_at(lambda p: (p.lora.a, p.lora.b), params,
                           ({t: sums["a/" + t] for t in adapters.a},
                            {t: sums["b/" + t] for t in adapters.b}))

    blocks = params.blocks
    new: dict[str, jax.Array] = {}
    for name, (x, delta) in _linear_pairs(tape).items():
        summed = jnp.einsum("bnli,bnlo->nio", _select(x, keep), scaled(delta))
        layer = blocks.attn if name in ("wq", "wk", "wv", "wo") else blocks.mlp
        new[name] = summed.reshape(getattr(layer, name).shape)
    scales = {name: jnp.einsum("bnd->nd" if g.ndim == 3 else "bd->d", scaled(g))
              for name, g in _norm_scale_grads(tape).items()}
    delta_in, delta_out, head = tape.grads["embed"], tape.grads["logits"], tape.taps["head"]
    d_model = delta_in.shape[-1]
    embed = jnp.einsum("blv,bld->vd", scaled(delta_out), _select(head, keep))
    embed = embed.at[tape.tokens.reshape(-1)].add(
        (math.sqrt(d_model) * scaled(delta_in)).reshape(-1, d_model))
    out = eqx.tree_at(
        lambda p: (p.embedding, p.blocks.attn.wq, p.blocks.attn.wk, p.blocks.attn.wv,
                   p.blocks.attn.wo, p.blocks.mlp.w_gate, p.blocks.mlp.w_up, p.blocks.mlp.w_down,
                   p.blocks.attn_norm.scale, p.blocks.mlp_norm.scale, p.final_norm.scale),
        params,
        (embed, new["wq"], new["wk"], new["wv"], new["wo"], new["w_gate"], new["w_up"],
         new["w_down"], scales["attn_norm"], scales["mlp_norm"], scales["final_norm"]))
    if "attn_post_norm" in scales:
        out = eqx.tree_at(lambda p: (p.blocks.attn_post_norm.scale, p.blocks.mlp_post_norm.scale),
                          out, (scales["attn_post_norm"], scales["mlp_post_norm"]))
    return out
