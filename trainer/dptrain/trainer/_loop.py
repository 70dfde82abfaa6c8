"""The training loop: resume, reserve steps in the ledger, train, checkpoint, stop on budget.

One run of :func:`train`:

1. takes the plan's mechanism and ε-curve (``dptrain.planner.mechanism_of`` and ``plan_curve``,
   the operator's own); resumes the ledger from the largest record (ledger file, reporters,
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
    5. Secret, fresh randomness: the batch and the noise of every step are derived from the
       job's secret key and the step's execution count (the ledger's count before it runs), so
       a step repeated after a restart gets an independent batch and noise, and a checkpoint
       made with another key is refused (its metadata holds only the key's fingerprint).
    6. By default the loop publishes only the DP loss estimate, ε and public quantities
       (steps, throughput of the physical batch); raw statistics of the sampled rows only with
       ``release_raw_statistics`` (an unaccounted release, labelled as such).
    7. Held-out evaluation (``config.evaluation``, every ``interval_steps`` and at the end)
       reads the parameters and the evaluation set only: it neither charges the ledger nor
       draws randomness, and its statistics (not covered by ε: the data is not trained on)
       are labelled as such (``dptrain.trainer._evaluation``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from dptrain.api import EXIT_BUDGET_EXHAUSTED, EXIT_OK, FieldError, InvalidJobError
from dptrain.planner import ModelShape, plan_curve
from dptrain.privacy import DpSgdMechanism, PrivacyLedger, round_up_to_float32
from dptrain.trainer._checkpoint import Checkpointer
from dptrain.trainer._config import TrainConfig
from dptrain.trainer._data import load_dataset
from dptrain.trainer._distributed import ProcessInfo
from dptrain.trainer._dpsgd import DpSgdConfig, StepFn, make_dp_step, model_loss_fn
from dptrain.trainer._evaluation import EVAL_HISTORY_FILE, Evaluator, evaluation_status
from dptrain.trainer._hf import load_pretrained
from dptrain.trainer._keys import (
    key_fingerprint,
    noise_key_data,
)
from dptrain.trainer._ledger import DurableLedger, LedgerFile, Progress, Reporter
from dptrain.trainer._lora import LoraConfig, add_adapters, check_moved, split
from dptrain.trainer._mesh import fill_devices, make_mesh, replicate, shard_batch, to_host
from dptrain.trainer._metrics import TrainerMetrics
from dptrain.trainer._model import Architecture, build_model
from dptrain.trainer._optimizer import make_optimizer
from dptrain.trainer._resume import (
    check_compatible,
    checkpoint_meta,
    job_key,
    read_history,
)
from dptrain.trainer._sampling import PoissonSampler

log = logging.getLogger(__name__)

SUCCEEDED = "Succeeded"
BUDGET_EXHAUSTED = "BudgetExhausted"
HISTORY_FILE = "metrics.jsonl"
UNACCOUNTED_RELEASE = ("raw statistics of the sampled training rows (loss, realised batch size, "
                       "clipped fraction, gradient norms) are published outside ε: "
                       "spec.monitoring.releaseRawStatistics is true")


class TrainingInterruptedError(RuntimeError):
    """Training was asked to stop (SIGTERM); the last checkpoint was saved."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
    """How a run ended.

    Attributes:
        end_state: ``Succeeded`` or ``BudgetExhausted``.
        step: steps included in the final parameters.
        steps_charged: the ledger's count.
        epsilon_spent: ε of ``steps_charged`` (the plan's curve: what the status reports).
        epsilon_budget: the budget.
        delta: δ.
        initial_loss: mean DP loss estimate over the first 5% of steps (at least one).
        final_loss: mean DP loss estimate over the last 10% of steps (at least one).
        tokens_per_second: throughput of the physical batch in this run (compilation excluded).
        history: per-step records (``step``, ``loss`` (the DP estimate), ``epsilon``, ...).
        checkpoint_dir: where the final checkpoint lies.
        raw_statistics_released: raw statistics were published (an unaccounted release).
        key_fingerprint: SHA-256 fingerprint of the job's secret key.
        evaluations: held-out evaluation records (``step``, ``loss``, ``perplexity``, ``rows``,
            ``tokens``, ``source``); not covered by ε.
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
    raw_statistics_released: bool = False
    key_fingerprint: str | None = None
    evaluations: tuple[dict[str, Any], ...] = ()

    @property
    def exit_code(self) -> int:
        """``EXIT_OK`` when Succeeded, ``EXIT_BUDGET_EXHAUSTED`` (4) when BudgetExhausted."""
        return EXIT_OK if self.end_state == SUCCEEDED else EXIT_BUDGET_EXHAUSTED


def mechanism_for(config: TrainConfig) -> DpSgdMechanism:
    """The accountant's view of ``config``: its plan's mechanism (``TrainConfig.mechanism``)."""
    return config.mechanism


def physical_rows(config: TrainConfig, devices: int) -> int:
    """The accountant's physical batch rounded up to fill every device's microbatches.

    Rounding up only lowers the chance of truncation, so the accountant's (smaller) batch stays a
    conservative description of the sampler.
    """
    return fill_devices(config.physical_batch_size, devices=devices,
                        microbatch=config.microbatch_size)


@functools.lru_cache(maxsize=8)
def compiled_step(shape: ModelShape, optimizer: tuple[Any, ...], clip_norm: float,
                  expected_batch: float, microbatch: int | None, pad_id: int,
                  mesh: Mesh, loss_bound: float = 16.0,
                  clipping: str = "ghost",
                  arch: Architecture | None = None, lora: LoraConfig | None = None,
                  precision: str = "fp32") -> tuple[StepFn, Any, Any]:
    """The jitted DP step, optimizer and model skeleton for a configuration.

    With ``lora`` the step trains the adapters only: it takes the base arrays as its ``frozen``
    argument. Memoised, so that restarts within one process (and tests) compile once.
    """
    name, lr, total, warmup, decay = optimizer
    opt = make_optimizer(name, learning_rate=lr, total_steps=total, warmup_steps=warmup,
                         weight_decay=decay)
    skeleton = build_model(shape, key=jax.random.key(0), arch=arch or Architecture())
    if lora is not None:
        skeleton = add_adapters(skeleton, lora, key=jax.random.key(0))
    static = split(skeleton)[2]
    step = make_dp_step(model_loss_fn(static, pad_id, precision), opt,
                        DpSgdConfig(clip_norm=clip_norm, expected_batch_size=expected_batch,
                                    microbatch_size=microbatch, pad_id=pad_id,
                                    loss_bound=loss_bound, clipping=clipping), mesh)
    return step, opt, static


def loss_bound_for(vocab_size: int) -> float:
    """The public bound of the per-example loss: twice the loss of a uniform guess."""
    return 2.0 * math.log(max(vocab_size, 2))


def mechanism_fingerprint(config: TrainConfig, *, rows: int, sigma: float,
                          checksum: str) -> dict[str, Any]:
    """``status.progress.mechanism``: the mechanism this trainer runs, as the operator checks it.

    ``sigma`` is the σ as used on the device (float32, rounded up) and ``rows`` the physical batch
    the sampler pads/truncates to.
    """
    return {"samplingRate": config.sampling_rate, "noiseMultiplier": float(sigma),
            "delta": config.delta, "datasetSize": config.dataset_size,
            "physicalBatchSize": rows, "clipNorm": config.clip_norm,
            "accountant": config.accountant, "datasetChecksum": checksum}


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
    mechanism = config.mechanism
    if config.checkpoint_uri is not None and process.num_processes > 1:
        raise InvalidJobError([FieldError(
            "spec.checkpoint.uri", "object-storage checkpoints are written by single-host jobs "
            "only (each host's orbax shards would need a shared commit); use a ReadWriteMany "
            "volume for multi-host jobs", config.checkpoint_uri)])
    ledger_file = LedgerFile(config.checkpoint_dir, remote=config.checkpoint_uri)
    start_count = max(config.initial_steps_charged, ledger_file.steps_charged())
    checkpointer = Checkpointer(config.checkpoint_dir, keep=config.checkpoint_keep,
                                remote=config.checkpoint_uri)
    try:
        # Resuming = this run's own records exist (a count from the operator alone is not a
        # local run to resume: its pods read the mounted key).
        key = job_key(config, resuming=ledger_file.steps_charged() > 0
                      or checkpointer.latest_step() is not None)
    except InvalidJobError:
        checkpointer.close()
        raise
    fingerprint = key_fingerprint(key)
    sampler = PoissonSampler(dataset_size=config.dataset_size,
                             expected_batch_size=config.batch_size, physical_batch_size=rows,
                             key=key)
    # The plan's curve: the operator reports ε spent with the same one. The ledger's budget
    # ceiling must reach the largest count this run can charge (restarts re-charge steps).
    curve = plan_curve(config.plan, config.delta)
    ledger = DurableLedger(PrivacyLedger(mechanism=mechanism,
                                         epsilon_budget=config.epsilon_budget),
                           curve, ledger_file, reporters, writer=process.is_leader,
                           horizon=max(1, start_count + config.iterations))

    optimizer_key = (config.optimizer, config.learning_rate, config.iterations,
                     config.warmup_steps, config.weight_decay)
    step_fn, optimizer, static = compiled_step(
        config.shape, optimizer_key, config.clip_norm, float(config.batch_size),
        config.microbatch_size, pad_id, mesh, loss_bound_for(config.shape.vocab_size),
        config.clipping, config.architecture, config.lora, config.precision)
    # The public seed initialises the model (or the adapters), and nothing else.
    seed_key = jax.random.key(config.seed)
    if config.pretrained_dir is not None:
        model = load_pretrained(config.pretrained_dir)[0]
    else:
        model = build_model(config.shape, key=jax.random.fold_in(seed_key, 0),
                            arch=config.architecture)
    if config.lora is not None:
        model = add_adapters(model, config.lora, key=jax.random.fold_in(seed_key, 1))
    # The trained arrays (every one, or the adapters) and the frozen base (LoRA; else None).
    params, frozen, _ = split(model)
    params = replicate(mesh, params)
    frozen = None if frozen is None else replicate(mesh, frozen)
    opt_state = replicate(mesh, optimizer.init(params))
    meta_template = checkpoint_meta(config, ledger.state, dataset.manifest.source_checksum,
                                     fingerprint)

    step = 0
    checkpoint_count = 0
    if checkpointer.latest_step() is not None:
        restored = checkpointer.restore(params, opt_state)
        check_compatible(restored.meta, meta_template,
                         checkpointer.remote.uri if checkpointer.remote else checkpointer.directory)
        params, opt_state, step = restored.params, restored.opt_state, restored.step
        checkpoint_count = int(restored.meta["ledger"]["steps_charged"])
    charged = ledger.resume(start_count, checkpoint_count)
    if process.num_processes > 1:
        # Batches and noise are keyed by the execution count: every process must start from
        # the same count (the largest any of them has seen), or their draws would differ.
        from jax.experimental import multihost_utils
        gathered = multihost_utils.process_allgather(np.asarray(charged, np.int64))
        charged = ledger.resume(int(np.max(gathered)))
    if charged == 0 and ledger.affordable(1) == 0:
        raise InvalidJobError([FieldError(
            "spec.privacy.epsilon", f"is too small for a single step: one step costs ε = "
            f"{curve.epsilon_at(1):.4g} > {config.epsilon_budget:g} (raise the budget, the "
            "noise multiplier or the dataset size)")])
    log.info("starting at step %d with %d steps charged", step, charged)

    history_path = config.output_dir / HISTORY_FILE
    remote = checkpointer.remote  # spec.checkpoint.uri: the history is kept beside it
    if remote is not None and process.is_leader and not history_path.is_file():
        published = remote.read_bytes(HISTORY_FILE)  # a fresh machine: the history so far
        if published is not None:
            config.output_dir.mkdir(parents=True, exist_ok=True)
            history_path.write_bytes(published)
    history = read_history(history_path, step)
    if process.is_leader:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        history_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    metrics = TrainerMetrics(config.job_name, config.metrics_port) if process.is_leader else None
    bar = tqdm(total=config.iterations, initial=step, unit="step", dynamic_ncols=True,
               disable=not (config.progress and process.is_leader), desc=config.job_name)
    tokens_done, seconds = 0.0, 0.0
    first_block = True
    # Rounded up, never down: float32 σ below the planned σ would add less noise than charged.
    sigma = np.float32(round_up_to_float32(config.noise_multiplier))
    mechanism_run = mechanism_fingerprint(config, rows=rows, sigma=float(sigma),
                                          checksum=dataset.manifest.source_checksum)
    raw = config.release_raw_statistics
    if raw:
        log.warning("unaccounted release: %s", UNACCOUNTED_RELEASE)
    end_state = SUCCEEDED
    saved_step = step if checkpointer.latest_step() == step else -1
    evaluator: Evaluator | None = None
    evaluations: list[dict[str, Any]] = []
    eval_path = config.output_dir / EVAL_HISTORY_FILE
    if config.evaluation is not None:
        evaluator = Evaluator(static, load_dataset(config.evaluation.data_dir),
                              max_rows=config.evaluation.max_rows, pad_id=pad_id, mesh=mesh,
                              source=config.evaluation.source)
        evaluations = read_history(eval_path, step)
        if process.is_leader:
            eval_path.write_text("".join(json.dumps(e) + "\n" for e in evaluations))
    last_eval: dict[str, Any] | None = evaluations[-1] if evaluations else None

    def evaluate() -> dict[str, Any] | None:
        """Evaluate the current parameters (no ledger, no randomness); the status record."""
        nonlocal last_eval
        if evaluator is None:
            return None
        if last_eval is None or last_eval["step"] != step:
            last_eval = evaluator(params, step, frozen)
            evaluations.append(last_eval)
            if process.is_leader:
                with eval_path.open("a") as handle:
                    handle.write(json.dumps(last_eval) + "\n")
            if metrics is not None:
                metrics.update_evaluation(loss=last_eval["loss"],
                                          perplexity=last_eval["perplexity"])
            log.info("step %d: held-out loss %.4f, perplexity %.4g (not covered by ε)", step,
                     last_eval["loss"], last_eval["perplexity"])
        return evaluation_status(last_eval)
    # LoRA: the adapters at this run's start (copied: the step donates its arguments), checked
    # once a step with a non-zero learning rate has run (warm-up starts at 0: step 1 then).
    start_step = step
    adapters_before = (None if config.lora is None
                       else jax.tree_util.tree_map(np.array, params.lora))
    first_moving_step = 1 if min(config.warmup_steps, config.iterations - 1) > 0 else 0

    def save() -> None:
        nonlocal saved_step
        meta = checkpoint_meta(config, ledger.state, dataset.manifest.source_checksum,
                                fingerprint)
        # Public: what export and generation need to decode the model's ids (no data, no key).
        meta["tokenizer"] = dict(dataset.manifest.tokenizer)
        checkpointer.save(step, params, opt_state, meta)
        saved_step = step
        if remote is not None and process.is_leader and history_path.is_file():
            remote.write_bytes(HISTORY_FILE, history_path.read_bytes())  # public: DP losses

    try:
        while step < config.iterations:
            to_checkpoint = config.checkpoint_interval - step % config.checkpoint_interval
            wanted = min(config.ledger_block, config.iterations - step, to_checkpoint)
            if config.evaluation is not None:  # blocks end at evaluation steps
                interval = config.evaluation.interval_steps
                wanted = min(wanted, interval - step % interval)
            block = ledger.affordable(wanted)
            if block == 0:
                end_state = BUDGET_EXHAUSTED
                break
            ledger.reserve(block, Progress(steps_charged=ledger.steps_charged, step=step,
                                           mechanism=mechanism_run))
            started = time.perf_counter()
            losses: list[float] = []
            raw_losses: list[float] = []
            first_execution = ledger.steps_charged - block
            for i in range(block):
                # The execution count, not the model step: a repeated step is a new draw.
                execution = first_execution + i
                batch = sampler.sample(execution)
                tokens = dataset.gather(batch.indices, pad_id)
                sharded_tokens, sharded_mask = shard_batch(mesh, tokens, batch.mask)
                params, opt_state, out = step_fn(params, opt_state, sharded_tokens, sharded_mask,
                                                 noise_key_data(key, execution), np.int32(step),
                                                 sigma, frozen)
                step += 1
                host = to_host(out)
                losses.append(float(host.dp_loss))
                record: dict[str, Any] = {
                    "step": step, "steps_charged": execution + 1, "loss": float(host.dp_loss),
                    "loss_estimate": "dp", "epsilon": ledger.epsilon_at(execution + 1)}
                if raw:
                    raw_losses.append(float(host.loss))
                    record.update(raw_loss=float(host.loss), real_rows=int(host.real_rows),
                                  clipped_fraction=float(host.clipped_fraction),
                                  mean_grad_norm=float(host.mean_grad_norm),
                                  unaccounted_release=True)
                history.append(record)
                if process.is_leader:
                    with history_path.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
            elapsed = time.perf_counter() - started
            if adapters_before is not None and step - 1 >= first_moving_step:
                # A known silent failure: adapters that never move return the base model.
                check_moved(adapters_before, params.lora, step=step - start_step)
                adapters_before = None
            # The physical batch (public), padding included: the realised size is private.
            block_tokens = float(block * rows * (config.sequence_length - 1))
            if not first_block:  # the first block includes compilation
                tokens_done += block_tokens
                seconds += elapsed
            first_block = False
            tps = tokens_done / seconds if seconds > 0 else None
            eps = ledger.epsilon_spent()
            # Every report carries the latest evaluation (a file reporter rewrites its file).
            evaluation = (evaluate() if config.evaluation is not None
                          and step % config.evaluation.interval_steps == 0
                          else evaluation_status(last_eval) if last_eval is not None else None)
            bar.update(block)
            bar.set_postfix_str(f"DP loss {losses[-1]:.3f}  ε {eps:.3f}/"
                                f"{config.epsilon_budget:g}"
                                + (f"  {tps:,.0f} tok/s" if tps else ""))
            ledger.report(Progress(steps_charged=ledger.steps_charged, step=step,
                                   loss=losses[-1], tokens_per_second=tps, epsilon_spent=eps,
                                   raw_loss=raw_losses[-1] if raw else None,
                                   unaccounted_release=UNACCOUNTED_RELEASE if raw else None,
                                   mechanism=mechanism_run, evaluation=evaluation))
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
        final_evaluation = evaluate()  # at the end, whatever the interval
    finally:
        bar.close()
        checkpointer.close()
        if metrics is not None:
            metrics.close()

    # The same "ε after t steps" as the progress bar, the history and the operator's status
    # (exact at the plan's grid points, maxSteps and iterations among them).
    spent = ledger.epsilon_at(ledger.steps_charged)
    ledger.report(Progress(steps_charged=ledger.steps_charged, step=step,
                           loss=history[-1]["loss"] if history else None,
                           tokens_per_second=tokens_done / seconds if seconds else None,
                           epsilon_spent=spent, end_state=end_state,
                           unaccounted_release=UNACCOUNTED_RELEASE if raw else None,
                           mechanism=mechanism_run, evaluation=final_evaluation))
    head = history[:max(1, len(history) // 20)]  # averages the estimate's noise
    tail = history[-max(1, len(history) // 10):]
    return TrainResult(
        end_state=end_state, step=step, steps_charged=ledger.steps_charged,
        epsilon_spent=spent, epsilon_budget=config.epsilon_budget, delta=config.delta,
        initial_loss=float(np.mean([h["loss"] for h in head])) if history else None,
        final_loss=float(np.mean([h["loss"] for h in tail])) if history else None,
        tokens_per_second=tokens_done / seconds if seconds else None, history=tuple(history),
        checkpoint_dir=config.checkpoint_dir, raw_statistics_released=raw,
        key_fingerprint=fingerprint, evaluations=tuple(evaluations))
