"""A Gemma-2-style decoder (VaultGemma's variant) written for one example.

Every layer maps one unbatched sequence ``[L]`` to ``[L, vocab]``; batching is ``jax.vmap`` outside,
which is exactly the shape per-example DP gradients need (``vmap(grad(loss), in_axes=(None, 0))``).

The same code also takes a batch ``[B, L]`` directly (the *batched path*: every einsum carries a
leading ``...``): rows never mix (dense layers and norms act per position, attention per row), so
it computes what ``vmap`` computes (tested), with one loss per row, so that one backward pass of
the summed loss gives every row's output gradients, and with the layer axis leading in the stacked
taps (``[layers, B, L, ...]``, contiguous per layer for the weight-gradient matmuls). The linear
maps, LoRA adapters included, are :func:`~dptrain.trainer._linear.dense` (2-D matmuls with a
backward pass XLA:CPU runs fast). The non-private step and ghost clipping use the batched path;
the per-example reference (``vmap(grad)``) keeps the one-example formulation.

Architecture (VaultGemma): RMSNorm pre-norm before attention and MLP, *no* post-norms; multi-query
attention (``n_kv_heads`` key/value heads shared by all query heads) with rotary position
embeddings; full causal attention in every layer; GeGLU MLP; input embedding scaled by
``sqrt(d_model)`` and tied with the output projection. Blocks are stacked on a leading axis and run
with ``lax.scan`` so that compile time does not grow with depth (unrolled up to
:data:`UNROLL_LAYERS` layers). The attention core, the GeGLU activation and the cross-entropy have
hand-written backward passes (``_fused.py``), and the q/k/v and gate/up projections run as one
matmul each (weights concatenated at apply time; parameters keep their shapes): the same
mathematics in fewer, larger XLA:CPU operations (``bench/model_profile.py`` times each part).

:class:`Architecture` (static, default: the above) adds what pretrained Gemma-2-family checkpoints
need for exact parity with their reference implementation: attention and final logit soft-capping
(``cap·tanh(x/cap)``), the ``query_pre_attn_scalar`` query scale, Gemma 2's post-norms (an RMSNorm
on the attention and MLP outputs before the residual add), sliding-window layers, the RoPE base and
the RMSNorm epsilon. None of them changes the layer interface: the post-norm scales are probed and
tapped like every other norm scale, so ghost clipping covers them exactly.

Every layer's ``forward(x, probes)`` also returns the inputs of its linear maps (its "taps") and
adds ``probes`` (zeros, or ``None``) to its linear outputs: differentiating a per-example loss with
respect to the probes gives each linear output's gradient without any weight gradient, which is
what ghost clipping (``_ghost.py``) needs. ``__call__`` is ``forward`` without probes, so the
mathematics is one code path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dptrain.planner import ModelShape
from dptrain.trainer._architecture import NORM_EPS as _NORM_EPS
from dptrain.trainer._architecture import ROPE_BASE as _ROPE_BASE
from dptrain.trainer._architecture import Architecture, softcap, visibility
from dptrain.trainer._fused import attention, causal_attention, cross_entropy, geglu
from dptrain.trainer._linear import dense

Taps = dict[str, Any]  # layer name -> array (or nested Taps for the stacked blocks)
UNROLL_LAYERS = 4  # forward passes of models this shallow unroll their layer loop
_DEFAULT_ARCH = Architecture()


def _probe(y: jax.Array, probes: Taps | None, name: str, x: jax.Array | None = None) -> jax.Array:
    """``y`` plus its probe (the probe is zeros; its gradient is ``∂loss/∂y``), if probed.

    A *weight probe* ``name@w`` (zeros shaped like the per-example weight gradient,
    ``[..., fan_in, *out]``) on the linear map ``y = x W`` instead receives each example's weight
    gradient ``xᵀ ∂loss/∂y`` (:func:`weight_probe`), computed inside the backward pass.
    """
    if probes is None:
        return y
    if x is not None and probes.get(name + "@w") is not None:
        y = weight_probe(y, x, probes[name + "@w"])
    probe = probes.get(name)
    return y if probe is None else y + probe


def _gradient_probe(per_example: Callable[[jax.Array, jax.Array], jax.Array]) -> Any:
    """``probe(y, x, p) = y`` whose backward gives ``p`` the cotangent ``per_example(x, ∂loss/∂y)``.

    ``x`` is kept from the forward pass and gets no gradient through here; ``p`` is never read.
    """
    @jax.custom_vjp
    def probe(y: jax.Array, x: jax.Array, p: jax.Array) -> jax.Array:
        del x, p
        return y

    def forward(y: jax.Array, x: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
        del p
        return y, x

    def backward(x: jax.Array, grad: jax.Array) -> tuple[jax.Array, None, jax.Array]:
        return grad, None, per_example(x, grad)

    probe.defvjp(forward, backward)
    return probe


def _weight_gradients(x: jax.Array, grad: jax.Array) -> jax.Array:
    lead, out = x.shape[:-2], grad.shape[x.ndim - 1:]
    g = grad.reshape(*lead, x.shape[-2], -1).astype(jnp.float32)
    per_example = jnp.matmul(jnp.swapaxes(x.astype(jnp.float32), -1, -2), g)
    return per_example.reshape(*lead, x.shape[-1], *out)


def _scale_gradients(normed: jax.Array, grad: jax.Array) -> jax.Array:
    return jnp.sum(normed.astype(jnp.float32) * grad.astype(jnp.float32), axis=-2)


weight_probe = _gradient_probe(_weight_gradients)
"""``weight_probe(y, x, probe)``: ``y`` unchanged; ``probe`` gets ``xᵀ ∂loss/∂y`` per example.

