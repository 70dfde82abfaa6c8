"""JAX Privacy 2.0 DP step (``clipped_grad`` + ``gaussian_privatizer`` + Adam) and the plain step.

Runs in its own virtual environment (jax + jax-privacy only; see ``bench/peers/run.py``). The model
is dptrain's Gemma-style decoder (pre-norm RMSNorm, multi-query attention with RoPE, GeGLU, tied
embedding scaled by √d) written for one sequence in plain JAX, as a JAX Privacy user would, and
clipped per sequence (``keep_batch_dim=False``). Prints one JSON object.

    python bench/peers/jax_privacy_step.py --batch 64 --seq-len 129 --steps 30 --warmup 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import jax_privacy
import numpy as np
import optax
from issue_config import add_model_arguments
from jax_privacy.noise_addition import gaussian_privatizer


def init(rng: np.random.Generator, vocab: int, d: int, layers: int, heads: int, kv: int,
         head_dim: int, d_ff: int) -> dict:
    def normal(shape: tuple[int, ...], fan_in: int, scale: float = 1.0) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale
                           / math.sqrt(fan_in))

    def stack(shape: tuple[int, ...], fan_in: int) -> jax.Array:
        return jnp.stack([normal(shape, fan_in) for _ in range(layers)])

    return {"embed": normal((vocab, d), 1, 0.02), "final_norm": jnp.zeros(d),
            "attn_norm": jnp.zeros((layers, d)), "mlp_norm": jnp.zeros((layers, d)),
            "wq": stack((d, heads, head_dim), d), "wk": stack((d, kv, head_dim), d),
            "wv": stack((d, kv, head_dim), d), "wo": stack((heads, head_dim, d), heads * head_dim),
            "gate": stack((d, d_ff), d), "up": stack((d, d_ff), d), "down": stack((d_ff, d), d_ff)}


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * (1 + scale)


def rope(x: jax.Array) -> jax.Array:
    length, half = x.shape[0], x.shape[-1] // 2
    inv = 10_000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv[None, :]
    sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def loss(params: dict, row: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of one row ``[L+1]``."""
    tokens, targets = row[:-1], row[1:]
    d = params["embed"].shape[1]
    x = params["embed"][tokens] * math.sqrt(d)
    length = tokens.shape[0]
    causal = jnp.tril(jnp.ones((length, length), bool))
    for i in range(params["wq"].shape[0]):
        h = rms_norm(x, params["attn_norm"][i])
        q = rope(jnp.einsum("ld,dhk->lhk", h, params["wq"][i]))
        k = rope(jnp.einsum("ld,dgk->lgk", h, params["wk"][i]))
        v = jnp.einsum("ld,dgk->lgk", h, params["wv"][i])
        heads, kv, hd = q.shape[1], k.shape[1], q.shape[2]
        q = q.reshape(length, kv, heads // kv, hd) / math.sqrt(hd)
        scores = jnp.where(causal, jnp.einsum("lgrk,mgk->grlm", q, k), -1e30)
        out = jnp.einsum("grlm,mgk->lgrk", jax.nn.softmax(scores, -1), v)
        x = x + jnp.einsum("lhk,hkd->ld", out.reshape(length, heads, hd), params["wo"][i])
        h = rms_norm(x, params["mlp_norm"][i])
        x = x + (jax.nn.gelu(h @ params["gate"][i]) * (h @ params["up"][i])) @ params["down"][i]
    logits = rms_norm(x, params["final_norm"]) @ params["embed"].T
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], -1))


def _time(step, state, batch: jax.Array, steps: int, warmup: int) -> tuple[float, float]:
    started = time.perf_counter()
    compiled = jax.jit(step).lower(state, batch).compile()
    compile_s = time.perf_counter() - started
    for _ in range(warmup):
        state = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state = jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - started)
    return statistics.median(times), compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    params = init(rng, args.vocab, args.d_model, args.layers, args.heads, args.kv_heads,
                  args.d_model // args.heads, args.d_ff)
    batch = jnp.asarray(rng.integers(3, args.vocab, (args.batch, args.seq_len)), jnp.int32)
    adam = optax.adam(1e-3)
    privatizer = gaussian_privatizer(stddev=1.0, prng_key=jax.random.key(0))  # σ·C = 1
    clipped = jax_privacy.clipped_grad(loss, l2_clip_norm=1.0, batch_argnums=1,
                                       keep_batch_dim=False, normalize_by=args.batch)

    def dp_step(state: tuple, rows: jax.Array) -> tuple:
        p, opt, noise = state
        grads = clipped(p, rows)
        noisy, noise = privatizer.update(grads, noise)
        updates, opt = adam.update(noisy, opt, p)
        return optax.apply_updates(p, updates), opt, noise

    def plain_step(state: tuple, rows: jax.Array) -> tuple:
        p, opt, noise = state
        grads = jax.grad(lambda q: jnp.mean(jax.vmap(loss, (None, 0))(q, rows)))(p)
        updates, opt = adam.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, noise

    result: dict = {"stack": "jax_privacy", "versions": {"jax": jax.__version__,
                                                         "jax_privacy": jax_privacy.__version__},
                    "batch": args.batch}
    for name, step in (("non_private", plain_step), ("dp", dp_step)):
        state = (jax.tree_util.tree_map(jnp.copy, params), adam.init(params),
                 privatizer.init(params))
        median, compile_s = _time(step, state, batch, args.steps, args.warmup)
        result[name] = args.batch / median
        result[f"{name}_compile_s"] = compile_s
    print(json.dumps(result))


if __name__ == "__main__":
    main()
