"""The decoder's linear maps as 2-D matmuls with a hand-written backward pass.

``dense(x, w)`` is ``x @ w`` for ``x`` ``[..., i]`` and ``w`` ``[i, ...]`` (trailing weight axes
are output features, e.g. heads × head_dim): mathematically nothing else. What it changes is the
program XLA:CPU receives. The leading axes of ``x`` (positions, batch rows) are merged into one,
so every product is a plain ``[N, i] @ [i, o]`` matmul, and the weight gradient is written as
``x₂ᵀ δ₂`` directly. JAX's own transpose rule for ``dot_general`` emits the weight gradient as a
``dot`` that contracts the *leading* axis of both operands, after a layout transpose of the
output gradient; XLA:CPU (0.10) runs that form outside its fast matmul library, and measured on
the decoder's GeGLU (batch 32 × 128 positions, 128 → 512) the gradient of the MLP took 2.5× as
long as with this backward pass (849 against 333 ms; the forward alone: 129 ms) with identical
results.

Under ``vmap`` (the per-example reference, ``vmap(grad)``) the same rules batch as usual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over ``x``'s last and ``w``'s first axis: ``[..., i] × [i, *out]``."""
    fan_in, out_shape = w.shape[0], w.shape[1:]
    flat = x.reshape(-1, fan_in) @ w.reshape(fan_in, -1)
    return flat.reshape(*x.shape[:-1], *out_shape)


def _dense_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return dense(x, w), (x, w)


def _dense_bwd(residuals: tuple[jax.Array, jax.Array],
               grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    fan_in = w.shape[0]
    x2 = x.reshape(-1, fan_in)
    w2 = w.reshape(fan_in, -1)
    g2 = grad.reshape(x2.shape[0], w2.shape[1])
    dx = (g2 @ w2.T).reshape(x.shape)
    dw = jnp.matmul(x2.T, g2).reshape(w.shape)
    return dx, dw


dense.defvjp(_dense_fwd, _dense_bwd)
