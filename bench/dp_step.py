"""DP-SGD step against the non-private step, same model and batch, in one run.

For each preset: compile both steps, time ``--repeats`` executions of each (after a warm-up) and
print medians: seconds per step, examples/s, tokens/s, the ratio DP/non-DP, and the compiled
programs' memory (XLA's memory analysis: arguments + outputs + temporaries) plus the process's peak
RSS. The non-private step is the gradient of the mean loss; the DP step adds per-example gradient
norms (``--clipping ghost``, the default: from activations and output gradients, no per-example
gradients in memory; or ``per-example``: ``vmap(grad)``), clipping, and one Gaussian draw.

``--only dp|non_dp`` runs one step kind per process, so that peak RSS belongs to that step:

The noise: the DP step draws its Gaussian from 64-bit uniforms (Box–Muller, no cut-off tail;
``dptrain.trainer._noise``). Its cost is measured on its own, side by side with the float32
``jax.random.normal`` it replaces, for the preset's parameter count, and reported as a share of
the DP step (target: the whole secure draw ≤ 5 % of a DP step on ``tiny`` and ``small``).

    python bench/dp_step.py --presets tiny small --batch 64 --seq-len 128
    for s in non_dp dp; do python bench/dp_step.py --presets small --only $s --json; done
    python bench/dp_step.py --presets small --compile-only   # compiled memory only, no steps

``--finetune`` compares instead the DP step of full fine-tuning (every parameter) with LoRA
fine-tuning (``--lora-rank``, adapters on every attention and MLP projection; the base weights
are a frozen input of the step) on the same model and batch: step time, compiled memory and
peak RSS (target: LoRA's peak memory ≤ 0.5× full). Run each kind in its own process for RSS:

    python bench/dp_step.py --finetune --presets small
    for k in full lora; do python bench/dp_step.py --finetune --presets small --only $k; done
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dptrain.planner import get_preset
from dptrain.trainer import (
    DpSgdConfig,
    build_model,
    make_dp_step,
    make_mesh,
    make_optimizer,
    make_plain_step,
    model_loss_fn,
)
from dptrain.trainer._lora import LoraConfig, add_adapters, split
from dptrain.trainer._mesh import replicate, shard_batch
from dptrain.trainer._noise import secure_normal

NOISE_TARGET = 0.05


def _median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn(i)`` (its result awaited), after one warm-up call."""
    jax.block_until_ready(fn(0))
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(i + 1))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_noise(size: int, repeats: int) -> dict:
    """Seconds per draw of ``size`` normals: 64-bit Box–Muller vs float32 erfinv."""
    secure = jax.jit(lambda k: secure_normal(k, size))
    erfinv = jax.jit(lambda k: jax.random.normal(k, (size,), jnp.float32))
    keys = [jax.random.key(i) for i in range(repeats + 1)]
    return {"secure_s": _median_seconds(lambda i: secure(keys[i]), repeats),
            "erfinv_s": _median_seconds(lambda i: erfinv(keys[i]), repeats)}


def _memory_mb(compiled) -> float | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    return total / 2**20


