"""The sweep harness: one DP-SGD training run per grid point, measured on held-out data.

Each run is the training loop's own compiled DP step (``_loop.compiled_step``: per-example
clipping, one Gaussian draw per step, normalisation by the expected batch) with the loop's
optimizer, schedule, seeding and physical-batch rounding (``_mesh.fill_devices``), on Poisson
batches from the trainer's sampler, at σ = σ̄·B. The privacy ledger and budget guard of
``dptrain train`` are deliberately absent: tiny σ̄ have astronomically large ε, and these runs
measure loss, not privacy (so a sweep runs only on public data). The grid, settings and table
are the planner's (``dptrain.planner._sweep_table``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import platform
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dptrain.planner._sweep_table import Measured, SweepRun, SweepSettings
from dptrain.privacy import round_up_to_float32
from dptrain.trainer import _loop
from dptrain.trainer._dpsgd import model_loss_fn
from dptrain.trainer._mesh import fill_devices, make_mesh
from dptrain.trainer._model import build_model
from dptrain.trainer._sampling import PoissonSampler

PHYSICAL_STD_DEVS = 3.0
"""Rows per step = B + 3 standard deviations of the Poisson batch size. A truncated batch (rare,
by a few rows) changes the measured loss negligibly, and every padding row costs compute; jobs use
the accountant's truncation-safe size instead, but a sweep claims no privacy."""
EVAL_CHUNK = 256
"""Held-out rows per forward pass."""


def physical_batch_size(batch: int, dataset_size: int, *, devices: int,
                        microbatch: int | None, override: int | None = None) -> int:
    """Rows per step: ``override`` or B + 3 std, rounded up to fill every device's microbatches."""
    q = batch / dataset_size
    rows = override or math.ceil(batch + PHYSICAL_STD_DEVS * math.sqrt(batch * (1 - q)))
    return fill_devices(rows, devices=devices, microbatch=microbatch)


def train_and_evaluate(dataset: Any, shape: Any, *, batch_size: int, steps: int, sigma: float,
                       learning_rate: float, settings: SweepSettings, compiled: Any = None,
                       train_rows: int | None = None) -> tuple[list[Measured], bool, float]:
    """Train ``shape`` with the DP-SGD step at noise multiplier ``sigma`` and measure it.

    The training rows are the dataset's first N − ``heldout_rows`` sequences (Poisson-sampled
    at rate B / (N − H); ``train_rows`` uses only the first that many); the held-out loss is
    measured on the last H at ``settings.eval_steps``.
    Returns the measured points, whether the loss diverged (the run then stops), and the median
    seconds per training step after compilation.
    """
    s = settings
    step_fn, optimizer, mesh, evaluate = compiled or compile_step(
        dataset, shape, batch_size=batch_size, learning_rate=learning_rate, settings=s,
        steps=steps)
    n_train = dataset.num_sequences - s.heldout_rows
    if train_rows is not None:
        n_train = min(n_train, train_rows)
    physical = physical_batch_size(batch_size, n_train, devices=jax.device_count(),
                                   microbatch=s.microbatch_size, override=s.physical_batch_size)
    replicated = NamedSharding(mesh, P())
    by_rows = NamedSharding(mesh, P(mesh.axis_names[0]))
    # The trainer's seeding: the model from fold_in(seed, 0), the noise from the seed's key.
    seed_key = jax.random.key(s.seed)
    root_key = np.asarray(jax.random.key_data(seed_key))
    params, _ = eqx.partition(build_model(shape, key=jax.random.fold_in(seed_key, 0)),
                              eqx.is_array)
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)
    # A sweep runs on data declared public (--public-data or a built-in corpus), so its
    # randomness may be public too: the sampler's key is derived from the seed, which makes
    # every σ̄ of the grid see the same batches. Never do this with private data.
    public_key = hashlib.sha256(f"dptrain-sweep/{s.seed}".encode()).digest()
    sampler = PoissonSampler(dataset_size=n_train, expected_batch_size=batch_size,
                             physical_batch_size=physical, key=public_key)
    noise_multiplier = np.float32(round_up_to_float32(sigma))
    pad = dataset.tokenizer.pad_id
    heldout = dataset.gather(np.arange(dataset.num_sequences - s.heldout_rows,
                                       dataset.num_sequences), pad)
    logged = set(x for x in s.eval_steps if x <= steps) | {steps}
    points: list[Measured] = []
    window: list[Any] = []  # device scalars: no host sync until the window is logged
    step_seconds: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        tick = time.perf_counter()
        batch = sampler.sample(step)
        tokens = jax.device_put(dataset.gather(batch.indices, pad), by_rows)
        mask = jax.device_put(batch.mask, by_rows)
        params, opt_state, out = step_fn(params, opt_state, tokens, mask, root_key,
                                         np.int32(step), noise_multiplier)
        window.append((out.loss, out.real_rows))
        if step + 1 in logged:
            losses, real = np.asarray(jax.device_get(window), dtype=np.float64).T
            train = float(np.sum(losses * real) / real.sum()) if real.sum() else math.nan
            window = []
            held = sum(float(evaluate(params, heldout[i:i + EVAL_CHUNK]))
                       * len(heldout[i:i + EVAL_CHUNK])
                       for i in range(0, len(heldout), EVAL_CHUNK)) / len(heldout)
            if not (math.isfinite(held) and math.isfinite(train)):
                return points, True, _median(step_seconds)
            points.append(Measured(step + 1, held, train, time.perf_counter() - started))
        elif step > 0 and len(step_seconds) < 64:  # step time after compilation
            jax.block_until_ready(out.loss)
            step_seconds.append(time.perf_counter() - tick)
    return points, False, _median(step_seconds)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else math.nan


