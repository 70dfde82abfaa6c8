"""Per-component time of the decoder's batched path on XLA:CPU (forward and forward+backward).

Each component of :class:`~dptrain.trainer._model.Decoder` is jitted alone at the shapes the
model step gives it (default: the peers' benchmark, batch 64 × 128 positions, width 128, 4 query
heads sharing 1 key/value head, MLP 512, byte vocabulary 259, 2 layers) and timed forward and
forward+backward (``value_and_grad`` of the sum of its output times a fixed random cotangent,
with respect to every floating input). Prints one table (median milliseconds per call) and,
with ``--json``, one JSON object. The last rows are the whole model: its loss, and the
non-private step's ``value_and_grad`` of the summed row losses.

    python bench/model_profile.py --repeats 10
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "peers"))
from issue_config import add_model_arguments, model_shape

from dptrain.trainer._architecture import visibility
from dptrain.trainer._model import apply_rope, build_model, sequence_loss, token_loss


def _median_ms(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> tuple[float, float]:
    """Median wall and CPU (this process, all threads) milliseconds per call.

    On a shared machine the CPU time is the steadier figure: other processes' load inflates the
    wall time, not the work done.
    """
    jax.block_until_ready(fn(*args))  # compile and warm up
    walls, cpus = [], []
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
    return 1e3 * statistics.median(walls), 1e3 * statistics.median(cpus)


def _timed(
    fn: Callable[..., jax.Array], args: tuple[Any, ...], repeats: int, rng: np.random.Generator
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Forward and forward+backward (wall, CPU) ms of ``fn`` over float ``args`` (ints held)."""
    out = jax.eval_shape(fn, *args)
    cotangent = jnp.asarray(rng.standard_normal(out.shape).astype(np.float32))
    floats = [i for i, a in enumerate(args) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)]

    def scalar(*a: Any) -> jax.Array:
        return jnp.sum(fn(*a) * cotangent)

    forward = jax.jit(fn)
    both = jax.jit(jax.value_and_grad(scalar, argnums=tuple(floats)))
    return _median_ms(forward, args, repeats), _median_ms(both, args, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None, help="component names to time")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args()
    b, length, d = args.batch, args.seq_len - 1, args.d_model
    h, g, k, f = args.heads, args.kv_heads, args.d_model // args.heads, args.d_ff
    shape = model_shape(args, "profile")
    model = build_model(shape, key=jax.random.key(0))
    rng = np.random.default_rng(0)

    def normal(*s: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(s).astype(np.float32) / np.sqrt(s[-1]))

    block = jax.tree_util.tree_map(lambda a: a[0], model.blocks)
    attn, mlp = block.attn, block.mlp
    x = normal(b, length, d)
    q, kv = normal(b, length, h, k), normal(b, length, g, k)
    tokens = jnp.asarray(rng.integers(3, args.vocab, (b, args.seq_len)).astype(np.int32))
    logits = normal(b, length, args.vocab)
    visible = visibility(np.arange(length), np.arange(length), None)
    params, static = eqx.partition(model, eqx.is_array)

    def model_loss(p: Any, t: jax.Array) -> jax.Array:
        return jnp.sum(sequence_loss(eqx.combine(p, static), t))

    # Each component through the model's own methods, so that the table times whatever
    # formulation the checked-out code uses (run it on two checkouts to compare).
    components: dict[str, tuple[Callable[..., jax.Array], tuple[Any, ...]]] = {
        "embed": (
            lambda e, t: eqx.tree_at(lambda m: m.embedding, model, e).embed(t),
            (model.embedding, tokens[:, :-1]),
        ),
        "rmsnorm": (
            lambda x_, s: eqx.tree_at(lambda n: n.scale, block.attn_norm, s)(x_),
            (x, block.attn_norm.scale),
        ),
        "q/k/v+rope": (
            lambda x_: jnp.concatenate(
                [a.reshape(b, length, -1) for a in attn.project(x_)], axis=-1
            ),
            (x,),
        ),
        "rope_q": (lambda q_: apply_rope(q_), (q,)),
        "attend": (lambda q_, k_, v_: attn.attend(q_, k_, v_, visible), (q, kv, kv)),
        "attention": (lambda x_: attn.forward(x_)[0], (x,)),
        "mlp": (lambda x_: mlp.forward(x_)[0], (x,)),
        "block": (lambda x_: block.forward(x_)[0], (x,)),
        "head": (lambda hh: model.head(hh), (x,)),
        "loss": (lambda lg: token_loss(lg, tokens[:, 1:]), (logits,)),
        "model_loss": (lambda p: model_loss(p, tokens), (params,)),
    }
    rows = {}
    print(
        f"batch {b} x {length} positions, d {d}, heads {h}/{g}, ff {f}, vocab {args.vocab}, "
        f"{args.layers} layers; median of {args.repeats} calls; ms wall (ms CPU)"
    )
    print(f"{'component':<12} {'forward':>17} {'forward+backward':>19}")
    for name, (fn, fn_args) in components.items():
        if args.only and name not in args.only:
            continue
        if name == "model_loss":
            fwd = _median_ms(jax.jit(model_loss), (params, tokens), args.repeats)
            both = _median_ms(
                jax.jit(jax.value_and_grad(model_loss)), (params, tokens), args.repeats
            )
        else:
            fwd, both = _timed(fn, fn_args, args.repeats, rng)
        rows[name] = {
            "forward_ms": fwd[0],
            "forward_cpu_ms": fwd[1],
            "forward_backward_ms": both[0],
            "forward_backward_cpu_ms": both[1],
        }
        print(f"{name:<12} {fwd[0]:>8.1f} ({fwd[1]:>6.1f}) {both[0]:>10.1f} ({both[1]:>6.1f})")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
