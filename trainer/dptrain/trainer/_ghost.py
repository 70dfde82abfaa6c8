"""Ghost (book-keeping) clipping: per-example norms and the clipped sum without per-example grads.

``vmap(grad)`` materialises one gradient per example (batch × parameters of memory). For the
decoder's layers the per-example gradient is a known product of two small tensors, so its norm
and the clipped sum can be had from those tensors alone (Li et al. 2022 "ghost clipping"; Bu et
al. 2023 "book-keeping"):

* a linear map ``y = x W`` (``x``: ``[L, i]``, output gradient ``δ = ∂loss/∂y``: ``[L, o]``) has
  per-example gradient ``G = xᵀδ``. When ``i·o > L(i+o)`` its norm is the "ghost norm"
  ``‖xᵀδ‖² = ⟨x xᵀ, δ δᵀ⟩`` (``L²(i+o)`` work) and the clipped sum is book-kept from ``x, δ``
  (``Σ_b c_b x_bᵀδ_b``, the non-private weight gradient's matmul). Otherwise ``G_b`` is no larger
  than the tape ``x_b, δ_b`` it is computed from and no slower to get than the ghost norm: it is
  kept (``GhostTape.book``), its norm read off, and the clipped sum is ``Σ_b c_b G_b`` — a
  matrix-vector product in place of a second weight-gradient matmul (book-keeping, Bu et al.
  2023). A kept ``G_b`` is computed inside the backward pass, layer by layer where ``δ`` is
  made, by a *weight probe* on the map (``_model.weight_probe``): it takes the place of the
  non-private step's weight-gradient matmul, and the map's output gradients are never stacked
  over the layers nor read back;
* the tied embedding's gradient is ``√d·scatter(δ_embed at tokens) + δ_logitsᵀ h``. Kept per
  example by the same rule (both parts in one matmul), or else its squared norm is the input part
  by token-equality grouping (``d·Σ_{l,m: t_l = t_m} δ_l·δ_m``), the output part as a linear map,
  and twice their inner product (``√d·Σ_l δ_l · Σ_m δ_logits[m, t_l] h_m``);
* RMSNorm scales (``d`` numbers) get exact per-example gradients ``Σ_l δ_l ⊙ x̂_l`` — the pre-norms,
  the final norm and, in Gemma-2-style models, the post-norms alike — from a *scale probe*
  (``_model.scale_probe``) inside the backward pass;
* a LoRA adapter ``y = x W + s·(x A) B`` (``W`` frozen) has per-example gradients
  ``∇B = (s·x A)ᵀ δ`` and ``∇A = xᵀ (s·δ Bᵀ)``: two linear maps whose inputs and output gradients
  come from the same taps and probes (``x A`` and ``δ Bᵀ`` are ``[L, rank]``), so their norms and
  clipped sums are the linear case above (with the same kept-or-ghost choice; ``rank`` is small,
  so the adapters' per-example gradients are usually kept). A model holding adapters trains only
  them (``_lora.split``): only the adapters' norms are computed, and only their linear outputs
  probed.

Soft-capping, sliding windows and the query scale have no parameters: they only shape the output
gradients ``δ``, which the backward pass computes through them, so the norms stay exact.

The output gradients ``δ`` come from one backward pass of the batched model (``Decoder.forward``
on ``[B, L]``) with respect to zero "probes" added to the linear outputs on the ghost branch (and
the norms and embedding), which computes no weight gradient; the inputs ``x`` are the forward's
taps; the kept maps' per-example gradients come out of the same backward pass (weight probes).
The clipped sum ``Σ_b c_b g_b`` is then book-kept from the kept gradients and the tape, without a
second backward pass and without a copy of the kept gradients (rows of weight 0 are multiplied
by 0, not selected away, when every squared norm is finite; see :func:`weighted_grad_sum`).
``bench/dp_overhead.py`` breaks the DP step's extra time down piece by piece. With a bfloat16
compute dtype the forward and backward run in it; the taps and output gradients are cast to
float32 before any norm or sum (float32 clipping). Targets marked "no loss" (an instruction's
prompt, :func:`~dptrain.trainer._model.mask_target`) are read as plain ids and carry no loss.

Formal guarantees:
    1. Exactness: :func:`ghost_norms` returns the squared L2 norm of each example's full gradient
       (all parameters jointly) and :func:`weighted_grad_sum` returns ``Σ_b w_b ∇loss_b``; both
       equal the ``vmap(grad)`` reference up to floating-point reassociation (tested to 1e-5
       relative on every preset shape, and on LoRA adapters, where the gradient is the
       adapters').
    2. A row with weight 0 (padding, or a non-finite norm) contributes exactly zero, even when its
       activations or gradients are NaN or infinite: when any squared norm is non-finite the rows
       of weight 0 are selected away (not multiplied by zero); otherwise every number the sum
       reads is finite (a non-finite value in a row's kept gradient, inputs or output gradients
       makes that row's squared norm non-finite), and ``0 × finite = ±0``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dptrain.trainer._model import (
    UNROLL_LAYERS,
    Adapters,
    Decoder,
    Taps,
    input_ids,
    token_loss,
    zero_probes,
)

Params = Any

# Per-block RMSNorms (post-norms exist only in Gemma-2-style models).
_NORMS = ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm")


class GhostTape(NamedTuple):
    """What the clipped sum is book-kept from.

    Batched-path layout: block entries are ``[layers, B, L, ...]``, the others ``[B, L, ...]``.
    """

    tokens: jax.Array  # [B, L] the model's input tokens (targets excluded)
    taps: Taps  # inputs of every linear map / norm scale
    grads: Taps  # ∂loss_b/∂(probed output), same structure as zero_probes(batch=B)
    # Per-example gradients kept for the sum (see _materialise); a block map's is stacked on a
    # leading layer axis, or a tuple of per-layer [B, ...] arrays (see _weight_probes).
    book: dict[str, Any]
    sq_norms: jax.Array  # [B] the squared norms computed from this tape (see weighted_grad_sum)


def _materialise(length: int, fan_in: int, fan_out: int) -> bool:
    """Whether a linear map's per-example gradient is kept rather than its ghost norm used.

    Kept: ``G_b = x_bᵀδ_b`` (``L·i·o`` multiply-adds, the work of the non-private weight
    gradient), one pass over it for the norm and one for ``Σ_b c_b G_b`` (a batched
    matrix-vector product): ``L·i·o + 2p·i·o``, ``p`` the cost of a memory pass per number in
    matmul multiply-adds. Ghost: the Gram matrices (``L²(i+o)``) and the clipped sum book-kept as
    a second weight-gradient matmul ``xᵀ(c ⊙ δ)`` (``L·i·o``). Measured on XLA:CPU
    (``bench/dp_overhead.py``: ``p`` ≈ 10–13), the kept branch is the faster wherever
    ``2p·i·o ≤ L²(i+o)``, which at ``L ≥ 2p`` (every sequence length trained in practice) holds
    wherever the rule used here does: keep ``G_b`` when it is no larger than the tape
    ``x_b, δ_b`` it is computed from (``i·o ≤ L(i+o)``), so that the DP step's memory stays the
    non-private step's plus at most one more tape.
    """
    return fan_in * fan_out <= length * (fan_in + fan_out)


def _flat(a: jax.Array, dims: int) -> jax.Array:
    """Merge the trailing ``dims`` axes (heads × head_dim → one feature axis)."""
    return a.reshape(*a.shape[: a.ndim - dims], -1)


# Block linear maps: parameter -> (tap holding its input, probe of its output).
_LINEAR = {"wq": ("attn_in", "q"), "wk": ("attn_in", "k"), "wv": ("attn_in", "v"),
           "wo": ("o", "o"), "w_gate": ("mlp_in", "gate"), "w_up": ("mlp_in", "up"),
           "w_down": ("down", "down")}


def _linear_pairs(taps: Taps, grads: Taps) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``(input, output gradient)`` of the probed block linear maps, ``[layers, B, L, features]``.

    Only the maps on the ghost branch have their outputs probed (the kept ones: weight probes).
    """
    taps, grads = taps["blocks"], grads["blocks"]
    pairs = {}
    for name, (tap, out) in _LINEAR.items():
        if out in grads:
            x = _flat(taps[tap], 2) if tap == "o" else taps[tap]
            pairs[name] = (x, _flat(grads[out], grads[out].ndim - 3))
    return pairs


