"""dptrain's DP step (ghost and per-example clipping) and non-private step on the peers' config.

Same model shape, batch, σ, C and optimizer as ``opacus_step.py`` / ``jax_privacy_step.py``; runs
in the project's environment. Prints one JSON object (examples/s from the median step time, and
compile seconds). The modes are timed round-robin (one step of each in turn) unless
``--sequential``: on a shared machine the ratios then compare steps run under the same load.

    python bench/peers/dptrain_step.py --batch 64 --seq-len 129 --steps 30 --warmup 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import equinox as eqx
import jax
import numpy as np
from issue_config import add_model_arguments, model_shape

from dptrain.trainer import (
    DpSgdConfig,
    build_model,
    make_dp_step,
    make_mesh,
    make_optimizer,
    make_plain_step,
    model_loss_fn,
)
from dptrain.trainer._mesh import replicate, shard_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["non_private", "ghost", "per_example"])
    parser.add_argument("--sequential", action="store_true",
                        help="time the modes one after the other (default: round-robin, one "
                             "step of each mode in turn, so that load changes hit all alike)")
    args = parser.parse_args()
    shape = model_shape(args, "peer")
    mesh = make_mesh()
    params, static = eqx.partition(build_model(shape, key=jax.random.key(0)), eqx.is_array)
    loss = model_loss_fn(static)
    adam = make_optimizer("adamw", learning_rate=1e-3, total_steps=1000)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, args.vocab, size=(args.batch, args.seq_len)).astype(np.int32)
    sharded = shard_batch(mesh, tokens, np.ones(args.batch, bool))
    root = np.asarray(jax.random.key_data(jax.random.key(0)))

    def dp(clipping: str):
        return make_dp_step(loss, adam, DpSgdConfig(clip_norm=1.0, expected_batch_size=args.batch,
                                                    clipping=clipping), mesh)

    makers = {"non_private": lambda: make_plain_step(loss, adam, mesh),
              "ghost": lambda: dp("ghost"), "per_example": lambda: dp("per-example")}
    result: dict = {"stack": "dptrain", "versions": {"jax": jax.__version__},
                    "batch": args.batch, "params": shape.param_count}
    compiled, state = {}, {}
    for mode in args.modes:
        p, s = replicate(mesh, params), replicate(mesh, adam.init(params))
        started = time.perf_counter()
        compiled[mode] = makers[mode]().lower(p, s, *sharded, root, np.int32(0),
                                              np.float32(1.0)).compile()
        result[f"{mode}_compile_s"] = time.perf_counter() - started
        state[mode] = (p, s)
    times: dict[str, list[float]] = {mode: [] for mode in args.modes}

    def run(mode: str, i: int) -> None:
        p, s = state[mode]
        started = time.perf_counter()
        p, s, _ = compiled[mode](p, s, *sharded, root, np.int32(i), np.float32(1.0))
        jax.block_until_ready(p)
        times[mode].append(time.perf_counter() - started)
        state[mode] = (p, s)

    if args.sequential:
        for mode in args.modes:
            for i in range(args.warmup + args.steps):
                run(mode, i)
    else:  # round-robin: a shared machine's load changes hit every mode alike
        for i in range(args.warmup + args.steps):
            for mode in args.modes:
                run(mode, i)
    for mode in args.modes:
        result[mode] = args.batch / statistics.median(times[mode][args.warmup:])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