``x``: ``[..., L, fan_in]`` (the input of the linear map whose output is ``y``, ``[..., L,
*out]``); ``probe``: ``[..., fan_in, *out]``, float32. Ghost clipping's book-kept per-example
gradients (``_ghost.py``), computed where the output gradient is made.
"""

scale_probe = _gradient_probe(_scale_gradients)
"""``scale_probe(y, normed, probe)``: ``y`` unchanged; ``probe`` gets ``Σ_l normed_l ⊙ ∂loss/∂y_l``.

The per-example gradient of an RMSNorm's scale (``y = normed ⊙ (1 + scale)``; ``normed`` and
``y``: ``[..., L, d]``, ``probe``: ``[..., d]``, float32), computed inside the backward pass like
:func:`weight_probe`'s: neither the norm's output gradient nor its input is kept for ghost
clipping.
"""


def _norm(norm: RMSNorm, x: jax.Array, probes: Taps | None,
          name: str) -> tuple[jax.Array, jax.Array]:
    """``norm.forward`` with the probes of ``name``: on its output, or on its scale (``@w``)."""
    if probes is None:
        return norm.forward(x)
    out, normed = norm.forward(x, probes.get(name))
    if probes.get(name + "@w") is not None:
        out = scale_probe(out, normed, probes[name + "@w"])
    return out, normed


class Adapters(eqx.Module):
    """LoRA adapters of the linear maps of the blocks (stacked on a leading layer axis).

    A target's linear map ``y = x W`` (features flattened: heads × head_dim) becomes
    ``y = x W + scale·(x A) B`` with ``A``: ``[fan_in, rank]`` and ``B``: ``[rank, fan_out]``.
    A model holding adapters trains them only (``_lora.split``); its base weights are frozen.
    """

    a: dict[str, jax.Array]  # target -> [n_layers, fan_in, rank] (one layer: [fan_in, rank])
    b: dict[str, jax.Array]  # target -> [n_layers, rank, fan_out]
    scale: float = eqx.field(static=True)  # alpha / rank


def _adapt(y: jax.Array, x: jax.Array, lora: Adapters | None, name: str) -> jax.Array:
    """``y + scale·(x A) B`` for a target with an adapter (``x``: ``[..., L, fan_in]``), else y."""
    if lora is None or name not in lora.a:
        return y
    low = dense(dense(x, lora.a[name].astype(x.dtype)), lora.b[name].astype(x.dtype))
    return y + (lora.scale * low).reshape(y.shape)


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
    eps: float = eqx.field(static=True, default=_NORM_EPS)

    def __init__(self, dim: int, eps: float = _NORM_EPS) -> None:
        self.scale = jnp.zeros((dim,), jnp.float32)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise the last axis."""
        return self.forward(x)[0]

    def forward(self, x: jax.Array, probe: jax.Array | None = None) -> tuple[jax.Array,
                                                                            jax.Array]:
        """``(norm(x) + probe, x / rms(x))``: the output and the scale's input."""
        # In float32 whatever the compute dtype (as the reference), cast back at the end.
        xf = x.astype(jnp.float32)
        mean_square = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        normed = xf * jax.lax.rsqrt(mean_square + np.float32(self.eps))
        gain = (1.0 + self.scale.astype(jnp.float32)).reshape((1,) * (x.ndim - 1) + (-1,))
        out = (normed * gain).astype(x.dtype)
        return (out if probe is None else out + probe), normed.astype(x.dtype)