def _weight_probes(model: Decoder, probes: Taps, length: int, batch: int) -> Taps:
    """``probes`` with each kept map's and every norm's output probe replaced by a weight probe.

    A weight probe (``_model.weight_probe``) receives the map's per-example gradient
    ``x_bᵀδ_b`` from inside the backward pass, where ``δ`` is made: the output gradients of kept
    maps are then never stacked over the layers nor read back. In a model whose layers run
    unrolled (``_model.UNROLL_LAYERS``) each weight probe is a tuple of per-layer arrays, so
    that its gradients come back per layer, not copied into one ``[layers, B, ...]`` array (a
    copy of every kept gradient: 4 % of the DP step at the peers' benchmark shape). The RMSNorm
    scales get scale probes (``_model.scale_probe``, ``[layers, B, d]``): their per-example
    gradients ``Σ_l δ_l ⊙ x̂_l`` come out of the backward pass, and neither ``δ`` nor ``x̂``
    (``[layers, B, L, d]`` each) is kept, stacked or padded into a stacked gradient.
    """
    blocks = dict(probes["blocks"])
    unrolled = model.n_layers <= UNROLL_LAYERS
    for name, (_, out) in _LINEAR.items():
        w = getattr(model.blocks.attn if name in ("wq", "wk", "wv", "wo") else model.blocks.mlp,
                    name)
        fan_in, out_shape = ((w.shape[1] * w.shape[2], w.shape[3:]) if name == "wo"
                             else (w.shape[1], w.shape[2:]))
        if _materialise(length, fan_in, math.prod(out_shape)):
            del blocks[out]
            zeros = jnp.zeros((w.shape[0], batch, fan_in, *out_shape), jnp.float32)
            blocks[out + "@w"] = tuple(zeros) if unrolled else zeros
    d_model = model.embedding.shape[1]
    for name in _NORMS:
        if name in blocks:
            del blocks[name]
            blocks[name + "@w"] = jnp.zeros((model.n_layers, batch, d_model), jnp.float32)
    rest = {k: v for k, v in probes.items() if k != "final_norm"}
    return {**rest, "blocks": blocks, "final_norm@w": jnp.zeros((batch, d_model), jnp.float32)}


