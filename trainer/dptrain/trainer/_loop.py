"""The training loop: resume, reserve steps in the ledger, train, checkpoint, stop on budget.

One run of :func:`train`:

1. builds the accountant's mechanism from the plan (``q = B/N``, σ, δ, the plan's physical batch)
   and its ε-curve; resumes the ledger from the largest record (ledger file, reporters,
   checkpoint, the caller's lower bound) and the parameters from the latest checkpoint;
2. repeats: choose a block of steps — no more than the ledger block, the steps left, the steps to
   the next checkpoint, and the steps the budget still allows; reserve them in the ledger
   (durably); run them; publish progress; checkpoint at the interval;
3. ends ``Succeeded`` after the planned steps, or ``BudgetExhausted`` when the next step would
   pass the budget (possible after restarts, which charge repeated steps again, or when the plan
   pins more steps than the budget allows), always with a final checkpoint.

Formal guarantees (the budget guard):
    1. No step starts unless the ledger already records it and ε of the recorded count is within
       the budget (``DurableLedger.reserve`` checks before writing; the loop runs only reserved
       steps).
    2. A run that stops for the budget has run every step the budget allowed: it stops only when
       ``ε(steps_charged + 1) > budget`` (the curve's exact ``max_steps_within``).
    3. A fresh run whose budget does not cover a single step fails before training (with a
       message naming ``spec.privacy.epsilon``) and charges nothing.
    4. Checkpoints are written only after the ledger counts every step they include.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from dptrain.api import FieldError, InvalidJobError
from dptrain.planner import ModelShape
from dptrain.privacy import DpSgdMechanism, EpsilonCurve, PrivacyLedger, epsilon
from dptrain.trainer._checkpoint import Checkpointer, shape_to_dict
from dptrain.trainer._config import TrainConfig
from dptrain.trainer._data import load_dataset
from dptrain.trainer._distributed import ProcessInfo
from dptrain.trainer._dpsgd import (
    DpSgdConfig,
    StepFn,
    make_dp_step,
    make_mesh,
    make_optimizer,
    model_loss_fn,
    replicate,
    shard_batch,
    to_host,
)
from dptrain.trainer._ledger import DurableLedger, LedgerFile, Progress, Reporter
from dptrain.trainer._metrics import TrainerMetrics
from dptrain.trainer._model import build_model
from dptrain.trainer._sampling import PoissonSampler

log = logging.getLogger(__name__)

SUCCEEDED = "Succeeded"
BUDGET_EXHAUSTED = "BudgetExhausted"
HISTORY_FILE = "metrics.jsonl"


class TrainingInterruptedError(RuntimeError):
    """Training was asked to stop (SIGTERM); the last checkpoint was saved."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
    """How a run ended.

    Attributes:
        end_state: ``Succeeded`` or ``BudgetExhausted``.
        step: steps included in the final parameters.
        steps_charged: the ledger's count.
        epsilon_spent: exact ε of ``steps_charged``.
        epsilon_budget: the budget.
        delta: δ.
        initial_loss: loss of the first step of the job (from the history).
        final_loss: mean loss over the last 10% of steps (at least one).
        tokens_per_second: training throughput of this run (compilation excluded).
        history: per-step records (``step``, ``loss``, ``epsilon``, ...).
        checkpoint_dir: where the final checkpoint lies.
    """

    end_state: str
    step: int
    steps_charged: int
    epsilon_spent: float
    epsilon_budget: float
    delta: float
    initial_loss: float | None
    final_loss: float | None
    tokens_per_second: float | None
    history: tuple[dict[str, Any], ...]
    checkpoint_dir: pathlib.Path

    @property
    def exit_code(self) -> int:
        """0 when Succeeded, 4 when BudgetExhausted."""
        return 0 if self.end_state == SUCCEEDED else 4


def mechanism_for(config: TrainConfig) -> DpSgdMechanism:
    """The accountant's view of ``config``: the same q, σ, δ and physical batch as the plan."""
    return DpSgdMechanism(sampling_rate=config.sampling_rate,
                          noise_multiplier=config.noise_multiplier, delta=config.delta,
                          accountant=config.accountant,  # type: ignore[arg-type]
                          dataset_size=config.dataset_size,
                          physical_batch_size=config.physical_batch_size)


