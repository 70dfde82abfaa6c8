"""Where the DP step's extra time goes: the ghost path broken down piece by piece, side by side.

On the peers' configuration (``bench/peers``: batch 64, 129-token rows, byte vocabulary, width
128, 2 layers, 4 heads, GeGLU 512, C = 1, σ = 1, Adam, fp32) each piece is jitted on its own and
timed round-robin (one call of each piece per round, median of ``--repeats`` rounds after one
warm-up), in one process, so that the figures are comparable with each other (not with another
run on a shared machine):

* ``plain_grad``: the non-private gradient (one forward and backward of the batched summed loss);
* ``probe_backward``: the ghost path's forward and backward with respect to its zero probes only
  (no weight gradient): output gradients of the norms, the embedding and the ghost-branch maps,
  and the kept maps' per-example gradients (weight probes, where the version has them);
* ``norms/<map>/kept`` and ``norms/<map>/gram``: each linear map's (and the tied embedding's)
  per-example squared norms from its tape, by the kept per-example gradient or by Gram matrices
  (maps sharing an input fused: q/k/v and gate/up);
* ``sum/<map>/kept`` and ``sum/<map>/matmul``: its clipped sum ``Σ_b c_b G_b`` from kept
  gradients against ``xᵀ (c ⊙ δ)`` from the tape;
* ``ghost_norms``, ``ghost_clipped_sum``: the library's pieces as the step runs them;
* ``noise``: the one secure Gaussian draw over every parameter (64-bit Box–Muller), and
  ``optimizer``: the Adam update;
* ``step/non_private``, ``step/dp``: the whole jitted steps, and their difference.

    python bench/dp_overhead.py --repeats 10          # table
    python bench/dp_overhead.py --repeats 10 --json   # JSON
"""

from __future__ import annotations

import argparse
import functools
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

from dptrain.trainer import (
    DpSgdConfig,
    _ghost,
    build_model,
    make_dp_step,
    make_mesh,
    make_optimizer,
    make_plain_step,
    model_loss_fn,
)
from dptrain.trainer._dpsgd import add_noise, local_clipped_sum
from dptrain.trainer._ghost import ghost_norms, weighted_grad_sum
from dptrain.trainer._mesh import replicate, shard_batch
from dptrain.trainer._model import input_ids, token_loss, zero_probes