def bench_preset(name: str, *, batch: int, seq_len: int, repeats: int,
                 microbatch: int | None, clipping: str = "ghost",
                 only: str | None = None, compile_only: bool = False) -> dict:
    shape = get_preset(name)
    seq_len = min(seq_len, shape.max_seq_len)
    mesh = make_mesh()
    params, static = eqx.partition(build_model(shape, key=jax.random.key(0)), eqx.is_array)
    loss = model_loss_fn(static)
    optimizer = make_optimizer("adamw", learning_rate=1e-3, total_steps=1000)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, shape.vocab_size, size=(batch, seq_len)).astype(np.int32)
    mask = np.ones(batch, bool)
    sharded = shard_batch(mesh, tokens, mask)
    root = np.asarray(jax.random.key_data(jax.random.key(0)))
    steps = {
        "dp": make_dp_step(loss, optimizer, DpSgdConfig(
            clip_norm=1.0, expected_batch_size=batch, microbatch_size=microbatch,
            clipping=clipping), mesh),
        "non_dp": make_plain_step(loss, optimizer, mesh, microbatch),
    }
    if only is not None:
        steps = {only: steps[only]}
    result: dict = {"preset": name, "params": shape.param_count, "batch": batch,
                    "seq_len": seq_len, "devices": mesh.devices.size,
                    "microbatch": microbatch, "clipping": clipping}
    for label, step in steps.items():
        p = replicate(mesh, params)
        s = replicate(mesh, optimizer.init(params))
        args = (p, s, *sharded, root, np.int32(0), np.float32(1.0))
        started, cpu_started = time.perf_counter(), time.process_time()
        compiled = step.lower(*args).compile()
        compile_s = time.perf_counter() - started
        # CPU seconds as well: on a shared machine wall time mostly measures the neighbours.
        compile_cpu_s = time.process_time() - cpu_started
        if compile_only:
            result[label] = {"compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
                             "memory_mb": _memory_mb(compiled)}
            continue
        p, s, _ = compiled(*args)  # warm-up
        jax.block_until_ready(p)
        times = []
        for i in range(repeats):
            started = time.perf_counter()
            p, s, _out = compiled(p, s, *sharded, root, np.int32(i + 1), np.float32(1.0))
            jax.block_until_ready(p)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        result[label] = {"compile_s": compile_s, "compile_cpu_s": compile_cpu_s, "step_s": median,
                         "examples_per_s": batch / median,
                         "tokens_per_s": batch * (seq_len - 1) / median,
                         "memory_mb": _memory_mb(compiled)}
    if compile_only:
        if only is None:
            result["memory_ratio"] = result["dp"]["memory_mb"] / result["non_dp"]["memory_mb"]
            result["compile_ratio"] = result["dp"]["compile_s"] / result["non_dp"]["compile_s"]
            result["compile_cpu_ratio"] = (result["dp"]["compile_cpu_s"]
                                           / result["non_dp"]["compile_cpu_s"])
        return result
    if only is None:
        result["ratio_dp_over_non_dp"] = result["dp"]["step_s"] / result["non_dp"]["step_s"]
        result["memory_ratio"] = ((result["dp"]["memory_mb"] or 0)
                                  / (result["non_dp"]["memory_mb"] or 1))
        result["compile_ratio"] = result["dp"]["compile_s"] / result["non_dp"]["compile_s"]
    if only != "non_dp":
        noise = bench_noise(shape.param_count + 1, repeats)  # + the loss coordinate
        noise["secure_share_of_dp_step"] = noise["secure_s"] / result["dp"]["step_s"]
        noise["extra_share_of_dp_step"] = (noise["secure_s"] - noise["erfinv_s"]) / \
            result["dp"]["step_s"]
        result["noise"] = noise
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


LORA_MEMORY_TARGET = 0.5