def physical_rows(config: TrainConfig, devices: int) -> int:
    """The accountant's physical batch rounded up to fill every device's microbatches.

    Rounding up only lowers the chance of truncation, so the accountant's (smaller) batch stays a
    conservative description of the sampler.
    """
    unit = devices * (config.microbatch_size or 1)
    return -(-config.physical_batch_size // unit) * unit


@functools.lru_cache(maxsize=8)
def compiled_step(shape: ModelShape, optimizer: tuple[Any, ...], clip_norm: float,
                  expected_batch: float, microbatch: int | None, pad_id: int,
                  mesh: Mesh, clipping: str = "ghost") -> tuple[StepFn, Any, Any]:
    """The jitted DP step, optimizer and model skeleton for a configuration.

    Memoised, so that restarts within one process (and tests) compile once.
    """
    name, lr, total, warmup, decay = optimizer
    opt = make_optimizer(name, learning_rate=lr, total_steps=total, warmup_steps=warmup,
                         weight_decay=decay)
    _, static = eqx.partition(build_model(shape, key=jax.random.key(0)), eqx.is_array)
    step = make_dp_step(model_loss_fn(static, pad_id), opt,
                        DpSgdConfig(clip_norm=clip_norm, expected_batch_size=expected_batch,
                                    microbatch_size=microbatch, pad_id=pad_id,
                                    clipping=clipping), mesh)
    return step, opt, static


def _checkpoint_meta(config: TrainConfig, ledger: PrivacyLedger, checksum: str,
                     root_key: np.ndarray) -> dict[str, Any]:
    return {"job": config.job_name, "seed": config.seed, "root_key": root_key.tolist(),
            "ledger": ledger.to_dict(), "model_shape": shape_to_dict(config.shape),
            "dataset": {"checksum": checksum, "num_sequences": config.dataset_size,
                        "sequence_length": config.sequence_length, "dir": str(config.data_dir)},
            "plan": {"batch_size": config.batch_size, "iterations": config.iterations,
                     "noise_multiplier": config.noise_multiplier, "clip_norm": config.clip_norm,
                     "physical_batch_size": config.physical_batch_size,
                     "learning_rate": config.learning_rate, "optimizer": config.optimizer,
                     "epsilon_budget": config.epsilon_budget, "delta": config.delta,
                     "accountant": config.accountant}}


def _check_compatible(meta: dict[str, Any], expected: dict[str, Any], where: pathlib.Path) -> None:
    for key in ("seed", "model_shape", "plan"):
        if meta.get(key) != expected[key]:
            raise InvalidJobError([FieldError(
                "spec.checkpoint.path", f"the checkpoint in {where} belongs to another "
                f"configuration ({key} differs); use a fresh checkpoint directory")])
    if meta.get("dataset", {}).get("checksum") != expected["dataset"]["checksum"]:
        raise InvalidJobError([FieldError(
            "spec.checkpoint.path", f"the checkpoint in {where} was trained on other data "
            "(dataset checksum differs)")])


def _read_history(path: pathlib.Path, up_to_step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record["step"] <= up_to_step:
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def train(config: TrainConfig, *, reporters: Sequence[Reporter] = (),
          process: ProcessInfo | None = None, mesh: Mesh | None = None,
          stop: threading.Event | None = None) -> TrainResult:
    """Run (or resume) the job described by ``config``; see the module docstring.

    Raises:
        InvalidJobError: the budget does not cover one step, or the checkpoint directory holds
            another job's checkpoint.
        TrainingInterruptedError: ``stop`` was set; the last finished step was checkpointed.
    """
    process = process or ProcessInfo(process_id=0, num_processes=1)
    mesh = mesh or make_mesh()
    dataset = load_dataset(config.data_dir)
    tokenizer = dataset.tokenizer
    pad_id = tokenizer.pad_id
    rows = physical_rows(config, mesh.devices.size)
    sampler = PoissonSampler(dataset_size=config.dataset_size,
                             expected_batch_size=config.batch_size, physical_batch_size=rows,
                             seed=config.seed)

    mechanism = mechanism_for(config)
    ledger_file = LedgerFile(config.checkpoint_dir)
    start_count = max(config.initial_steps_charged, ledger_file.steps_charged())
    # The curve must reach the largest count this run can charge: restarts re-charge steps.
    curve = EpsilonCurve.build(mechanism, max(1, start_count + config.iterations),
                               anchors=(config.iterations,))
    ledger = DurableLedger(PrivacyLedger(mechanism=mechanism,
                                         epsilon_budget=config.epsilon_budget),
                           curve, ledger_file, reporters, writer=process.is_leader)

    optimizer_key = (config.optimizer, config.learning_rate, config.iterations,
                     config.warmup_steps, config.weight_decay)
    step_fn, optimizer, _ = compiled_step(
        config.shape, optimizer_key, config.clip_norm, float(config.batch_size),
        config.microbatch_size, pad_id, mesh, config.clipping)
    seed_key = jax.random.key(config.seed)
    root_key = np.asarray(jax.random.key_data(seed_key))
    params, _ = eqx.partition(build_model(config.shape, key=jax.random.fold_in(seed_key, 0)),
                              eqx.is_array)
    params = replicate(mesh, params)
    opt_state = replicate(mesh, optimizer.init(params))
    meta_template = _checkpoint_meta(config, ledger.state, dataset.manifest.source_checksum,
                                     root_key)

    checkpointer = Checkpointer(config.checkpoint_dir, keep=config.checkpoint_keep)
    step = 0
    checkpoint_count = 0
    if checkpointer.latest_step() is not None:
        restored = checkpointer.restore(params, opt_state)
        _check_compatible(restored.meta, meta_template, checkpointer.directory)
        params, opt_state, step = restored.params, restored.opt_state, restored.step
        checkpoint_count = int(restored.meta["ledger"]["steps_charged"])
    charged = ledger.resume(start_count, checkpoint_count)
    if charged == 0 and ledger.affordable(1) == 0:
        raise InvalidJobError([FieldError(
            "spec.privacy.epsilon", f"is too small for a single step: one step costs ε = "
            f"{curve.epsilon_at(1):.4g} > {config.epsilon_budget:g} (raise the budget, the "
            "noise multiplier or the dataset size)")])
    log.info("starting at step %d with %d steps charged", step, charged)

    history_path = config.output_dir / HISTORY_FILE
    history = _read_history(history_path, step)
    if process.is_leader:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        history_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    metrics = TrainerMetrics(config.job_name, config.metrics_port) if process.is_leader else None
    bar = tqdm(total=config.iterations, initial=step, unit="step", dynamic_ncols=True,
               disable=not (config.progress and process.is_leader), desc=config.job_name)
    tokens_done, seconds = 0.0, 0.0
    first_block = True
    sigma = np.float32(config.noise_multiplier)
    end_state = SUCCEEDED
    saved_step = step if checkpointer.latest_step() == step else -1

    def save() -> None:
        nonlocal saved_step
        meta = _checkpoint_meta(config, ledger.state, dataset.manifest.source_checksum, root_key)
        checkpointer.save(step, params, opt_state, meta)
        saved_step = step

    try:
        while step < config.iterations:
            to_checkpoint = config.checkpoint_interval - step % config.checkpoint_interval
            wanted = min(config.ledger_block, config.iterations - step, to_checkpoint)
            block = ledger.affordable(wanted)
            if block == 0:
                end_state = BUDGET_EXHAUSTED
                break
            ledger.reserve(block, Progress(steps_charged=ledger.steps_charged, step=step))
            started = time.perf_counter()
            losses, real_rows = [], 0.0
            for _ in range(block):
                batch = sampler.sample(step)
                tokens = dataset.gather(batch.indices, pad_id)
                sharded_tokens, sharded_mask = shard_batch(mesh, tokens, batch.mask)
                params, opt_state, out = step_fn(params, opt_state, sharded_tokens, sharded_mask,
                                                 root_key, np.int32(step), sigma)
                step += 1
                host = to_host(out)
                losses.append(float(host.loss))
                real_rows += float(host.real_rows)
                record = {"step": step, "steps_charged": ledger.steps_charged - block
                          + len(losses), "loss": float(host.loss),
                          "epsilon": ledger.epsilon_at(ledger.steps_charged - block
                                                       + len(losses)),
                          "real_rows": int(host.real_rows),
                          "clipped_fraction": float(host.clipped_fraction)}
                history.append(record)
                if process.is_leader:
                    with history_path.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
            elapsed = time.perf_counter() - started
            block_tokens = real_rows * (config.sequence_length - 1)
            if not first_block:  # the first block includes compilation
                tokens_done += block_tokens
                seconds += elapsed
            first_block = False
            tps = tokens_done / seconds if seconds > 0 else None
            eps = ledger.epsilon_spent()
            bar.update(block)
            bar.set_postfix_str(f"loss {losses[-1]:.3f}  ε {eps:.3f}/{config.epsilon_budget:g}"
                                + (f"  {tps:,.0f} tok/s" if tps else ""))
            ledger.report(Progress(steps_charged=ledger.steps_charged, step=step,
                                   loss=losses[-1], tokens_per_second=tps, epsilon_spent=eps))
            if metrics is not None:
                metrics.update(step=step, loss=losses[-1], epsilon_spent=eps,
                               epsilon_budget=config.epsilon_budget, tokens_per_second=tps,
                               new_steps=block)
            if step % config.checkpoint_interval == 0:
                save()
            if stop is not None and stop.is_set():
                if saved_step != step:
                    save()
                raise TrainingInterruptedError(f"stopped at step {step}; checkpoint saved")
        if saved_step != step:
            save()
    finally:
        bar.close()
        checkpointer.close()
        if metrics is not None:
            metrics.close()

    spent = epsilon(mechanism, ledger.steps_charged)
    ledger.report(Progress(steps_charged=ledger.steps_charged, step=step,
                           loss=history[-1]["loss"] if history else None,
                           tokens_per_second=tokens_done / seconds if seconds else None,
                           epsilon_spent=spent, end_state=end_state))
    tail = history[-max(1, len(history) // 10):]
    return TrainResult(
        end_state=end_state, step=step, steps_charged=ledger.steps_charged,
        epsilon_spent=spent, epsilon_budget=config.epsilon_budget, delta=config.delta,
        initial_loss=history[0]["loss"] if history else None,
        final_loss=float(np.mean([h["loss"] for h in tail])) if history else None,
        tokens_per_second=tokens_done / seconds if seconds else None, history=tuple(history),
        checkpoint_dir=config.checkpoint_dir)