def _interleaved_medians(pieces: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each piece, timed round-robin (one call of each per round), so that a
    shared machine's load changes hit every piece alike; one warm-up call each first."""
    for fn in pieces.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(repeats):
        for name, fn in pieces.items():
            started = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def _kept_norm(x: jax.Array, d: jax.Array) -> jax.Array:
    g = jnp.einsum("nbli,nblo->nbio", x, d)
    return jnp.sum(jnp.square(g), axis=(0, 2, 3))


def _gram_norm(x: jax.Array, d: jax.Array) -> jax.Array:
    gx = jnp.einsum("nbli,nbmi->nblm", x, x)
    gd = jnp.einsum("nblo,nbmo->nblm", d, d)
    return jnp.sum(gx * gd, axis=(0, 2, 3))


def _kept_sum(x: jax.Array, d: jax.Array, c: jax.Array) -> jax.Array:
    g = jnp.einsum("nbli,nblo->nbio", x, d)
    return jnp.einsum("b,nbio->nio", c, g)


def _matmul_sum(x: jax.Array, d: jax.Array, c: jax.Array) -> jax.Array:
    n, b, length, i = x.shape
    scaled = (d * c[None, :, None, None]).reshape(n, b * length, -1)
    return jnp.matmul(jnp.swapaxes(x.reshape(n, b * length, i), 1, 2), scaled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shape = model_shape(args, "peer")
    model = build_model(shape, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    loss_fn = model_loss_fn(static)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, args.vocab, size=(args.batch, args.seq_len)), jnp.int32)
    mask = jnp.ones(args.batch, bool)
    pieces: dict[str, Callable[[], Any]] = {}

    plain = jax.jit(jax.value_and_grad(lambda p, t: jnp.sum(loss_fn.batched(p, t))))
    pieces["plain_grad"] = lambda: plain(params, tokens)

    def probe_backward(p: Any, t: jax.Array, ghost_probes: bool = True) -> Any:
        m = eqx.combine(p, static)
        inputs, targets = input_ids(t[:, :-1]), t[:, 1:]
        probes = zero_probes(m, inputs.shape[1], inputs.shape[0])
        # The ghost path's own probes (weight probes on kept maps), where this version has them.
        weight_probes = getattr(_ghost, "_weight_probes", None)
        if ghost_probes and weight_probes is not None:
            probes = weight_probes(m, probes, inputs.shape[1], inputs.shape[0])

        def total(probe: Any) -> Any:
            logits, taps = m.forward(inputs, probe)
            losses = token_loss(logits, targets)
            return jnp.sum(losses), (losses, taps)

        (_, (losses, taps)), grads = jax.value_and_grad(total, has_aux=True)(probes)
        return losses, taps, grads

    probe_jit = jax.jit(probe_backward)
    pieces["probe_backward"] = lambda: probe_jit(params, tokens)
    # Output probes on every map: the inputs of the per-map comparison below.
    _, taps, grads = jax.jit(functools.partial(probe_backward, ghost_probes=False))(params, tokens)
    blocks, gb = taps["blocks"], grads["blocks"]

    def flat(a: jax.Array) -> jax.Array:
        return a.reshape(*a.shape[:3], -1)

    pairs = {
        "qkv": (blocks["attn_in"], jnp.concatenate([flat(gb["q"]), flat(gb["k"]),
                                                    flat(gb["v"])], axis=-1)),
        "wo": (flat(blocks["o"]), gb["o"]),
        "gate_up": (blocks["mlp_in"], jnp.concatenate([gb["gate"], gb["up"]], axis=-1)),
        "w_down": (blocks["down"], gb["down"]),
        # The tied embedding as one linear map over 2L positions: [δ_logits | onehot] × [h | √d δ].
        "embedding": (jnp.concatenate([grads["logits"], jax.nn.one_hot(
            input_ids(tokens[:, :-1]), args.vocab)], axis=1)[None],
            jnp.concatenate([taps["head"], np.float32(np.sqrt(args.d_model))
                             * grads["embed"]], axis=1)[None]),
    }
    c = jnp.asarray(rng.uniform(0.1, 1.0, args.batch), jnp.float32)
    for name, (x, d) in pairs.items():
        for kind, fn in (("kept", _kept_norm), ("gram", _gram_norm)):
            f = jax.jit(fn)
            pieces[f"norms/{name}/{kind}"] = lambda f=f, x=x, d=d: f(x, d)
        for kind, fn in (("kept", _kept_sum), ("matmul", _matmul_sum)):
            f = jax.jit(fn)
            pieces[f"sum/{name}/{kind}"] = lambda f=f, x=x, d=d: f(x, d, c)

    gn = jax.jit(lambda p, t: ghost_norms(static, p, t))
    pieces["ghost_norms"] = lambda: gn(params, tokens)
    _, _, tape = gn(params, tokens)
    ws = jax.jit(lambda p, tp, w: weighted_grad_sum(p, tp, w, static))
    pieces["ghost_weighted_sum"] = lambda: ws(params, tape, c)
    config = DpSgdConfig(clip_norm=1.0, expected_batch_size=args.batch)
    lcs = jax.jit(lambda p, t, m: local_clipped_sum(loss_fn, p, t, m, config=config))
    pieces["ghost_clipped_sum"] = lambda: lcs(params, tokens, mask)

    noise = jax.jit(lambda g, k: add_noise(g, k, 1.0))
    key = jax.random.key(1)
    pieces["noise"] = lambda: noise(params, key)
    adam = make_optimizer("adamw", learning_rate=1e-3, total_steps=1000)
    state = adam.init(params)
    update = jax.jit(adam.update)
    pieces["optimizer"] = lambda: update(params, state, params)

    mesh = make_mesh()
    sharded = shard_batch(mesh, np.asarray(tokens), np.ones(args.batch, bool))
    root = np.asarray(jax.random.key_data(jax.random.key(0)))
    for label, step in (("non_private", make_plain_step(loss_fn, adam, mesh)),
                        ("dp", make_dp_step(loss_fn, adam, config, mesh))):
        p, s = replicate(mesh, params), replicate(mesh, adam.init(params))
        compiled = step.lower(p, s, *sharded, root, np.int32(0), np.float32(1.0)).compile()
        # Not donated-away inputs: fresh copies each call would time the copy too; run on.
        state_box = [p, s]

        def run(compiled: Any = compiled, box: list = state_box) -> Any:
            box[0], box[1], _ = compiled(box[0], box[1], *sharded, root, np.int32(1),
                                         np.float32(1.0))
            return box[0]

        pieces[f"step/{label}"] = run
    out = _interleaved_medians(pieces, args.repeats)
    out["step/dp_minus_non_private"] = out["step/dp"] - out["step/non_private"]
    out["step/ratio"] = out["step/dp"] / out["step/non_private"]
    # The extra time, attributed: norms on top of the probe backward, the weighted sum, what the
    # probe backward saves (no weight gradient), and the rest of the step (noise, clipping).
    out["extra/norms"] = out["ghost_norms"] - out["probe_backward"]
    out["extra/clipped_sum_over_plain_grad"] = out["ghost_clipped_sum"] - out["plain_grad"]
    out["extra/saved_weight_grads"] = out["probe_backward"] - out["plain_grad"]
    out["extra/step_rest"] = (out["step/dp_minus_non_private"]
                              - out["extra/clipped_sum_over_plain_grad"])
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for key, value in out.items():
        unit = "" if key == "step/ratio" else " ms"
        shown = value if key == "step/ratio" else value * 1e3
        print(f"{key:<28}{shown:>10.2f}{unit}")


if __name__ == "__main__":
    main()