def rope_tables(length: int, head_dim: int,
                base: float = _ROPE_BASE) -> tuple[np.ndarray, np.ndarray]:
    """``(sin, cos)`` of the rotary angles, ``[L, 1, head_dim // 2]`` float32 constants.

    Computed on the host once per shape: inside the program they would be recomputed by every
    layer and every example (``sin``/``cos`` are slow on XLA:CPU).
    """
    inv_freq = inverse_frequencies(head_dim, base)
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]  # [L, half]
    return np.sin(angles)[:, None, :], np.cos(angles)[:, None, :]


def inverse_frequencies(head_dim: int, base: float = _ROPE_BASE) -> np.ndarray:
    """RoPE's ``base^(-2i/head_dim)`` for ``i < head_dim/2`` (float32, as the reference)."""
    half = head_dim // 2
    exponents = np.arange(0, 2 * half, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(base) ** exponents)).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array | None = None,
               base: float = _ROPE_BASE) -> jax.Array:
    """Rotary position embedding of ``x`` (``[..., L, heads, head_dim]``).

    ``positions`` (``[L]`` int, traced) defaults to ``0..L-1`` (tables computed on the host).
    """
    half = x.shape[-1] // 2
    if positions is None:
        sin, cos = rope_tables(x.shape[-3], x.shape[-1], base)
    else:
        angles = positions.astype(jnp.float32)[:, None] * inverse_frequencies(x.shape[-1], base)
        sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]
    lead = (1,) * (x.ndim - 3)  # batch axes of the batched path, broadcast explicitly
    sin = jnp.asarray(sin, x.dtype).reshape(*lead, *sin.shape)
    cos = jnp.asarray(cos, x.dtype).reshape(*lead, *cos.shape)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(eqx.Module):
    """Causal grouped-query attention with RoPE (no biases), optionally soft-capped/windowed."""

    wq: jax.Array  # [d_model, n_heads, head_dim]
    wk: jax.Array  # [d_model, n_kv_heads, head_dim]
    wv: jax.Array  # [d_model, n_kv_heads, head_dim]
    wo: jax.Array  # [n_heads, head_dim, d_model]
    arch: Architecture = eqx.field(static=True, default=_DEFAULT_ARCH)

    def __init__(self, shape: ModelShape, *, rng: np.random.Generator,
                 arch: Architecture = _DEFAULT_ARCH) -> None:
        d, h, g, k = shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim
        self.wq = _normal(rng, (d, h, k), d)
        self.wk = _normal(rng, (d, g, k), d)
        self.wv = _normal(rng, (d, g, k), d)
        self.wo = _normal(rng, (h, k, d), h * k)
        self.arch = arch

    def __call__(self, x: jax.Array) -> jax.Array:
        """Attend over ``x`` (``[L, d_model]``), each position seeing itself and the past."""
        return self.forward(x)[0]

    def project(self, x: jax.Array, probes: Taps | None = None,
                positions: jax.Array | None = None, lora: Adapters | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotated queries (scaled), rotated keys and values of ``x`` at ``positions``."""
        head_dim, base = self.wq.shape[2], self.arch.rope_theta
        scale = self.arch.query_scale if self.arch.query_scale is not None else head_dim ** -0.5

        # One matmul for q, k and v (weights concatenated at apply time; parameters keep their
        # shapes), split before the adapters and probes of each.
        weights = (self.wq, self.wk, self.wv)
        fused = dense(x, jnp.concatenate([w.reshape(w.shape[0], -1) for w in weights], axis=1))
        ends = np.cumsum([w.shape[1] * w.shape[2] for w in weights])[:-1]
        outputs = []
        for w, name, y in zip(weights, ("q", "k", "v"), jnp.split(fused, ends, axis=-1),
                              strict=True):
            y = _adapt(y.reshape(*y.shape[:-1], *w.shape[1:]), x, lora, name)
            outputs.append(_probe(y, probes, name, x))
        q = apply_rope(outputs[0], positions, base)
        k = apply_rope(outputs[1], positions, base)
        return q * jnp.asarray(scale, q.dtype), k, outputs[2]

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
        """Attention of queries ``[L, heads, hd]`` over keys/values ``[M, kv, hd]``.

        ``visible`` (``[L, M]`` bool) says which key each query may see. Returns the input of
        ``wo`` (``[L, heads, head_dim]``).
        """
        # Query heads grouped over the shared key/value heads; scores soft-capped, then masked
        # with a finite minimum (finite gradients on fully masked entries); float32 softmax.
        return attention(q, k, v, visible, self.arch.attn_softcap)

    def forward(self, x: jax.Array, probes: Taps | None = None,
                window: jax.Array | int | None = None,
                lora: Adapters | None = None) -> tuple[jax.Array, Taps]:
        """The attention output and the input of ``wo`` (``[L, heads, head_dim]``).

        ``window``: this layer's attention window (None: full causal attention); ``lora``:
        this layer's adapters.
        """
        length = x.shape[-2]
        q, k, v = self.project(x, probes, lora=lora)
        visible = visibility(np.arange(length), np.arange(length), window)
        # A sequence over itself: causal (windows too), so blocks of queries skip later keys.
        out = causal_attention(q, k, v, visible, self.arch.attn_softcap)
        flat_out, flat_wo = out.reshape(*out.shape[:-2], -1), self.wo.reshape(-1, self.wo.shape[-1])
        y = _adapt(dense(flat_out, flat_wo), flat_out, lora, "o")
        return _probe(y, probes, "o", flat_out), {"o": out}


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

    def forward(self, x: jax.Array, probes: Taps | None = None,
                lora: Adapters | None = None) -> tuple[jax.Array, Taps]:
        """The MLP output and the input of ``w_down`` (``[L, d_ff]``)."""
        # One matmul for gate and up (weights concatenated at apply time), split before the
        # adapters and probes of each.
        fused = dense(x, jnp.concatenate([self.w_gate, self.w_up], axis=1))
        gate, up = jnp.split(fused, 2, axis=-1)
        gate = _probe(_adapt(gate, x, lora, "gate"), probes, "gate", x)
        up = _probe(_adapt(up, x, lora, "up"), probes, "up", x)
        hidden = geglu(gate, up)
        return _probe(_adapt(dense(hidden, self.w_down), hidden, lora, "down"), probes, "down",
                      hidden), {"down": hidden}


class Block(eqx.Module):
    """One pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    With post-norms (Gemma 2): ``x + post_norm(attn(norm(x)))`` and likewise for the MLP.
    """

    attn_norm: RMSNorm
    attn: Attention
    mlp_norm: RMSNorm
    mlp: GeGLU
    attn_post_norm: RMSNorm | None = None
    mlp_post_norm: RMSNorm | None = None

    def __init__(self, shape: ModelShape, *, rng: np.random.Generator,
                 arch: Architecture = _DEFAULT_ARCH) -> None:
        self.attn_norm = RMSNorm(shape.d_model, arch.norm_eps)
        self.attn = Attention(shape, rng=rng, arch=arch)
        self.mlp_norm = RMSNorm(shape.d_model, arch.norm_eps)
        self.mlp = GeGLU(shape, rng=rng)
        if arch.post_norms:
            self.attn_post_norm = RMSNorm(shape.d_model, arch.norm_eps)
            self.mlp_post_norm = RMSNorm(shape.d_model, arch.norm_eps)
        else:
            self.attn_post_norm = self.mlp_post_norm = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """The block's residual update of ``x`` (``[L, d_model]``)."""
        return self.forward(x)[0]

    def forward(self, x: jax.Array, probes: Taps | None = None,
                window: jax.Array | int | None = None,
                lora: Adapters | None = None) -> tuple[jax.Array, Taps]:
        """The block's output and its taps (inputs of every linear map and norm scale)."""
        attn_in, attn_normed = _norm(self.attn_norm, x, probes, "attn_norm")
        attn_out, attn_taps = self.attn.forward(attn_in, probes, window, lora)
        taps = {"attn_norm": attn_normed, "attn_in": attn_in, **attn_taps}
        if self.attn_post_norm is not None:
            attn_out, taps["attn_post_norm"] = _norm(self.attn_post_norm, attn_out, probes,
                                                     "attn_post_norm")
        x = x + attn_out
        mlp_in, mlp_normed = _norm(self.mlp_norm, x, probes, "mlp_norm")
        mlp_out, mlp_taps = self.mlp.forward(mlp_in, probes, lora)
        taps |= {"mlp_norm": mlp_normed, "mlp_in": mlp_in, **mlp_taps}
        if self.mlp_post_norm is not None:
            mlp_out, taps["mlp_post_norm"] = _norm(self.mlp_post_norm, mlp_out, probes,
                                                   "mlp_post_norm")
        return x + mlp_out, taps

    def decode(self, x: jax.Array, position: jax.Array, cache: tuple[jax.Array, jax.Array],
               window: jax.Array | int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One position of incremental decoding with a key/value cache.

        Args:
            x: the hidden state of the new token, ``[1, d_model]``.
            position: its position (scalar int).
            cache: keys and values of every position so far, ``[T, kv, head_dim]`` each (entries
                at and after ``position`` are overwritten or masked).
            window: this layer's attention window.

        Returns:
            The block's output ``[1, d_model]`` and the updated cache. The same mathematics as
            :meth:`forward` (tested token for token against it).
        """
        keys, values = cache
        attn_in = self.attn_norm(x)
        q, k, v = self.attn.project(attn_in, positions=position[None])
        keys = jax.lax.dynamic_update_slice(keys, k, (position, 0, 0))
        values = jax.lax.dynamic_update_slice(values, v, (position, 0, 0))
        visible = visibility(position[None], jnp.arange(keys.shape[0]), window)
        attn_out = jnp.einsum("lhk,hkd->ld", self.attn.attend(q, keys, values, visible),
                              self.attn.wo)
        if self.attn_post_norm is not None:
            attn_out = self.attn_post_norm(attn_out)
        x = x + attn_out
        mlp_out = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            mlp_out = self.mlp_post_norm(mlp_out)
        return x + mlp_out, (keys, values)


class Decoder(eqx.Module):
    """The decoder-only language model for one sequence of token ids."""

    embedding: jax.Array  # [vocab, d_model], tied with the output projection
    blocks: Block  # every array has a leading n_layers axis
    final_norm: RMSNorm
    max_seq_len: int = eqx.field(static=True)
    arch: Architecture = eqx.field(static=True, default=_DEFAULT_ARCH)
    lora: Adapters | None = None  # LoRA adapters (``_lora.add_adapters``); None: full model

    def __init__(self, shape: ModelShape, *, key: jax.Array,
                 arch: Architecture = _DEFAULT_ARCH) -> None:
        rng = host_rng(key)
        # A small fixed scale (GPT-2's 0.02) keeps initial logits near uniform at every width, so
        # the initial loss starts near ln(vocab) instead of above it.
        self.embedding = _normal(rng, (shape.vocab_size, shape.d_model), 1, scale=0.02)
        blocks = [Block(shape, rng=rng, arch=arch) for _ in range(shape.n_layers)]
        self.blocks = jax.tree_util.tree_map(lambda *layers: jnp.stack(layers), *blocks)
        self.final_norm = RMSNorm(shape.d_model, arch.norm_eps)
        self.max_seq_len = shape.max_seq_len
        self.arch = arch
        self.lora = None

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks."""
        return int(self.blocks.attn.wq.shape[0])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Next-token logits ``[L, vocab]`` for ``tokens`` (``[L]`` int)."""
        return self.forward(tokens)[0]

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Scaled input embeddings ``[L, d_model]`` (Gemma's ``sqrt(d_model)``)."""
        d_model = self.embedding.shape[1]
        x = self.embedding[tokens]
        return x * jnp.asarray(math.sqrt(d_model), x.dtype)

    def head(self, h: jax.Array, probe: jax.Array | None = None) -> jax.Array:
        """Logits of final hidden states ``h`` (tied projection, then the final soft-cap)."""
        logits = dense(h, self.embedding.T)
        if probe is not None:
            logits = logits + probe
        return softcap(logits, self.arch.final_softcap)

    def forward(self, tokens: jax.Array, probes: Taps | None = None) -> tuple[jax.Array, Taps]:
        """Logits and taps; ``probes`` (see :func:`zero_probes`) are added to linear outputs.

        Taps: ``blocks`` (each block's taps, stacked on a leading layer axis), ``final_norm``
        (the normalised input of the final norm's scale) and ``head`` (the input of the tied
        output projection).
        """
        if tokens.ndim not in (1, 2):
            raise ValueError(f"Decoder takes one sequence [L] (or a batch [B, L] on the batched "
                             f"path); got shape {tokens.shape}")
        if tokens.shape[-1] > self.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[-1]} tokens exceeds the model's "
                             f"max_seq_len {self.max_seq_len}")
        get = (lambda name: None) if probes is None else probes.get
        x = self.embed(tokens)
        if get("embed") is not None:
            x = x + get("embed")
        arrays, static = eqx.partition(self.blocks, eqx.is_array)
        windows = self.arch.windows(self.n_layers, tokens.shape[-1])

        def layer(h: jax.Array, xs: tuple[Block, Taps | None, jax.Array, Adapters | None]
                  ) -> tuple[jax.Array, Taps]:
            block_arrays, block_probes, window, lora = xs
            return eqx.combine(block_arrays, static).forward(h, block_probes, window, lora)

        xs = (arrays, get("blocks"), jnp.asarray(windows), self.lora)
        if self.n_layers <= UNROLL_LAYERS:
            # Shallow models run their layers as a Python loop: XLA:CPU then keeps each layer's
            # residuals apart instead of stacking them into [layers, ...] buffers (measured at
            # the peers' benchmark shape: 12% less temporary memory), and a probe given as a
            # tuple of per-layer arrays (ghost clipping's weight probes) gets its per-layer
            # gradients back as they are, not copied into one stacked array. Deep models keep
            # a rolled loop so that compile time does not grow with depth.
            outputs = []
            for i in range(self.n_layers):
                x, taps = layer(x, tuple(_layer_slice(part, i) for part in xs))
                outputs.append(taps)
            block_taps = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outputs)
        else:
            x, block_taps = jax.lax.scan(layer, x, xs)
        head, final_normed = _norm(self.final_norm, x, probes, "final_norm")
        logits = self.head(head, get("logits"))
        return logits, {"blocks": block_taps, "final_norm": final_normed, "head": head}


    def decode(self, token: jax.Array, position: jax.Array,
               cache: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Next-token logits ``[vocab]`` after ``token`` at ``position``, with a KV cache.

        ``cache``: keys and values ``[n_layers, T, kv, head_dim]`` (see :func:`empty_cache`).
        A model with LoRA adapters is decoded after merging them (``_lora.merge``).
        """
        if self.lora is not None:
            raise ValueError("decode a model with LoRA adapters after merging them "
                             "(dptrain.trainer._lora.merge)")
        arrays, static = eqx.partition(self.blocks, eqx.is_array)
        keys, values = cache
        windows = jnp.asarray(self.arch.windows(self.n_layers, keys.shape[1]))

        def layer(h: jax.Array, xs: tuple[Block, jax.Array, jax.Array, jax.Array]
                  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            block_arrays, layer_keys, layer_values, window = xs
            block = eqx.combine(block_arrays, static)
            return block.decode(h, position, (layer_keys, layer_values), window)

        x = self.embed(token[None])
        x, cache = jax.lax.scan(layer, x, (arrays, keys, values, windows))
        return self.head(self.final_norm(x))[0], cache


def _layer_slice(tree: Any, i: int) -> Any:
    """Layer ``i`` of stacked arrays (``[layers, ...]``) or of tuples of per-layer arrays."""
    return jax.tree_util.tree_map(lambda a: a[i], tree, is_leaf=lambda a: isinstance(a, tuple))


def empty_cache(model: Decoder, length: int) -> tuple[jax.Array, jax.Array]:
    """Zero keys and values for ``length`` positions of every layer."""
    n_layers, _, n_kv, head_dim = model.blocks.attn.wk.shape
    zeros = jnp.zeros((n_layers, length, n_kv, head_dim), jnp.float32)
    return zeros, zeros


def zero_probes(model: Decoder, length: int, batch: int | None = None, *,
                targets: tuple[str, ...] | None = None, dtype: Any = jnp.float32) -> Taps:
    """Zeros shaped like every probed output of ``model`` on a sequence of ``length`` tokens.

    With ``batch``, for the batched path (``forward`` on ``[batch, length]``): the block probes
    are ``[n_layers, batch, length, ...]`` (layer axis first, as ``lax.scan`` stacks the taps),
    the others ``[batch, length, ...]``. ``targets``: probe only these block linear maps (the
    LoRA targets), nothing else.
    """
    attn, d_model = model.blocks.attn, model.embedding.shape[1]
    n_layers, _, n_heads, head_dim = attn.wq.shape
    n_kv, d_ff = attn.wk.shape[2], model.blocks.mlp.w_gate.shape[-1]
    rows = (length,) if batch is None else (batch, length)

    def zeros(*shape: int) -> jax.Array:
        return jnp.zeros(shape, dtype)

    def per_layer(*feature: int) -> jax.Array:
        return zeros(n_layers, *rows, *feature)

    blocks = {"attn_norm": per_layer(d_model), "q": per_layer(n_heads, head_dim),
              "k": per_layer(n_kv, head_dim), "v": per_layer(n_kv, head_dim),
              "o": per_layer(d_model), "mlp_norm": per_layer(d_model), "gate": per_layer(d_ff),
              "up": per_layer(d_ff), "down": per_layer(d_model)}
    if targets is not None:
        return {"blocks": {name: blocks[name] for name in targets}}
    if model.blocks.attn_post_norm is not None:
        blocks |= {"attn_post_norm": per_layer(d_model), "mlp_post_norm": per_layer(d_model)}
    return {"embed": zeros(*rows, d_model), "blocks": blocks, "final_norm": zeros(*rows, d_model),
            "logits": zeros(*rows, model.embedding.shape[0])}


def build_model(shape: ModelShape, *, key: jax.Array,
                arch: Architecture = _DEFAULT_ARCH) -> Decoder:
    """A freshly initialised decoder of ``shape`` (and architecture switches ``arch``)."""
    return Decoder(shape, key=key, arch=arch)


def count_params(model: Decoder) -> int:
    """Number of trainable scalars in ``model``."""
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
    return sum(int(leaf.size) for leaf in leaves)


def sequence_loss(model: Decoder, tokens: jax.Array, pad_id: int = 0) -> jax.Array:
    """Mean next-token cross-entropy of one sequence ``[L]``; targets equal to ``pad_id`` count 0.

    A token stored as ``~id`` (negative: :func:`mask_target`) is read as ``id`` but carries no
    loss as a target (an instruction's prompt). A sequence that is all padding has loss 0 (and
    zero gradient). On a batch ``[B, L]`` (the batched path) it returns each row's loss, ``[B]``:
    the same as ``vmap`` over the rows.
    """
    return token_loss(model.forward(input_ids(tokens[..., :-1]))[0], tokens[..., 1:], pad_id)


def mask_target(ids: Any) -> Any:
    """``ids`` marked "no loss as a target": ``~id`` (``-id - 1``, negative).

    :func:`input_ids` reads them back. Works on ints, numpy and JAX arrays.
    """
    return ~ids


def input_ids(tokens: jax.Array) -> jax.Array:
    """The token ids of ``tokens`` with the no-loss marks (:func:`mask_target`) removed."""
    return jnp.where(tokens < 0, ~tokens, tokens)


def target_weights(targets: jax.Array, pad_id: int = 0) -> jax.Array:
    """1.0 for targets that carry loss: not padding, not marked by :func:`mask_target`."""
    return ((targets >= 0) & (targets != pad_id)).astype(jnp.float32)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position cross-entropy of ``logits`` (``[..., L, vocab]``) against (unmarked) targets."""
    return cross_entropy(logits, input_ids(targets))


def token_loss(logits: jax.Array, targets: jax.Array, pad_id: int = 0) -> jax.Array:
    """Mean cross-entropy of ``logits`` (``[..., L, vocab]``) against the targets carrying loss.

    Targets equal to ``pad_id`` or marked by :func:`mask_target` count 0. Computed in float32
    whatever the logits' precision.
    """
    nll = token_nll(logits.astype(jnp.float32), targets)
    weights = target_weights(targets, pad_id).astype(nll.dtype)
    return jnp.sum(nll * weights, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)


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
