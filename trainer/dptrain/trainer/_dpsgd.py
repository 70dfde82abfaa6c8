"""The DP-SGD step: per-example gradients, clipping, one noise draw, expected-batch normalisation.

One step, for a physical batch of ``B`` rows (padding rows masked), on any number of devices:

1. each device takes its slice of the batch and, microbatch by microbatch (``lax.scan``), computes
   per-example losses and gradients with ``vmap(value_and_grad(loss))``. Each example contributes
   one vector ``vᵢ = (ĝᵢ, α·ℓ̃ᵢ)``: its gradient clipped to L2 norm ``C_g = C·√(1 − β²)`` (over
   all parameters jointly) and, as one extra coordinate, its loss clipped to the public bound
   ``L`` (``ℓ̃ᵢ = clip(ℓᵢ, 0, L)``) and scaled by ``α = β·C/L``, so that ``‖vᵢ‖ ≤ C``. Padding
   rows and rows whose loss or gradient norm is not finite contribute exactly zero;
2. the per-device sums are added across devices (``psum``);
3. outside the per-device computation, Gaussian noise ``N(0, σ²C²)`` is added once to every
   coordinate of the summed vector (the gradient and the loss coordinate alike), from 64-bit
   uniforms (:mod:`dptrain.trainer._noise`), σ·C rounded up in float32;
4. the noisy gradient sum is divided by the **expected** batch size ``q·N`` and handed to the
   optax optimizer, and the noisy loss coordinate divided by ``α·q·N`` is the **DP loss
   estimate** (both post-processing, no privacy cost).

Why the loss rides along as a coordinate: it is then covered by the same Gaussian mechanism and
the same accounting — the mechanism's sensitivity is ``C`` whatever the dimension — so the
released loss costs no ε beyond the job's. We give the loss a fixed share β of the clip norm
(rather than clipping ``(gᵢ, αℓᵢ)`` jointly by one factor) so that clipping a large gradient does
not shrink its loss: the estimate is unbiased for the mean clipped loss.

The model's parameters are a pytree of arrays (``eqx.partition``); the static part is closed over.
With LoRA (``_lora.split``) the trained parameters are the adapters alone and the base weights
are the step's ``frozen`` input: gradients, norms, clipping, noise and the optimizer cover the
adapters only, and the guarantees below hold for them unchanged (the accounting does not depend
on the number of trained coordinates). ``ModelLoss.precision`` ``bf16`` computes the forward and
backward in bfloat16; everything from the per-example norms on is float32.

Formal guarantees:
    1. Bounded contribution: every real example's vector ``vᵢ = (ĝᵢ, α·ℓ̃ᵢ)`` has L2 norm ≤
       ``clip_norm`` (``‖ĝᵢ‖ ≤ C_g``, ``0 ≤ αℓ̃ᵢ ≤ βC``, ``C_g² + β²C² = C²``), so adding or
       removing one sequence changes the summed vector — gradient and loss coordinate jointly —
       by at most ``clip_norm`` in L2.
    2. Padding rows (mask ``False``) and rows with a non-finite loss or gradient norm contribute
       exactly zero to the sum (their gradients are replaced by zeros before weighting, so
       ``0·NaN`` never enters it).
    3. Noise: the summed vector receives i.i.d. ``N(0, std²)`` noise on every coordinate, with
       ``std ≥ noise_multiplier·clip_norm`` (float32 rounding only upwards), drawn once per step
       from the step's key — not per device, not per microbatch — without a cut-off tail.
    4. Normalisation by the expected batch size, a public constant, never by the realised size.
    5. The update depends on the number of devices and the microbatch size only through
       floating-point reassociation of the sum.
    6. The DP loss estimate is post-processing of the same noisy vector as the update: releasing
       it together with the parameters is covered by the job's (ε, δ).

The step also returns raw diagnostics of the *sampled* rows (``raw_loss``, ``real_rows``,
``mean_grad_norm``, ``clipped_fraction``). They are **not** privatised: the training loop
publishes them only when the job opts in (``spec.monitoring.releaseRawStatistics``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dptrain.privacy import round_up_to_float32
from dptrain.trainer._ghost import cast_floating, ghost_norms, weighted_grad_sum
from dptrain.trainer._mesh import DATA_AXIS
from dptrain.trainer._model import Decoder, sequence_loss
from dptrain.trainer._noise import secure_normal

CLIPPING_MODES = ("ghost", "per-example")
Params = Any  # a pytree of arrays
LossFn = Callable[[Params, jax.Array], jax.Array]


class StepMetrics(NamedTuple):
    """Diagnostics of one step.

    ``dp_loss`` is released under the job's ε; every other field is computed from the sampled
    rows without noise (an unaccounted release if published).
    """

    loss: jax.Array  # raw: mean loss over real rows (not privatised)
    real_rows: jax.Array  # raw: rows that were not padding
    mean_grad_norm: jax.Array  # raw: mean per-example gradient norm before clipping
    clipped_fraction: jax.Array  # raw: fraction of real rows whose gradient was clipped
    dp_loss: jax.Array  # DP estimate of the mean clipped loss (noisy sum / (α·expected batch))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpSgdConfig:
    """Public configuration of the DP-SGD gradient.

    Attributes:
        clip_norm: per-example L2 clipping norm C.
        expected_batch_size: q·N, the divisor of the noisy sum.
        microbatch_size: rows per accumulation microbatch on each device (``None``: the whole
            device slice at once). Changes memory use, not results.
        pad_id: token id of padding (targets equal to it carry no loss).
        loss_bound: public bound L of the per-example loss (nats per token) carried in the
            loss coordinate; larger losses are clipped to it.
        loss_share: β, the share of ``clip_norm`` given to the loss coordinate (the gradient is
            clipped to ``clip_norm·√(1 − β²)``).
        clipping: ``ghost`` (default: per-example norms and the clipped sum from activations and
            output gradients; a layer's per-example gradient is held only where it is no larger
            than the activations and output gradients it replaces; used where the loss is a
            :class:`ModelLoss`, i.e. the decoder) or ``per-example`` (``vmap(grad)``, the
            reference). Same results up to floating-point reassociation.
    """

    clip_norm: float
    expected_batch_size: float
    microbatch_size: int | None = None
    pad_id: int = 0
    loss_bound: float = 16.0
    loss_share: float = 0.25
    clipping: str = "ghost"

    def __post_init__(self) -> None:
        if self.clipping not in CLIPPING_MODES:
            raise ValueError("spec.training.clipping must be one of "
                             f"{', '.join(CLIPPING_MODES)} (got {self.clipping!r})")
        if not self.clip_norm > 0:
            raise ValueError(f"spec.training.clipNorm must be > 0 (got {self.clip_norm})")
        if not self.expected_batch_size > 0:
            raise ValueError("spec.training.batchSize must be > 0 "
                             f"(got {self.expected_batch_size})")
        if self.microbatch_size is not None and self.microbatch_size < 1:
            raise ValueError("spec.training.microbatchSize must be ≥ 1 "
                             f"(got {self.microbatch_size})")
        if not (math.isfinite(self.loss_bound) and self.loss_bound > 0):
            raise ValueError(f"loss_bound must be finite and > 0 (got {self.loss_bound})")
        if not 0 < self.loss_share < 1:
            raise ValueError(f"loss_share must be in (0, 1) (got {self.loss_share})")

    @property
    def gradient_clip_norm(self) -> float:
        """C_g = C·√(1 − β²): the gradient's part of the per-example norm bound."""
        return self.clip_norm * math.sqrt(1.0 - self.loss_share**2)

    @property
    def loss_scale(self) -> float:
        """α = β·C/L: a clipped loss of L becomes a coordinate of β·C."""
        return self.loss_share * self.clip_norm / self.loss_bound


PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelLoss:
    """``loss(params, tokens)`` of one sequence for a decoder split by ``eqx.partition``.

    A plain callable to the per-example path; the ghost path reads ``static``, ``pad_id`` and
    ``precision``, and the non-private step calls :meth:`batched` (the model's batched path).
    ``static`` may hold frozen arrays (:meth:`with_frozen`): the base weights of a LoRA model,
    which are inputs of the step but never differentiated. ``precision`` ``bf16``
    runs the forward and backward in bfloat16 on a bfloat16 copy of the float32 weights; the
    gradient reaching ``params`` is float32 (the cast's transpose), so norms, clipping, noise and
    the update stay float32.
    """

    static: Decoder
    pad_id: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"spec.training.precision must be one of {sorted(PRECISIONS)} "
                             f"(got {self.precision!r})")

    @property
    def compute_dtype(self) -> Any:
        """The dtype of activations and matmuls."""
        return PRECISIONS[self.precision]

    def with_frozen(self, frozen: Params | None) -> ModelLoss:
        """This loss with ``frozen`` arrays (traced inputs) filled into ``static``."""
        if frozen is None:
            return self
        return dataclasses.replace(self, static=eqx.combine(frozen, self.static))

    def __call__(self, params: Params, tokens: jax.Array) -> jax.Array:
        """Mean next-token loss of ``tokens`` (``[L]``)."""
        model = cast_floating(eqx.combine(params, self.static), self.compute_dtype)
        return sequence_loss(model, tokens, self.pad_id)

    def batched(self, params: Params, tokens: jax.Array) -> jax.Array:
        """Each row's loss of ``tokens`` (``[B, L]``): ``vmap(self)`` on the batched path."""
        model = cast_floating(eqx.combine(params, self.static), self.compute_dtype)
        return sequence_loss(model, tokens, self.pad_id)


