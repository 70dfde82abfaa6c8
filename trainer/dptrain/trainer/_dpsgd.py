"""The DP-SGD step: per-example gradients, clipping, one noise draw, expected-batch normalisation.

One step, for a physical batch of ``B`` rows (padding rows masked), on any number of devices:

1. each device takes its slice of the batch and, microbatch by microbatch (``lax.scan``), computes
   per-example gradients with ``vmap(grad(loss))``, clips each to L2 norm ``C`` (over all parameters
   jointly), zeroes padding rows and adds them to a running sum;
2. the per-device sums are added across devices (``psum``);
3. outside the per-device computation, Gaussian noise ``N(0, σ²C²)`` is added to the sum once;
4. the noisy sum is divided by the **expected** batch size ``q·N`` and handed to the optax
   optimizer (post-processing, no privacy cost).

The model's parameters are a pytree of arrays (``eqx.partition``); the static part is closed over.

Formal guarantees:
    1. Bounded contribution: every real example's clipped gradient has L2 norm ≤ ``clip_norm``,
       so adding or removing one sequence changes the summed gradient by at most ``clip_norm``.
    2. Padding rows (mask ``False``) contribute exactly zero to the sum.
    3. Noise: the sum receives i.i.d. ``N(0, (noise_multiplier·clip_norm)²)`` noise on every
       coordinate, drawn once per step from the step's key — not per device, not per microbatch.
    4. Normalisation by the expected batch size, a public constant, never by the realised size.
    5. The update depends on the number of devices and the microbatch size only through
       floating-point reassociation of the sum.

The step also returns diagnostics (loss, gradient norms) of the *sampled* rows. They are not
privatised: the guarantee covers the parameters and everything computed from them alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dptrain.trainer._ghost import ghost_clipped_sum
from dptrain.trainer._model import Decoder, sequence_loss

DATA_AXIS = "data"
CLIPPING_MODES = ("ghost", "per-example")
Params = Any  # a pytree of arrays
LossFn = Callable[[Params, jax.Array], jax.Array]


class StepMetrics(NamedTuple):
    """Diagnostics of one step (computed from the sampled rows; not privatised)."""

    loss: jax.Array  # mean loss over real rows
    real_rows: jax.Array  # rows that were not padding
    mean_grad_norm: jax.Array  # mean per-example gradient norm before clipping (DP step only)
    clipped_fraction: jax.Array  # fraction of real rows whose gradient was clipped


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpSgdConfig:
    """Public configuration of the DP-SGD gradient.

    Attributes:
        clip_norm: per-example L2 clipping norm C.
        expected_batch_size: q·N, the divisor of the noisy sum.
        microbatch_size: rows per accumulation microbatch on each device (``None``: the whole
            device slice at once). Changes memory use, not results.
        pad_id: token id of padding (targets equal to it carry no loss).
        clipping: ``ghost`` (default: per-example norms and the clipped sum from activations and
            output gradients, no per-example gradients in memory; used where the loss is a
            :class:`ModelLoss`, i.e. the decoder) or ``per-example`` (``vmap(grad)``, the
            reference). Same results up to floating-point reassociation.
    """

    clip_norm: float
    expected_batch_size: float
    microbatch_size: int | None = None
    pad_id: int = 0
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


@dataclasses.dataclass(frozen=True)
class ModelLoss:
    """``loss(params, tokens)`` of one sequence for a decoder split by ``eqx.partition``.

    A plain callable to the per-example path; the ghost path reads ``static`` and ``pad_id``.
    """

    static: Decoder
    pad_id: int = 0

    def __call__(self, params: Params, tokens: jax.Array) -> jax.Array:
        """Mean next-token loss of ``tokens`` (``[L]``)."""
        return sequence_loss(eqx.combine(params, self.static), tokens, self.pad_id)


def model_loss_fn(static: Decoder, pad_id: int = 0) -> LossFn:
    """``loss(params, tokens)`` of one sequence for a model split by ``eqx.partition``."""
    return ModelLoss(static, pad_id)


def global_norms(tree: Params) -> jax.Array:
    """Per-example L2 norms of a pytree whose leaves have a leading batch axis."""
    squares = [jnp.sum(jnp.square(leaf.reshape(leaf.shape[0], -1)), axis=1)
               for leaf in jax.tree_util.tree_leaves(tree)]
    return jnp.sqrt(sum(squares[1:], squares[0]))


def clip_and_sum(per_example: Params, mask: jax.Array, clip_norm: float) -> tuple[Params,
                                                                                    jax.Array]:
    """Clip each example's gradient to ``clip_norm``, zero masked rows, sum over the batch.

    Returns:
        The clipped sum and the per-example norms before clipping.
    """
    norms = global_norms(per_example)
    # C / max(‖g‖, C) is 1 for small gradients and scales large ones to norm exactly C.
    weights = clip_norm / jnp.maximum(norms, clip_norm) * mask.astype(norms.dtype)
    summed = jax.tree_util.tree_map(lambda g: jnp.tensordot(weights, g, axes=1), per_example)
    return summed, norms


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
                      clip_norm: float, microbatch_size: int | None) -> tuple[Params, jax.Array,
                                                                              jax.Array, jax.Array]:
    """Clipped per-example gradient sum over one device's rows, accumulated by microbatch.

    Returns:
        ``(grad_sum, loss_sum, norm_sum, clipped_count)`` over the real rows.
    """
    value_and_grad = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))
    token_mb, mask_mb = _microbatches(tokens, mask, microbatch_size)

    def accumulate(carry: tuple[Params, jax.Array, jax.Array, jax.Array],
                   batch: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
        grad_sum, loss_sum, norm_sum, clipped = carry
        mb_tokens, mb_mask = batch
        losses, grads = value_and_grad(params, mb_tokens)
        summed, norms = clip_and_sum(grads, mb_mask, clip_norm)
        real = mb_mask.astype(losses.dtype)
        grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, summed)
        return (grad_sum, loss_sum + jnp.sum(losses * real), norm_sum + jnp.sum(norms * real),
                clipped + jnp.sum((norms > clip_norm) * real)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    scalar = jnp.zeros((), jnp.float32)
    init = (zeros, scalar, scalar, scalar)
    if token_mb.shape[0] == 1:  # one microbatch: no loop (compiles faster)
        return accumulate(init, (token_mb[0], mask_mb[0]))[0]
    (grad_sum, loss_sum, norm_sum, clipped), _ = jax.lax.scan(accumulate, init,
                                                              (token_mb, mask_mb))
    return grad_sum, loss_sum, norm_sum, clipped


def add_noise(grad_sum: Params, key: jax.Array, std: jax.Array | float) -> Params:
    """``grad_sum`` plus i.i.d. ``N(0, std²)`` on every coordinate.

    One draw of the total size is cut into the leaves: a single PRNG computation compiles much
    faster than one per leaf, and the coordinates are i.i.d. either way.
    """
    leaves, treedef = jax.tree_util.tree_flatten(grad_sum)
    sizes = [leaf.size for leaf in leaves]
    draw = jax.random.normal(key, (sum(sizes),), jnp.float32)
    noisy, offset = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        chunk = jax.lax.dynamic_slice_in_dim(draw, offset, size).reshape(leaf.shape)
        noisy.append(leaf + (std * chunk).astype(leaf.dtype))
        offset += size
    return jax.tree_util.tree_unflatten(treedef, noisy)


def noise_key(root: jax.Array, step: jax.Array | int) -> jax.Array:
    """The noise key of step ``step`` (0-based): a pure function of the job's key and the step."""
    return jax.random.fold_in(jax.random.fold_in(root, 1), step)