def compile_step(dataset: Any, shape: Any, *, batch_size: int, learning_rate: float,
                 settings: SweepSettings, steps: int) -> tuple[Any, Any, Any, Any]:
    """The DP step, optimiser, mesh and a held-out loss function for one configuration.

    The step is the training loop's (memoised): the same compiled function a job runs.
    """
    s, pad = settings, dataset.tokenizer.pad_id
    mesh = make_mesh()
    optimizer_key = (s.optimizer, learning_rate, steps,
                     round(s.warmup_steps * steps / s.steps), s.weight_decay)
    step, optimizer, static = _loop.compiled_step(shape, optimizer_key, s.clip_norm,
                                                  float(batch_size), s.microbatch_size, pad, mesh)
    loss_fn = model_loss_fn(static, pad)
    evaluate = jax.jit(lambda params, rows: jnp.mean(jax.vmap(loss_fn, (None, 0))(params, rows)))
    return step, optimizer, mesh, evaluate


class SweepTrainer:
    """Trains grid points one after another.

    The compiled step of the current (preset, B, learning rate, horizon) is kept: σ is an
    argument of the step, so every σ̄ of that quadruple reuses it (the horizon is the schedule's
    length, compiled into the optimiser).
    """

    def __init__(self, dataset: Any, settings: SweepSettings) -> None:
        self.dataset, self.settings = dataset, settings
        self._cached: tuple[tuple[str, int, float, int], Any] | None = None

    def run(self, shape: Any, run: SweepRun, settings: SweepSettings | None = None,
            ) -> tuple[dict[str, Any], list[Measured]]:
        """Train one grid point; returns its record and its measured curve.

        ``settings`` are the run's own (its horizon's schedule and evaluation steps; default:
        the sweep's). A run whose loss turns non-finite stops there and returns no curve (the
        planner takes the minimum over learning rates, so a diverged learning rate simply drops
        out).
        """
        s = settings or self.settings
        started = time.perf_counter()
        key = (shape.name, run.batch_size, run.learning_rate, s.steps)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, compile_step(self.dataset, shape, batch_size=run.batch_size,
                                              learning_rate=run.learning_rate, settings=s,
                                              steps=s.steps))
        sigma = run.ratio * run.batch_size
        curve, diverged, step_s = train_and_evaluate(
            self.dataset, shape, batch_size=run.batch_size, steps=s.steps, sigma=sigma,
            learning_rate=run.learning_rate, settings=s, compiled=self._cached[1])
        record = {"preset": run.preset, "model_params": shape.param_count,
                  "batch_size": run.batch_size, "noise_batch_ratio": run.ratio,
                  "learning_rate": run.learning_rate, "noise_multiplier": float(sigma),
                  "horizon": s.steps, "steps": curve[-1].step if curve else 0,
                  "final_loss": curve[-1].heldout_loss if curve else None,
                  "final_train_loss": curve[-1].train_loss if curve else None,
                  "diverged": diverged,
                  "step_seconds": None if math.isnan(step_s) else round(step_s, 5),
                  "seconds": round(time.perf_counter() - started, 2)}
        return record, ([] if diverged else curve)


def environment() -> dict[str, Any]:
    """Versions, platform and accelerators the sweep ran on."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"dptrain": version("dptrain"), "jax": jax.__version__, "jaxlib": version("jaxlib"),
            "equinox": version("equinox"), "optax": version("optax"),
            "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(), "device_count": jax.device_count(),
            "devices": sorted({str(d.device_kind) for d in jax.devices()})}