def model_loss_fn(static: Decoder, pad_id: int = 0, precision: str = "fp32") -> LossFn:
    """``loss(params, tokens)`` of one sequence for a model split by ``eqx.partition``."""
    return ModelLoss(static, pad_id, precision)


def per_example_sq_norms(tree: Params) -> jax.Array:
    """Per-example squared L2 norms of the gradient part (leaves have a leading batch axis)."""
    squares = [jnp.sum(jnp.square(leaf.reshape(leaf.shape[0], -1)), axis=1)
               for leaf in jax.tree_util.tree_leaves(tree)]
    return sum(squares[1:], squares[0])


def global_norms(tree: Params) -> jax.Array:
    """Per-example L2 norms of a pytree whose leaves have a leading batch axis."""
    return jnp.sqrt(per_example_sq_norms(tree))


def clip_factor(norms: jax.Array, clip_norm: float, keep: jax.Array) -> jax.Array:
    """Per-example weight ``C/max(‖g‖, C)``, and exactly 0 for rows not kept.

    ``keep`` is False for padding rows and for rows whose norm (or loss) is not finite: such a
    row's weight is 0, and its gradient must also be zeroed (:func:`zero_rows`) since 0·NaN is NaN.
    """
    safe = jnp.where(keep, norms, clip_norm)
    return jnp.where(keep, clip_norm / jnp.maximum(safe, clip_norm), 0.0).astype(norms.dtype)


def zero_rows(per_example: Params, keep: jax.Array) -> Params:
    """``per_example`` with the rows not kept replaced by exact zeros."""
    def zero(g: jax.Array) -> jax.Array:
        return jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g, jnp.zeros((), g.dtype))
    return jax.tree_util.tree_map(zero, per_example)


def weighted_sum(per_example: Params, weights: jax.Array, keep: jax.Array,
                 all_finite: jax.Array) -> Params:
    """``Σᵢ wᵢ·gᵢ`` with the rows not kept contributing exact zeros.

    When every row is finite (the usual case) the rows need no zeroing (their weight is 0), and
    the copy is skipped; otherwise they are zeroed first, since 0·NaN is NaN.
    """
    def plain(tree: Params) -> Params:
        return jax.tree_util.tree_map(lambda g: jnp.tensordot(weights, g, axes=1), tree)
    return jax.lax.cond(all_finite, plain, lambda tree: plain(zero_rows(tree, keep)),
                        per_example)


