"""The runs of `dptrain sweep`: one DP-SGD training run per grid point, and the table they fill.

Each run is the trainer's DP-SGD step (:func:`dptrain.trainer.make_dp_step`: per-example clipping,
one Gaussian draw per step, normalisation by the expected batch) on Poisson batches from the
trainer's sampler, with the trainer's optimizer, schedule and seeding, at σ = σ̄·B. The privacy
ledger and budget guard of ``dptrain train`` are deliberately absent: tiny σ̄ have astronomically
large ε, and these runs measure loss, not privacy.

JAX is imported inside the functions that train, so that importing the CLI stays light.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import time
from collections.abc import Iterable, Sequence
from typing import Any

from dptrain.privacy import round_up_to_float32

TABLE_COLUMNS = ("model_params", "noise_batch_ratio", "learning_rate", "step", "loss", "preset",
                 "noise_multiplier", "batch_size", "sequence_length", "seed", "train_loss")
PHYSICAL_STD_DEVS = 3.0
"""Rows per step = B + 3 standard deviations of the Poisson batch size. A truncated batch (rare,
by a few rows) changes the measured loss negligibly, and every padding row costs compute; jobs use
the accountant's truncation-safe size instead, but a sweep claims no privacy."""
LOSS_NOTE = ("held-out loss: the mean next-token cross-entropy (nats/token) of the model after "
             "`step` updates on the dataset's last `heldout_rows` sequences, which no run samples "
             "for training; train_loss: the mean over the Poisson-sampled sequences of the steps "
             "since the previous logged step, each computed before its step's update")