def _lora_pairs(taps: Taps, grads: Taps,
                lora: Adapters) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``(input, output gradient)`` of every adapter matrix, ``[layers, B, L, features]``.

    ``A``: ``(x, s·δBᵀ)``; ``B``: ``(s·xA, δ)`` (``s`` the adapters' scale; ``x`` and ``δ`` the
    target's input and output gradient).
    """
    taps, grads = taps["blocks"], grads["blocks"]
    inputs = {"q": taps["attn_in"], "k": taps["attn_in"], "v": taps["attn_in"],
              "o": _flat(taps["o"], 2), "gate": taps["mlp_in"], "up": taps["mlp_in"],
              "down": taps["down"]}
    pairs = {}
    for name in lora.a:
        x, delta = inputs[name], _flat(grads[name], grads[name].ndim - 3)
        a, b = lora.a[name], lora.b[name]  # [n, in, r], [n, r, out]
        pairs["a/" + name] = (x, lora.scale * jnp.einsum("nblo,nro->nblr", delta, b))
        pairs["b/" + name] = (lora.scale * jnp.einsum("nbli,nir->nblr", x, a), delta)
    return pairs


def _linear_sq_norms(pairs: dict[str, tuple[jax.Array, jax.Array]], length: int,
                     book: dict[str, jax.Array]) -> list[jax.Array]:
    """Each pair's per-example squared norms ``[B]``: kept gradient (into ``book``) or ghost.

    Maps reading the same input (q, k, v; gate and up; LoRA ``A`` of one target) share its Gram
    matrix ``x xᵀ``: ``Σ_k ‖xᵀδ_k‖² = ⟨x xᵀ, Σ_k δ_k δ_kᵀ⟩``, one product and reduction for all.
    """
    squares = []
    shared: dict[int, tuple[jax.Array, list[jax.Array]]] = {}  # id(x) -> (x, [δ δᵀ, ...])
    for name, (x, delta) in pairs.items():
        if _materialise(length, x.shape[-1], delta.shape[-1]):
            book[name] = jnp.einsum("nbli,nblo->nbio", x, delta)
            squares.append(jnp.sum(jnp.square(book[name]), axis=(0, 2, 3)))
        else:
            gram_d = jnp.einsum("nblo,nbmo->nblm", delta, delta)
            shared.setdefault(id(x), (x, []))[1].append(gram_d)
    for x, gram_ds in shared.values():
        gram_x = jnp.einsum("nbli,nbmi->nblm", x, x)
        squares.append(jnp.sum(gram_x * sum(gram_ds[1:], gram_ds[0]), axis=(0, 2, 3)))
    return squares


def _embedding_gram_sq_norms(tokens: jax.Array, delta_in: jax.Array, delta_out: jax.Array,
                             head: jax.Array) -> jax.Array:
    """Squared norm of each example's tied-embedding gradient (input gather + output head)."""
    d_model = delta_in.shape[-1]
    same = (tokens[:, :, None] == tokens[:, None, :]).astype(delta_in.dtype)
    input_part = d_model * jnp.sum(same * jnp.einsum("bld,bmd->blm", delta_in, delta_in),
                                   axis=(1, 2))
    output_part = jnp.sum(jnp.einsum("blv,bmv->blm", delta_out, delta_out)
                          * jnp.einsum("bld,bmd->blm", head, head), axis=(1, 2))
    # Row t_l of the head's gradient, Σ_m δ_logits[m, t_l] h_m, met by the input part at l.
    at_tokens = jnp.take_along_axis(delta_out, tokens[:, None, :], axis=2)  # [B, m, l]
    rows = jnp.einsum("bml,bmd->bld", at_tokens, head)
    cross = 2.0 * math.sqrt(d_model) * jnp.sum(delta_in * rows, axis=(1, 2))
    return input_part + output_part + cross


def _embedding_grads(tokens: jax.Array, delta_in: jax.Array, delta_out: jax.Array,
                     head: jax.Array) -> jax.Array:
    """Each example's tied-embedding gradient ``[B, vocab, d]``: head part plus the gather's.

    ``δ_logitsᵀ h + √d·onehot(tokens)ᵀ δ_embed``, as one matmul over the positions of both.
    """
    vocab, d_model = delta_out.shape[-1], delta_in.shape[-1]
    left = jnp.concatenate([delta_out, jax.nn.one_hot(tokens, vocab, dtype=delta_out.dtype)],
                           axis=1)
    right = jnp.concatenate([head, np.float32(math.sqrt(d_model)) * delta_in], axis=1)
    return jnp.einsum("blv,bld->bvd", left, right)


def ghost_norms(static: Decoder, params: Params, tokens: jax.Array, pad_id: int = 0, *,
                compute_dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array, GhostTape]:
    """Per-example squared gradient norms and losses of ``tokens`` (``[B, L+1]``), and the tape.

    One forward and one backward pass of the batched model with respect to zero probes on every
    linear output: the probes of row ``b`` only reach row ``b``'s loss, so the gradient of the
    summed loss with respect to them is each row's own output gradient.

    ``static`` may hold frozen arrays (a LoRA model's base): the gradient is ``params``'. With a
    ``compute_dtype`` of bfloat16 the forward and backward run in it, and the taps and output
    gradients are cast to float32 before any norm or sum (float32 clipping).

    Returns:
        ``(squared_norms [B], losses [B], tape)``; the tape feeds :func:`weighted_grad_sum`.
    """
    model = cast_floating(eqx.combine(params, static), compute_dtype)
    # Marked targets (an instruction's prompt) are read as plain ids and carry no loss.
    inputs, targets = input_ids(tokens[:, :-1]), tokens[:, 1:]
    batch, length = inputs.shape
    lora = model.lora
    probes = zero_probes(model, length, batch, dtype=compute_dtype,
                         targets=None if lora is None else tuple(lora.a))
    if lora is None:
        probes = _weight_probes(model, probes, length, batch)

    def total(probe: Taps) -> tuple[jax.Array, tuple[jax.Array, Taps]]:
        logits, taps = model.forward(inputs, probe)
        losses = token_loss(logits, targets, pad_id)
        return jnp.sum(losses), (losses, taps)

    (_, (losses, taps)), grads = jax.value_and_grad(total, has_aux=True)(probes)
    to32 = functools.partial(jax.tree_util.tree_map, lambda a: a.astype(jnp.float32))
    taps, grads = to32(taps), to32(grads)
    book: dict[str, jax.Array] = {}
    if lora is not None:  # only the adapters are trained
        adapters = eqx.combine(params, static).lora  # float32 master copy
        assert adapters is not None
        squares = _linear_sq_norms(_lora_pairs(taps, grads, adapters), length, book)
        sq_norms = sum(squares[1:], squares[0])
        return sq_norms, losses, GhostTape(tokens=inputs, taps=taps, grads=grads, book=book,
                                           sq_norms=sq_norms)
    squares = []
    for name, (_, out) in _LINEAR.items():  # kept: the weight probes' gradients
        if out + "@w" in grads["blocks"]:
            book[name] = grads["blocks"][out + "@w"]
            squares.append(_layered_sq_norms(book[name]))
    pairs = _linear_pairs(taps, grads)
    squares += _linear_sq_norms(pairs, length, book)
    for name in _NORMS:  # RMSNorm scales: the scale probes' gradients, [layers, B, d]
        if name + "@w" in grads["blocks"]:
            book[name] = grads["blocks"][name + "@w"]
            squares.append(jnp.sum(jnp.square(book[name]), axis=(0, 2)))
    book["final_norm"] = grads["final_norm@w"]
    squares.append(jnp.sum(jnp.square(book["final_norm"]), axis=1))
    embed = (inputs, grads["embed"], grads["logits"], taps["head"])
    vocab, d_model = model.embedding.shape
    # The tape keeps only what the weighted sum reads besides the book: the ghost branch's.
    tape_taps: Taps = {"blocks": {_LINEAR[name][0]: taps["blocks"][_LINEAR[name][0]]
                                  for name in pairs}}
    tape_grads: Taps = {"blocks": {_LINEAR[name][1]: grads["blocks"][_LINEAR[name][1]]
                                   for name in pairs}}
    if _materialise(length, vocab, d_model):
        book["embedding"] = _embedding_grads(*embed)
        squares.append(jnp.sum(jnp.square(book["embedding"]), axis=(1, 2)))
    else:
        squares.append(_embedding_gram_sq_norms(*embed))
        tape_taps["head"] = taps["head"]
        tape_grads |= {"embed": grads["embed"], "logits": grads["logits"]}
    sq_norms = sum(squares[1:], squares[0])
    return sq_norms, losses, GhostTape(tokens=inputs, taps=tape_taps, grads=tape_grads,
                                       book=book, sq_norms=sq_norms)


def _layered_sq_norms(g: Any) -> jax.Array:
    """Per-example squared norms ``[B]`` of a layered kept gradient (stacked or per layer)."""
    layers = g if isinstance(g, tuple) else (g,)
    first = 0 if isinstance(g, tuple) else 1  # the batch axis
    out = [jnp.sum(jnp.square(a), axis=tuple(k for k in range(a.ndim) if k != first))
           for a in layers]
    return sum(out[1:], out[0])


def _select(a: jax.Array, keep: jax.Array, axis: int = 0) -> jax.Array:
    """``a`` with rows (along ``axis``) where ``keep`` is False replaced by exact zeros."""
    shape = [1] * a.ndim
    shape[axis] = -1
    return jnp.where(keep.reshape(shape), a, 0.0)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """``tree`` with its floating arrays cast to ``dtype`` (no-op for float32 arrays)."""
    def cast(a: Any) -> Any:
        if eqx.is_array(a) and jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype:
            return a.astype(dtype)
        return a
    return jax.tree_util.tree_map(cast, tree)


def _layered(name: str) -> bool:
    """Whether a kept gradient is stacked on a leading layer axis (batch axis 1)."""
    return name not in ("final_norm", "embedding")


def _book_sum(g: Any, w: jax.Array, layered: bool) -> jax.Array:
    """``Σ_b w_b G_b`` as a (batched) matrix-vector product: ``[1, B] × [B, rest]``.

    Written so because XLA:CPU runs a ``dot`` contracting the batch axis of ``[layers, B, ...]``
    (``tensordot``) after a transpose of the whole of ``G``, 4–5× slower (bench/dp_overhead.py).
    A tuple of per-layer gradients is summed layer by layer and stacked (parameter-sized).
    """
    if isinstance(g, tuple):
        return jnp.stack([_book_sum(a, w, layered=False) for a in g])
    if not layered:
        return (w[None, :] @ g.reshape(g.shape[0], -1)).reshape(g.shape[1:])
    n, batch = g.shape[:2]
    rows = jnp.broadcast_to(w[None, None, :], (n, 1, batch))
    return jnp.matmul(rows, g.reshape(n, batch, -1)).reshape(n, *g.shape[2:])


def _tape_sum(x: jax.Array, delta: jax.Array, w: jax.Array) -> jax.Array:
    """``Σ_b w_b x_bᵀδ_b`` (``[layers, B, L, ...]`` inputs) as one 2-D matmul per layer.

    ``xᵀ (w ⊙ δ)`` over the merged batch and position axes, in the form
    :func:`~dptrain.trainer._linear.dense`'s backward pass uses (the weight gradient's).
    """
    n, batch, length, fan_in = x.shape
    scaled = (delta * w[None, :, None, None]).reshape(n, batch * length, -1)
    return jnp.matmul(jnp.swapaxes(x.reshape(n, batch * length, fan_in), 1, 2), scaled)


def _select_rows(tape: GhostTape, keep: jax.Array) -> GhostTape:
    """``tape`` with the rows not kept replaced by exact zeros in every float array."""
    def zero(a: jax.Array, axis: int) -> jax.Array:
        return _select(a, keep, axis) if jnp.issubdtype(a.dtype, jnp.floating) else a

    def layered_tree(tree: Taps) -> Taps:
        return {k: jax.tree_util.tree_map(functools.partial(zero, axis=1 if k == "blocks" else 0),
                                          v) for k, v in tree.items()}

    book = {k: tuple(zero(a, 0) for a in v) if isinstance(v, tuple)
            else zero(v, 1 if _layered(k) else 0) for k, v in tape.book.items()}
    return tape._replace(taps=layered_tree(tape.taps), grads=layered_tree(tape.grads),
                         book=book)


def weighted_grad_sum(params: Params, tape: GhostTape, weights: jax.Array,
                      static: Decoder | None = None) -> Params:
    """``Σ_b weights_b ∇loss_b``, shaped like ``params``; rows of weight 0 contribute zero.

    ``static``: the rest of the model when ``params`` are LoRA adapters (their base arrays).

    A row of weight 0 contributes exactly zero: when every squared norm on the tape is finite,
    every number the sum reads is finite (a NaN or infinity in a row's kept gradient, inputs or
    output gradients makes its squared norm non-finite: it enters its own square, or the Gram
    matrix diagonal ``‖x_l‖²·‖δ_l‖²``), so ``0 × value = ±0``; otherwise (rare) the rows of weight
    0 are first replaced by zeros (selected away, never multiplied), at the cost of a copy.
    """
    keep = weights != 0
    w = jnp.where(keep, weights, 0.0)
    finite = jnp.all(jnp.isfinite(tape.sq_norms))
    # Select the rows away at most once, in a while loop rather than a ``lax.cond``: a cond
    # whose branch returns its operand unchanged copies every array it returns (the whole
    # book, 130 MB at the peers' benchmark shape: 5-6 % of the DP step), where a loop's carry
    # is updated in place; and only the tape passes through, so the sum is compiled once (a
    # branch per case would compile the whole weighted sum twice).
    def select_once(state: tuple[jax.Array, GhostTape]) -> tuple[jax.Array, GhostTape]:
        return jnp.array(True), _select_rows(state[1], keep)

    _, tape = jax.lax.while_loop(lambda state: ~(state[0] | finite), select_once,
                                 (jnp.array(False), tape))
    return _weighted_sum(params, tape, w, static)


def _weighted_sum(params: Params, tape: GhostTape, w: jax.Array,
                  static: Decoder | None) -> Params:
    """``Σ_b w_b ∇loss_b`` from a tape whose every row is finite (see weighted_grad_sum)."""
    def linear_sum(name: str, x: jax.Array, delta: jax.Array) -> jax.Array:
        """``Σ_b w_b x_bᵀδ_b`` from the kept gradient or book-kept from the tape."""
        if name in tape.book:
            return _book_sum(tape.book[name], w, layered=True)
        return _tape_sum(x, delta, w)

    if getattr(params, "lora", None) is not None:
        adapters = params.lora if static is None else eqx.combine(params, static).lora
        sums = {key: linear_sum(key, x, delta)
                for key, (x, delta) in _lora_pairs(tape.taps, tape.grads, adapters).items()}
        return eqx.tree_at(lambda p: (p.lora.a, p.lora.b), params,
                           ({t: sums["a/" + t] for t in adapters.a},
                            {t: sums["b/" + t] for t in adapters.b}))

    blocks = params.blocks
    pairs = _linear_pairs(tape.taps, tape.grads)
    new: dict[str, jax.Array] = {}
    for name in _LINEAR:
        summed = linear_sum(name, *pairs[name]) if name in pairs else _book_sum(
            tape.book[name], w, layered=True)
        layer = blocks.attn if name in ("wq", "wk", "wv", "wo") else blocks.mlp
        new[name] = summed.reshape(getattr(layer, name).shape)
    scales = {name: _book_sum(tape.book[name], w, _layered(name))
              for name in (*_NORMS, "final_norm") if name in tape.book}
    if "embedding" in tape.book:
        embed = _book_sum(tape.book["embedding"], w, layered=False)
    else:
        delta_in, delta_out, head = tape.grads["embed"], tape.grads["logits"], tape.taps["head"]
        d_model = delta_in.shape[-1]
        embed = jnp.einsum("blv,bld->vd", delta_out * w[:, None, None], head)
        embed = embed.at[tape.tokens.reshape(-1)].add(
            (math.sqrt(d_model) * delta_in * w[:, None, None]).reshape(-1, d_model))
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