def loss_coordinate(losses: jax.Array, keep: jax.Array, *, loss_bound: float,
                    loss_scale: float) -> jax.Array:
    """Each example's extra coordinate ``α·clip(ℓ, 0, L)`` (0 for rows not kept)."""
    clipped = jnp.clip(jnp.where(keep, losses, 0.0), 0.0, loss_bound)
    return jnp.where(keep, loss_scale * clipped, 0.0).astype(jnp.float32)


def clip_and_sum(per_example: Params, mask: jax.Array, clip_norm: float) -> tuple[Params,
                                                                                    jax.Array]:
    """Clip each example's gradient to ``clip_norm``, zero masked and non-finite rows, sum.

    Returns:
        The clipped sum and the per-example norms before clipping.
    """
    norms = global_norms(per_example)
    keep = mask & jnp.isfinite(norms)
    weights = clip_factor(norms, clip_norm, keep)
    return weighted_sum(per_example, weights, keep, jnp.all(jnp.isfinite(norms))), norms


def _microbatches(tokens: jax.Array, mask: jax.Array,
                  size: int | None) -> tuple[jax.Array, jax.Array]:
    rows = tokens.shape[0]
    size = rows if size is None else min(size, rows)
    if rows % size:
        raise ValueError(f"the per-device batch ({rows} rows) must be a multiple of "
                         f"spec.training.microbatchSize ({size})")
    count = rows // size
    return tokens.reshape(count, size, -1), mask.reshape(count, size)