SCHEDULE_NOTE = "linear warm-up, cosine decay to 10% of the peak over --steps (as jobs)"
EVAL_CHUNK = 256
"""Held-out rows per forward pass."""


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One grid point."""

    preset: str
    batch_size: int
    ratio: float
    learning_rate: float

    @property
    def key(self) -> tuple[str, int, float, float]:
        """(preset, B, σ̄, learning rate)."""
        return (self.preset, self.batch_size, self.ratio, self.learning_rate)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepSettings:
    """What every run of a sweep shares (a resumed sweep must match it exactly)."""

    steps: int
    sequence_length: int
    eval_steps: tuple[int, ...]
    heldout_rows: int
    clip_norm: float
    optimizer: str
    weight_decay: float
    warmup_steps: int
    microbatch_size: int | None
    physical_batch_size: int | None
    seed: int

    def to_dict(self, dataset: Any) -> dict[str, Any]:
        """JSON form, with the data it was measured on."""
        out = dataclasses.asdict(self)
        out["eval_steps"] = list(self.eval_steps)
        return {**out, "schedule": SCHEDULE_NOTE,
                "dataset_checksum": dataset.manifest.source_checksum,
                "tokenizer": dataset.manifest.tokenizer}


def eval_steps(steps: int, *, points: int, every: int | None) -> tuple[int, ...]:
    """Steps at which the held-out loss is measured (always including the last).

    Every ``every`` steps, or ``points`` log-spaced ones.
    """
    if every is not None:
        grid = set(range(every, steps + 1, every))
    else:
        grid = {max(1, round(steps ** (k / max(1, points - 1)))) for k in range(points)}
    return tuple(sorted(grid | {steps}))


def physical_batch_size(batch: int, dataset_size: int, *, devices: int,
                        microbatch: int | None, override: int | None = None) -> int:
    """Rows per step: ``override`` or B + 3 std, rounded up to fill every device's microbatches."""
    q = batch / dataset_size
    rows = override or math.ceil(batch + PHYSICAL_STD_DEVS * math.sqrt(batch * (1 - q)))
    unit = devices * (microbatch or 1)
    return -(-rows // unit) * unit


@dataclasses.dataclass(frozen=True)
class Measured:
    """One logged point of a run: held-out loss, training loss and time so far."""

    step: int
    heldout_loss: float
    train_loss: float
    seconds: float


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
    import equinox as eqx
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dptrain.trainer import PoissonSampler, build_model

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
    """The DP step, optimiser, mesh and a held-out loss function for one configuration."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from dptrain.trainer import (
        DpSgdConfig,
        build_model,
        make_dp_step,
        make_mesh,
        make_optimizer,
        model_loss_fn,
    )
    s, pad = settings, dataset.tokenizer.pad_id
    optimizer = make_optimizer(s.optimizer, learning_rate=learning_rate, total_steps=steps,
                               warmup_steps=round(s.warmup_steps * steps / s.steps),
                               weight_decay=s.weight_decay)
    _, static = eqx.partition(build_model(shape, key=jax.random.key(0)), eqx.is_array)
    mesh = make_mesh()
    loss_fn = model_loss_fn(static, pad)
    step = make_dp_step(loss_fn, optimizer,
                        DpSgdConfig(clip_norm=s.clip_norm, expected_batch_size=float(batch_size),
                                    microbatch_size=s.microbatch_size, pad_id=pad), mesh)
    evaluate = jax.jit(lambda params, rows: jnp.mean(jax.vmap(loss_fn, (None, 0))(params, rows)))
    return step, optimizer, mesh, evaluate


class SweepTrainer:
    """Trains grid points one after another.

    The compiled step of the current (preset, B, learning rate) is kept: σ is an argument of
    the step, so every σ̄ of that triple reuses it.
    """

    def __init__(self, dataset: Any, settings: SweepSettings) -> None:
        self.dataset, self.settings = dataset, settings
        self._cached: tuple[tuple[str, int, float], Any] | None = None

    def run(self, shape: Any, run: SweepRun) -> tuple[dict[str, Any], list[Measured]]:
        """Train one grid point; returns its record and its measured curve.

        A run whose loss turns non-finite stops there and returns no curve (the planner takes
        the minimum over learning rates, so a diverged learning rate simply drops out).
        """
        s = self.settings
        started = time.perf_counter()
        key = (shape.name, run.batch_size, run.learning_rate)
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
                  "steps": curve[-1].step if curve else 0,
                  "final_loss": curve[-1].heldout_loss if curve else None,
                  "final_train_loss": curve[-1].train_loss if curve else None,
                  "diverged": diverged,
                  "step_seconds": None if math.isnan(step_s) else round(step_s, 5),
                  "seconds": round(time.perf_counter() - started, 2)}
        return record, ([] if diverged else curve)


def table_rows(params: int, run: SweepRun, curve: Iterable[Measured],
               settings: SweepSettings) -> list[dict[str, Any]]:
    """The CSV rows of one run (``loss`` is the held-out loss)."""
    return [{"model_params": params, "noise_batch_ratio": repr(run.ratio),
             "learning_rate": repr(run.learning_rate), "step": m.step,
             "loss": f"{m.heldout_loss:.6f}", "preset": run.preset,
             "noise_multiplier": f"{run.ratio * run.batch_size:.6g}",
             "batch_size": run.batch_size, "sequence_length": settings.sequence_length,
             "seed": settings.seed, "train_loss": f"{m.train_loss:.6f}"} for m in curve]


def write_table(csv_path: pathlib.Path, json_path: pathlib.Path,
                rows: Sequence[dict[str, Any]], provenance: dict[str, Any]) -> None:
    """Rewrite the table and its provenance atomically (a reader never sees half a file)."""
    for path in (csv_path, json_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)


def finished_runs(csv_path: pathlib.Path, json_path: pathlib.Path, settings: dict[str, Any],
                  grid: Iterable[SweepRun]) -> tuple[list[dict[str, Any]],
                                                     dict[tuple[str, int, float, float],
                                                          dict[str, Any]]]:
    """Rows and records of an earlier sweep's runs that belong to ``grid``.

    Raises:
        ValueError: the earlier sweep is unreadable or was measured with other settings.
    """
    if not csv_path.is_file() or not json_path.is_file():
        return [], {}
    old = json.loads(json_path.read_text(encoding="utf-8"))
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if old.get("settings") != settings:
        changed = sorted(k for k in settings if old.get("settings", {}).get(k) != settings[k])
        raise ValueError(f"{csv_path} was measured with other settings ({', '.join(changed)})")

    def key(r: dict[str, Any]) -> tuple[str, int, float, float]:
        return (r["preset"], int(r["batch_size"]), float(r["noise_batch_ratio"]),
                float(r["learning_rate"]))

    wanted = {run.key for run in grid}
    with_rows = {key(r) for r in rows}
    done = {key(r): r for r in old.get("runs", [])
            if key(r) in wanted and (key(r) in with_rows or r.get("diverged"))}
    return [r for r in rows if key(r) in done], done


def environment() -> dict[str, Any]:
    """Versions, platform and accelerators the sweep ran on."""
    import jax

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
