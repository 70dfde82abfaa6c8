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
                 "noise_multiplier", "batch_size", "sequence_length", "seed")
PHYSICAL_STD_DEVS = 3.0
"""Rows per step = B + 3 standard deviations of the Poisson batch size. A truncated batch (rare,
by a few rows) changes the measured loss negligibly, and every padding row costs compute; jobs use
the accountant's truncation-safe size instead, but a sweep claims no privacy."""
LOSS_NOTE = ("training loss: the mean over the Poisson-sampled sequences of the log_every steps "
             "ending at `step` of each sequence's mean next-token cross-entropy (nats/token), "
             "each computed before its step's update")
SCHEDULE_NOTE = "linear warm-up, cosine decay to 10% of the peak over --steps (as jobs)"


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One grid point."""

    preset: str
    ratio: float
    learning_rate: float

    @property
    def key(self) -> tuple[str, float, float]:
        """(preset, σ̄, learning rate)."""
        return (self.preset, self.ratio, self.learning_rate)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepSettings:
    """What every run of a sweep shares (a resumed sweep must match it exactly)."""

    steps: int
    batch_size: int
    physical_batch_size: int
    sequence_length: int
    log_every: int
    clip_norm: float
    optimizer: str
    weight_decay: float
    warmup_steps: int
    microbatch_size: int | None
    seed: int

    def to_dict(self, dataset: Any) -> dict[str, Any]:
        """JSON form, with the data it was measured on."""
        return {**dataclasses.asdict(self), "schedule": SCHEDULE_NOTE,
                "dataset_checksum": dataset.manifest.source_checksum,
                "tokenizer": dataset.manifest.tokenizer}


def physical_batch_size(batch: int, dataset_size: int, *, devices: int,
                        microbatch: int | None, override: int | None = None) -> int:
    """Rows per step: ``override`` or B + 3 std, rounded up to fill every device's microbatches."""
    q = batch / dataset_size
    rows = override or math.ceil(batch + PHYSICAL_STD_DEVS * math.sqrt(batch * (1 - q)))
    unit = devices * (microbatch or 1)
    return -(-rows // unit) * unit


class SweepTrainer:
    """Trains grid points one after another.

    The compiled step of the current (preset, learning rate) is kept: σ is an argument of the
    step, so every σ̄ of that pair reuses it.
    """

    def __init__(self, dataset: Any, settings: SweepSettings) -> None:
        self.dataset, self.settings = dataset, settings
        self._cached: tuple[tuple[str, float], Any] | None = None

    def _compiled(self, shape: Any, learning_rate: float) -> Any:
        import equinox as eqx
        import jax

        from dptrain.trainer import (
            DpSgdConfig,
            build_model,
            make_dp_step,
            make_mesh,
            make_optimizer,
            model_loss_fn,
        )
        key = (shape.name, learning_rate)
        if self._cached is None or self._cached[0] != key:
            s, pad = self.settings, self.dataset.tokenizer.pad_id
            optimizer = make_optimizer(s.optimizer, learning_rate=learning_rate,
                                       total_steps=s.steps, warmup_steps=s.warmup_steps,
                                       weight_decay=s.weight_decay)
            _, static = eqx.partition(build_model(shape, key=jax.random.key(0)), eqx.is_array)
            mesh = make_mesh()
            step = make_dp_step(model_loss_fn(static, pad), optimizer,
                                DpSgdConfig(clip_norm=s.clip_norm,
                                            expected_batch_size=float(s.batch_size),
                                            microbatch_size=s.microbatch_size, pad_id=pad),
                                mesh)
            self._cached = (key, (step, optimizer, mesh))
        return self._cached[1]

    def run(self, shape: Any, run: SweepRun) -> tuple[dict[str, Any], list[tuple[int, float]]]:
        """Train one grid point; returns its record and its (step, mean loss) curve.

        A run whose loss turns non-finite stops there and returns no curve (the planner takes
        the minimum over learning rates, so a diverged learning rate simply drops out).
        """
        import equinox as eqx
        import jax
        import numpy as np
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from dptrain.trainer import PoissonSampler, build_model

        s, dataset = self.settings, self.dataset
        started = time.perf_counter()
        step_fn, optimizer, mesh = self._compiled(shape, run.learning_rate)
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
        sampler = PoissonSampler(dataset_size=dataset.num_sequences,
                                 expected_batch_size=s.batch_size,
                                 physical_batch_size=s.physical_batch_size, key=public_key)
        sigma = np.float32(round_up_to_float32(run.ratio * s.batch_size))
        pad = dataset.tokenizer.pad_id
        curve: list[tuple[int, float]] = []
        window: list[Any] = []  # device scalars: no host sync until the window is logged
        diverged = False
        for step in range(s.steps):
            batch = sampler.sample(step)
            tokens = jax.device_put(dataset.gather(batch.indices, pad), by_rows)
            mask = jax.device_put(batch.mask, by_rows)
            params, opt_state, out = step_fn(params, opt_state, tokens, mask, root_key,
                                             np.int32(step), sigma)
            window.append((out.loss, out.real_rows))
            if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
                # Weighted by real rows: a (rare) empty Poisson batch reports loss 0.
                losses, real = np.asarray(jax.device_get(window), dtype=np.float64).T
                loss = float(np.sum(losses * real) / real.sum()) if real.sum() else math.nan
                window = []
                if not math.isfinite(loss):
                    diverged = True
                    break
                curve.append((step + 1, loss))
        record = {"preset": run.preset, "model_params": shape.param_count,
                  "noise_batch_ratio": run.ratio, "learning_rate": run.learning_rate,
                  "noise_multiplier": float(sigma), "steps": curve[-1][0] if curve else 0,
                  "final_loss": curve[-1][1] if curve else None, "diverged": diverged,
                  "seconds": round(time.perf_counter() - started, 2)}
        return record, ([] if diverged else curve)


def table_rows(params: int, run: SweepRun, curve: Iterable[tuple[int, float]],
               settings: SweepSettings) -> list[dict[str, Any]]:
    """The CSV rows of one run."""
    return [{"model_params": params, "noise_batch_ratio": repr(run.ratio),
             "learning_rate": repr(run.learning_rate), "step": step, "loss": f"{loss:.6f}",
             "preset": run.preset,
             "noise_multiplier": f"{run.ratio * settings.batch_size:.6g}",
             "batch_size": settings.batch_size, "sequence_length": settings.sequence_length,
             "seed": settings.seed} for step, loss in curve]


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
                                                     dict[tuple[str, float, float],
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

    def key(r: dict[str, Any]) -> tuple[str, float, float]:
        return (r["preset"], float(r["noise_batch_ratio"]), float(r["learning_rate"]))

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