def local_clipped_sum(loss_fn: LossFn, params: Params, tokens: jax.Array, mask: jax.Array, *,
                      config: DpSgdConfig) -> tuple[Any, ...]:
    """Sum of the per-example vectors ``(ĝᵢ, α·ℓ̃ᵢ)`` over one device's rows, by microbatch.

    Returns:
        ``(grad_sum, loss_coordinate_sum, raw_loss_sum, norm_sum, clipped_count)``; the last
        three are raw statistics over the real, finite rows.
    """
    value_and_grad = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))
    token_mb, mask_mb = _microbatches(tokens, mask, config.microbatch_size)
    grad_clip = config.gradient_clip_norm
    # Ghost clipping where the loss is the decoder's: the same norms and weighted sum from
    # activations and output gradients (per-example gradients only where no larger than those).
    ghost = config.clipping == "ghost" and isinstance(loss_fn, ModelLoss)

    def accumulate(carry: tuple[Any, ...],
                   batch: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
        grad_sum, coordinate_sum, loss_sum, norm_sum, clipped = carry
        mb_tokens, mb_mask = batch
        if ghost:
            assert isinstance(loss_fn, ModelLoss)
            sq_norms, losses, tape = ghost_norms(loss_fn.static, params, mb_tokens,
                                                 loss_fn.pad_id,
                                                 compute_dtype=loss_fn.compute_dtype)
        else:
            losses, grads = value_and_grad(params, mb_tokens)
            sq_norms = per_example_sq_norms(grads)
        norms = jnp.sqrt(sq_norms)
        # A NaN/inf row would have unbounded sensitivity: it contributes exactly nothing.
        keep = mb_mask & jnp.isfinite(sq_norms) & jnp.isfinite(losses)
        weights = clip_factor(norms, grad_clip, keep)
        if ghost:  # rows of weight 0 are selected away inside (NaN-safe)
            assert isinstance(loss_fn, ModelLoss)
            summed = weighted_grad_sum(params, tape, weights, loss_fn.static)
        else:
            summed = weighted_sum(grads, weights, keep, jnp.all(jnp.isfinite(sq_norms)))
        coordinate = loss_coordinate(losses, keep, loss_bound=config.loss_bound,
                                     loss_scale=config.loss_scale)
        real = keep.astype(jnp.float32)
        grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, summed)
        return (grad_sum, coordinate_sum + jnp.sum(coordinate),
                loss_sum + jnp.sum(jnp.where(keep, losses, 0.0)),
                norm_sum + jnp.sum(jnp.where(keep, norms, 0.0)),
                clipped + jnp.sum((norms > grad_clip) * real)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    scalar = jnp.zeros((), jnp.float32)
    init = (zeros, scalar, scalar, scalar, scalar)
    if token_mb.shape[0] == 1:  # one microbatch: no loop (compiles faster)
        return tuple(accumulate(init, (token_mb[0], mask_mb[0]))[0])
    out, _ = jax.lax.scan(accumulate, init, (token_mb, mask_mb))
    return tuple(out)


def add_noise(grad_sum: Params, key: jax.Array, std: jax.Array | float) -> Params:
    """``grad_sum`` plus i.i.d. ``N(0, std²)`` on every coordinate.

    One draw of the total size (:func:`~dptrain.trainer._noise.secure_normal`) is cut into the
    leaves, flattened in order: every coordinate its own.
    """
    leaves, treedef = jax.tree_util.tree_flatten(grad_sum)
    sizes = [leaf.size for leaf in leaves]
    draw = secure_normal(key, sum(sizes))
    noisy, offset = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        chunk = jax.lax.slice_in_dim(draw, offset, offset + size).reshape(leaf.shape)
        noisy.append(leaf + (std * chunk).astype(leaf.dtype))
        offset += size
    return jax.tree_util.tree_unflatten(treedef, noisy)


def noise_key(root: jax.Array, step: jax.Array | int) -> jax.Array:
    """The noise key of a step from the execution's secret key (``_keys.noise_key_data``)."""
    return jax.random.fold_in(jax.random.fold_in(root, 1), step)


def noise_std(noise_multiplier: jax.Array, clip_norm: float) -> jax.Array:
    """σ·C in float32, never below the product of its (rounded-up) float32 factors.

    The float32 product rounds to nearest; one step up makes it an upper bound.
    """
    product = noise_multiplier.astype(jnp.float32) * jnp.float32(round_up_to_float32(clip_norm))
    return jnp.where(product > 0, jnp.nextafter(product, jnp.float32(jnp.inf)), product)


StepFn = Callable[..., tuple[Params, Any, StepMetrics]]


def make_dp_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, config: DpSgdConfig,
                 mesh: Mesh) -> StepFn:
    """A jitted DP-SGD step.

    The returned function is ``step(params, opt_state, tokens, mask, key, step,
    noise_multiplier, frozen=None) -> (params, opt_state, metrics)``, where ``frozen`` holds the
    arrays that are inputs of the model but not trained (a LoRA model's base weights; they are
    neither differentiated nor updated nor donated), and ``key`` is this execution's secret
    noise key as raw ``uint32`` key data (``_keys.noise_key_data``): ``tokens`` ``[B, L]`` and
    ``mask`` ``[B]`` are sharded over the mesh's data axis; ``noise_multiplier`` is an argument
    (not a constant; pass it through ``round_up_to_float32``), so one compiled step serves any
    σ, including a non-private twin with σ = 0.
    """
    clip_norm = float(config.clip_norm)
    expected = float(config.expected_batch_size)
    loss_divisor = config.loss_scale * expected

    def device_sum(params: Params, frozen: Params, tokens: jax.Array, mask: jax.Array) -> Any:
        bound = loss_fn.with_frozen(frozen) if isinstance(loss_fn, ModelLoss) else loss_fn
        out = local_clipped_sum(bound, params, tokens, mask, config=config)
        real = jnp.sum(mask.astype(jnp.float32))
        return jax.lax.psum((*out, real), DATA_AXIS)

    sharded_sum = jax.shard_map(device_sum, mesh=mesh,
                                in_specs=(P(), P(), P(DATA_AXIS), P(DATA_AXIS)),
                                out_specs=P(), check_vma=False)

    def step(params: Params, opt_state: Any, tokens: jax.Array, mask: jax.Array,
             root_key: jax.Array, step_index: jax.Array, noise_multiplier: jax.Array,
             frozen: Params = None) -> tuple[Params, Any, StepMetrics]:
        grad_sum, coordinate_sum, loss_sum, norm_sum, clipped, real = sharded_sum(
            params, frozen, tokens, mask)
        # The one noise draw of this step: replicated, outside the per-device function, over
        # the gradient and the loss coordinate together (one Gaussian mechanism).
        key = noise_key(jax.random.wrap_key_data(root_key), step_index)
        noisy = add_noise({"grad": grad_sum, "loss": coordinate_sum}, key,
                          noise_std(noise_multiplier, clip_norm))
        grads = jax.tree_util.tree_map(lambda g: g / expected, noisy["grad"])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        denominator = jnp.maximum(real, 1.0)
        metrics = StepMetrics(loss=loss_sum / denominator, real_rows=real,
                              mean_grad_norm=norm_sum / denominator,
                              clipped_fraction=clipped / denominator,
                              dp_loss=noisy["loss"] / loss_divisor)
        return params, opt_state, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=replicated)