def bench_finetune(name: str, *, batch: int, seq_len: int, repeats: int, rank: int,
                   microbatch: int | None, clipping: str = "ghost",
                   only: str | None = None) -> dict:
    """DP step of full vs LoRA fine-tuning of preset ``name``: time and memory, side by side."""
    shape = get_preset(name)
    seq_len = min(seq_len, shape.max_seq_len)
    mesh = make_mesh()
    base = build_model(shape, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, shape.vocab_size, size=(batch, seq_len)).astype(np.int32)
    sharded = shard_batch(mesh, tokens, np.ones(batch, bool))
    root = np.asarray(jax.random.key_data(jax.random.key(0)))
    result: dict = {"preset": name, "params": shape.param_count, "batch": batch,
                    "seq_len": seq_len, "devices": mesh.devices.size, "clipping": clipping,
                    "lora_rank": rank, "microbatch": microbatch}
    for kind in ("full", "lora") if only is None else (only,):
        model = base if kind == "full" else add_adapters(base, LoraConfig(rank=rank),
                                                         key=jax.random.key(1))
        params, frozen, static = split(model)
        optimizer = make_optimizer("adamw", learning_rate=1e-3, total_steps=1000)
        step = make_dp_step(model_loss_fn(static), optimizer, DpSgdConfig(
            clip_norm=1.0, expected_batch_size=batch, microbatch_size=microbatch,
            clipping=clipping), mesh)
        p = replicate(mesh, params)
        s = replicate(mesh, optimizer.init(params))
        f = None if frozen is None else replicate(mesh, frozen)
        args = (p, s, *sharded, root, np.int32(0), np.float32(1.0), f)
        started = time.perf_counter()
        compiled = step.lower(*args).compile()
        compile_s = time.perf_counter() - started
        p, s, _ = compiled(*args)  # warm-up
        jax.block_until_ready(p)
        times = []
        for i in range(repeats):
            started = time.perf_counter()
            p, s, _out = compiled(p, s, *sharded, root, np.int32(i + 1), np.float32(1.0), f)
            jax.block_until_ready(p)
            times.append(time.perf_counter() - started)
        trained = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
        result[kind] = {"trained_params": trained, "compile_s": compile_s,
                        "step_s": statistics.median(times), "memory_mb": _memory_mb(compiled)}
    if only is None:
        result["time_ratio_lora_over_full"] = result["lora"]["step_s"] / result["full"]["step_s"]
        result["memory_ratio_lora_over_full"] = ((result["lora"]["memory_mb"] or 0)
                                                 / (result["full"]["memory_mb"] or 1))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _print_finetune(results: list[dict]) -> None:
    print(f"{'preset':<8}{'kind':>6}{'trained':>12}{'s/step':>9}{'mem MB':>9}{'compile s':>11}")
    for r in results:
        for kind in ("full", "lora"):
            if kind not in r:
                continue
            m = r[kind]
            mem = f"{m['memory_mb']:.1f}" if m["memory_mb"] is not None else "n/a"
            print(f"{r['preset']:<8}{kind:>6}{m['trained_params']:>12,}{m['step_s']:>9.4f}"
                  f"{mem:>9}{m['compile_s']:>11.1f}")
        if "memory_ratio_lora_over_full" in r:
            ratio = r["memory_ratio_lora_over_full"]
            verdict = "ok" if ratio <= LORA_MEMORY_TARGET else \
                f"ABOVE TARGET {LORA_MEMORY_TARGET}"
            print(f"{r['preset']:<8} LoRA (rank {r['lora_rank']}) / full, DP ({r['clipping']}): "
                  f"compiled memory {ratio:.2f} ({verdict}), time "
                  f"{r['time_ratio_lora_over_full']:.2f}; batch {r['batch']}×{r['seq_len']}, "
                  f"peak RSS (both in one process) {r['peak_rss_mb']:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=64, help="physical batch (rows)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--microbatch", type=int, default=None)
    parser.add_argument("--clipping", choices=["ghost", "per-example"], default="ghost")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile and report compiled memory and compile time only (JSON)")
    parser.add_argument("--only", choices=["dp", "non_dp", "full", "lora"], default=None,
                        help="time one step kind (its own process: peak RSS is that step's); "
                             "full/lora with --finetune")
    parser.add_argument("--finetune", action="store_true",
                        help="compare the DP step of full and LoRA fine-tuning instead")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    if args.finetune:
        if args.only in ("dp", "non_dp"):
            parser.error("--only with --finetune is full or lora")
        found = [bench_finetune(p, batch=args.batch, seq_len=args.seq_len, repeats=args.repeats,
                                rank=args.lora_rank, microbatch=args.microbatch,
                                clipping=args.clipping, only=args.only) for p in args.presets]
        if args.json or args.only:
            print(json.dumps(found, indent=2))
        else:
            _print_finetune(found)
        return
    if args.only in ("full", "lora"):
        parser.error("--only full/lora needs --finetune")
    results = [bench_preset(p, batch=args.batch, seq_len=args.seq_len, repeats=args.repeats,
                            microbatch=args.microbatch, clipping=args.clipping, only=args.only,
                            compile_only=args.compile_only)
               for p in args.presets]
    if args.json or args.only or args.compile_only:
        print(json.dumps(results, indent=2))
        return
    print(f"{'preset':<8}{'params':>9}{'step':>8}{'s/step':>9}{'ex/s':>9}{'tok/s':>10}"
          f"{'mem MB':>9}{'compile s':>11}")
    for r in results:
        for label in ("non_dp", "dp"):
            m = r[label]
            mem = f"{m['memory_mb']:.1f}" if m["memory_mb"] is not None else "n/a"
            print(f"{r['preset']:<8}{r['params']:>9,}{label:>8}{m['step_s']:>9.4f}"
                  f"{m['examples_per_s']:>9.1f}{m['tokens_per_s']:>10,.0f}{mem:>9}"
                  f"{m['compile_s']:>11.1f}")
        target = "ok" if r["ratio_dp_over_non_dp"] <= 1.15 else "ABOVE TARGET 1.15"
        print(f"{r['preset']:<8} DP ({r['clipping']}) / non-DP: time "
              f"{r['ratio_dp_over_non_dp']:.2f} ({target}), compiled memory "
              f"{r['memory_ratio']:.2f}, compile {r['compile_ratio']:.2f}; "
              f"batch {r['batch']}×{r['seq_len']}, {r['devices']} device(s), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")
        n = r["noise"]
        verdict = "ok" if n["secure_share_of_dp_step"] <= NOISE_TARGET else \
            f"ABOVE TARGET {NOISE_TARGET:.0%}"
        print(f"{r['preset']:<8} noise: 64-bit Box–Muller {n['secure_s'] * 1e3:.2f} ms, float32 "
              f"erfinv {n['erfinv_s'] * 1e3:.2f} ms per draw of {r['params'] + 1:,}; secure "
              f"draw = {n['secure_share_of_dp_step']:.1%} of a DP step ({verdict}), "
              f"{n['extra_share_of_dp_step']:+.1%} over erfinv")


if __name__ == "__main__":
    main()