def make_mesh(devices: Any = None) -> Mesh:
    """A one-axis data-parallel mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


StepFn = Callable[..., tuple[Params, Any, StepMetrics]]


def make_dp_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, config: DpSgdConfig,
                 mesh: Mesh) -> StepFn:
    """A jitted DP-SGD step.

    The returned function is ``step(params, opt_state, tokens, mask, root_key, step,
    noise_multiplier) -> (params, opt_state, metrics)``, where ``root_key`` is the job's key as raw
    ``uint32`` key data (``jax.random.key_data``): ``tokens`` ``[B, L]`` and ``mask`` ``[B]``
    are sharded over the mesh's data axis; ``noise_multiplier`` is an argument (not a constant),
    so one compiled step serves any σ, including a non-private twin with σ = 0.
    """
    clip_norm = float(config.clip_norm)
    expected = float(config.expected_batch_size)

    def device_sum(params: Params, tokens: jax.Array, mask: jax.Array) -> Any:
        # Ghost clipping where the loss is the decoder's (same sums, no per-example gradients).
        if config.clipping == "ghost" and isinstance(loss_fn, ModelLoss):
            out = ghost_clipped_sum(loss_fn.static, params, tokens, mask, clip_norm=clip_norm,
                                    microbatch_size=config.microbatch_size,
                                    pad_id=loss_fn.pad_id)
        else:
            out = local_clipped_sum(loss_fn, params, tokens, mask, clip_norm=clip_norm,
                                    microbatch_size=config.microbatch_size)
        real = jnp.sum(mask.astype(jnp.float32))
        return jax.lax.psum((*out, real), DATA_AXIS)

    sharded_sum = jax.shard_map(device_sum, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
                                out_specs=P(), check_vma=False)

    def step(params: Params, opt_state: Any, tokens: jax.Array, mask: jax.Array,
             root_key: jax.Array, step_index: jax.Array, noise_multiplier: jax.Array,
             ) -> tuple[Params, Any, StepMetrics]:
        grad_sum, loss_sum, norm_sum, clipped, real = sharded_sum(params, tokens, mask)
        # The one noise draw of this step: replicated, outside the per-device function.
        key = noise_key(jax.random.wrap_key_data(root_key), step_index)
        noisy = add_noise(grad_sum, key, noise_multiplier * clip_norm)
        grads = jax.tree_util.tree_map(lambda g: g / expected, noisy)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        denominator = jnp.maximum(real, 1.0)
        metrics = StepMetrics(loss=loss_sum / denominator, real_rows=real,
                              mean_grad_norm=norm_sum / denominator,
                              clipped_fraction=clipped / denominator)
        return params, opt_state, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=replicated)


def make_plain_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh,
                    microbatch_size: int | None = None) -> StepFn:
    """The non-private step on the same data: gradient of the mean loss over the real rows.

    Same signature as :func:`make_dp_step` (the key, step and σ arguments are ignored); used by
    the benchmark and the reduction tests.
    """
    def device_sum(params: Params, tokens: jax.Array, mask: jax.Array) -> Any:
        token_mb, mask_mb = _microbatches(tokens, mask, microbatch_size)

        def summed_loss(p: Params, mb_tokens: jax.Array, mb_mask: jax.Array) -> jax.Array:
            losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, mb_tokens)
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

    sharded_sum = jax.shard_map(device_sum, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
                                out_specs=P(), check_vma=False)

    def step(params: Params, opt_state: Any, tokens: jax.Array, mask: jax.Array,
             root_key: jax.Array, step_index: jax.Array, noise_multiplier: jax.Array,
             ) -> tuple[Params, Any, StepMetrics]:
        del root_key, step_index, noise_multiplier
        grad_sum, loss_sum, real = sharded_sum(params, tokens, mask)
        denominator = jnp.maximum(real, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denominator, grad_sum)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        nan = jnp.full((), jnp.nan, jnp.float32)
        return params, opt_state, StepMetrics(loss=loss_sum / denominator, real_rows=real,
                                              mean_grad_norm=nan, clipped_fraction=nan)

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=replicated)


def make_optimizer(name: str, *, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamW (default) or SGD with linear warm-up then cosine decay to 10% of the peak."""
    if learning_rate <= 0:
        raise ValueError(f"spec.training.learningRate must be > 0 (got {learning_rate})")
    warmup = max(0, min(warmup_steps, total_steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else learning_rate, peak_value=learning_rate,
        warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=0.1 * learning_rate)
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=weight_decay)
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule))
    raise ValueError(f"spec.training.optimizer: must be adamw or sgd (got {name!r})")


def shard_batch(mesh: Mesh, tokens: np.ndarray, mask: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Place this process's rows of the global batch on its devices.

    Every process holds the whole sampled batch (sampling is replicated) and contributes the rows
    of its own devices, so the global array is the same however many processes there are.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    rows = tokens.shape[0]
    if rows % mesh.devices.size:
        raise ValueError(f"physical batch ({rows}) must be a multiple of the device count "
                         f"({mesh.devices.size})")

    def place(array: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return place(tokens), place(mask)


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Put every array of ``tree`` on every device of ``mesh`` (works across processes)."""
    sharding = NamedSharding(mesh, P())

    def place(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array | np.ndarray):
            return leaf
        host = np.asarray(leaf) if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable \
            else np.asarray(leaf.addressable_data(0))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, tree)


def to_host(tree: Any) -> Any:
    """Copy a replicated pytree to numpy (reads this process's copy; valid on any process)."""
    def fetch(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return np.asarray(leaf.addressable_data(0))
        return leaf
    return jax.tree_util.tree_map(fetch, tree)