def make_plain_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh,
                    microbatch_size: int | None = None) -> StepFn:
    """The non-private step on the same data: gradient of the mean loss over the real rows.

    Same signature as :func:`make_dp_step` (the key, step and σ arguments are ignored); used by
    the benchmark and the reduction tests.
    """
    def device_sum(params: Params, frozen: Params, tokens: jax.Array, mask: jax.Array) -> Any:
        bound = loss_fn.with_frozen(frozen) if isinstance(loss_fn, ModelLoss) else loss_fn
        token_mb, mask_mb = _microbatches(tokens, mask, microbatch_size)

        def summed_loss(p: Params, mb_tokens: jax.Array, mb_mask: jax.Array) -> jax.Array:
            if isinstance(bound, ModelLoss):  # the decoder's batched path (same losses)
                losses = bound.batched(p, mb_tokens)
            else:
                losses = jax.vmap(bound, in_axes=(None, 0))(p, mb_tokens)
            return jnp.sum(losses * mb_mask.astype(losses.dtype))

        def accumulate(carry: Any, batch: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
            grad_sum, loss_sum = carry
            value, grads = jax.value_and_grad(summed_loss)(params, *batch)
            return (jax.tree_util.tree_map(jnp.add, grad_sum, grads), loss_sum + value), None

        init = (jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
        if token_mb.shape[0] == 1:
            grad_sum, loss_sum = accumulate(init, (token_mb[0], mask_mb[0]))[0]
        else:
            (grad_sum, loss_sum), _ = jax.lax.scan(accumulate, init, (token_mb, mask_mb))
        real = jnp.sum(mask.astype(jnp.float32))
        return jax.lax.psum((grad_sum, loss_sum, real), DATA_AXIS)

    sharded_sum = jax.shard_map(device_sum, mesh=mesh,
                                in_specs=(P(), P(), P(DATA_AXIS), P(DATA_AXIS)),
                                out_specs=P(), check_vma=False)

    def step(params: Params, opt_state: Any, tokens: jax.Array, mask: jax.Array,
             root_key: jax.Array, step_index: jax.Array, noise_multiplier: jax.Array,
             frozen: Params = None) -> tuple[Params, Any, StepMetrics]:
        del root_key, step_index, noise_multiplier
        grad_sum, loss_sum, real = sharded_sum(params, frozen, tokens, mask)
        denominator = jnp.maximum(real, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denominator, grad_sum)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        nan = jnp.full((), jnp.nan, jnp.float32)
        # Non-private: its "DP" loss is the raw loss (the step is a twin or a benchmark).
        return params, opt_state, StepMetrics(loss=loss_sum / denominator, real_rows=real,
                                              mean_grad_norm=nan, clipped_fraction=nan,
                                              dp_loss=loss_sum / denominator)

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=replicated)
