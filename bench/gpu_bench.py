"""How close to the hardware limit: DP and non-private tokens/s, MFU and peak memory per shape.

For each shape (``small``, ``base`` and VaultGemma-1B, microbatched) compile the DP step (ghost
clipping by default) and the non-private step on the same batch, time ``--steps`` executions after
``--warmup`` and print medians: tokens/s, model FLOP utilisation (``6·N + 12·layers·d·T``
FLOPs per token over ``--peak-tflops``) and peak device memory (the allocator's peak where the
backend reports it, else XLA's compiled memory analysis). Run by ``bench/gpu.sh``.

    python bench/gpu_bench.py --dry          # CPU, tiny batch: proves the script end to end
    python bench/gpu_bench.py --shapes small base vaultgemma-1b --batch 64 --microbatch 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import equinox as eqx
import jax
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
from dptrain.trainer._mesh import replicate, shard_batch

# Dense peak TFLOP/s for fp32 matmuls as XLA runs them (TF32 tensor cores where the chip has them).
PEAK_TFLOPS = {"H200": 494.7, "H100": 494.7, "A100": 156.0, "L4": 60.0, "TPU v5": 197.0,
               "TPU v4": 275.0}


def peak_tflops(kind: str) -> float | None:
    for name, value in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return value
    return None


def flops_per_token(shape, seq_len: int) -> float:
    """Training FLOPs per token: 6·params (forward + backward) + causal attention's score work."""
    return 6.0 * shape.param_count + 12.0 * shape.n_layers * shape.n_heads * shape.head_dim \
        * seq_len / 2


def peak_bytes(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def bench(name: str, *, batch: int, seq_len: int, microbatch: int | None, steps: int,
          warmup: int, clipping: str, peak: float | None, dry: bool) -> dict:
    shape = get_preset(name)
    if dry:  # the same code path at a size a CPU runs in seconds
        shape = dataclasses.replace(shape, d_model=32, n_layers=2, n_heads=2, head_dim=16,
                                    d_ff=64, vocab_size=259)
    seq_len = min(seq_len, shape.max_seq_len)
    mesh = make_mesh()
    params, static = eqx.partition(build_model(shape, key=jax.random.key(0)), eqx.is_array)
    loss = model_loss_fn(static)
    adam = make_optimizer("adamw", learning_rate=1e-4, total_steps=1000)
    tokens = np.random.default_rng(0).integers(3, shape.vocab_size, (batch, seq_len + 1))
    sharded = shard_batch(mesh, tokens.astype(np.int32), np.ones(batch, bool))
    root = np.asarray(jax.random.key_data(jax.random.key(0)))
    out: dict = {"shape": name, "params": shape.param_count, "batch": batch, "seq_len": seq_len,
                 "microbatch": microbatch, "clipping": clipping, "devices": mesh.devices.size}
    for label, step in (
            ("non_private", make_plain_step(loss, adam, mesh, microbatch)),
            ("dp", make_dp_step(loss, adam, DpSgdConfig(
                clip_norm=1.0, expected_batch_size=batch, microbatch_size=microbatch,
                clipping=clipping), mesh))):
        p, s = replicate(mesh, params), replicate(mesh, adam.init(params))
        started = time.perf_counter()
        compiled = step.lower(p, s, *sharded, root, np.int32(0), np.float32(1.0)).compile()
        compile_s = time.perf_counter() - started
        times = []
        for i in range(warmup + steps):
            started = time.perf_counter()
            p, s, _ = compiled(p, s, *sharded, root, np.int32(i), np.float32(1.0))
            jax.block_until_ready(p)
            times.append(time.perf_counter() - started)
        tokens_per_s = batch * seq_len / statistics.median(times[warmup:])
        analysis = compiled.memory_analysis()
        compiled_gb = None if analysis is None else (
            analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes) / 2**30
        device_peak = peak_bytes(mesh.devices.flat[0])
        achieved = tokens_per_s * flops_per_token(shape, seq_len) / 1e12 / mesh.devices.size
        out[label] = {"tokens_per_s": tokens_per_s, "compile_s": compile_s,
                      "mfu": None if peak is None else achieved / peak,
                      "achieved_tflops_per_device": achieved,
                      "compiled_memory_gb": compiled_gb,
                      "peak_device_memory_gb": None if device_peak is None else device_peak / 2**30}
        del p, s, compiled
    out["dp_over_non_private_time"] = out["non_private"]["tokens_per_s"] / out["dp"]["tokens_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["small", "base", "vaultgemma-1b"])
    parser.add_argument("--batch", type=int, default=64, help="rows per step (all devices)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--microbatch", type=int, default=None,
                        help="rows per microbatch per device (VaultGemma-1B: default 4)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clipping", choices=["ghost", "per-example"], default="ghost")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: by device kind; none on CPU)")
    parser.add_argument("--dry", action="store_true",
                        help="tiny models, batch 4, 16 tokens, 2 steps: runs anywhere in seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.dry:
        args.batch, args.seq_len, args.steps, args.warmup = 4, 16, 2, 1
    device = jax.devices()[0]
    peak = args.peak_tflops or peak_tflops(device.device_kind)
    results = []
    for name in args.shapes:
        microbatch = args.microbatch
        if microbatch is None and name == "vaultgemma-1b":
            microbatch = 2 if args.dry else 4
        results.append(bench(name, batch=args.batch, seq_len=args.seq_len, microbatch=microbatch,
                             steps=args.steps, warmup=args.warmup, clipping=args.clipping,
                             peak=peak, dry=args.dry))
    if args.json:
        print(json.dumps({"device": device.device_kind, "peak_tflops": peak,
                          "results": results}, indent=2))
        return
    print(f"device: {device.device_kind} × {jax.device_count()}, peak {peak} TFLOP/s"
          + (" (dry run: tiny stand-in shapes)" if args.dry else ""))
    print(f"{'shape':<15}{'step':<13}{'tokens/s':>12}{'MFU':>8}{'TFLOP/s':>9}{'peak GB':>9}"
          f"{'compiled GB':>12}{'compile s':>10}")
    for r in results:
        for label in ("non_private", "dp"):
            m = r[label]

            def fmt(value, spec):
                return "n/a" if value is None else format(value, spec)
            print(f"{r['shape']:<15}{label:<13}{m['tokens_per_s']:>12,.0f}"
                  f"{fmt(m['mfu'], '.1%'):>8}{m['achieved_tflops_per_device']:>9.2f}"
                  f"{fmt(m['peak_device_memory_gb'], '.2f'):>9}"
                  f"{fmt(m['compiled_memory_gb'], '.2f'):>12}{m['compile_s']:>10.1f}")
        print(f"{r['shape']:<15}DP/non-private time {r['dp_over_non_private_time']:.2f} "
              f"(batch {r['batch']}×{r['seq_len']}, microbatch {r['microbatch']}, "
              f"{r['clipping']} clipping)")


if __name__ == "__main__":
    main()
