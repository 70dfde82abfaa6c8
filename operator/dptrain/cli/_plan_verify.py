"""`dptrain plan --verify K`: train the planner's top candidates and check its predictions.

The plan's pick, its next K − 1 runners-up and perturbations of the pick at equal compute
(B × and ÷ 2, 4 and 8 with T the other way, and the neighbouring model sizes with T scaled to
keep 6·M·B·S·T) are each trained, at the table's best learning rate for its own (σ̄, T), with
the real DP-SGD step (the sweep's harness,
:func:`dptrain.trainer._sweep.train_and_evaluate`) at the noise multiplier their (q, T) needs for
the job's ε, and their held-out loss is compared with the loss model's prediction.

Only public data may be verified: the runs publish un-noised per-step losses and claim no privacy
(like a sweep). The built-in corpus is public; a local ``spec.data.path`` must be declared public
with ``--public-data``; anything else is refused.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

from dptrain.cli._output import EXIT_INVALID, fail

VERIFY_HELDOUT_ROWS = 256
VERIFY_EVAL_POINTS = 6


@dataclasses.dataclass(frozen=True)
class VerifyCandidate:
    """One configuration to train."""

    label: str
    preset: str
    model_params: int
    batch_size: int
    iterations: int
    noise_multiplier: float
    predicted_loss: float | None
    learning_rate: float


def check_public(spec: Any, public_data: bool) -> None:
    """Refuse data that is not known to be public (exit 3 naming the field)."""
    data = spec.data
    if data.builtin is not None:
        return
    if data.path is None or data.volume is not None or data.format == "prepared":
        fail("spec.data: --verify trains on the job's data and publishes un-noised losses, so "
             "it needs a public local corpus (spec.data.builtin, or spec.data.path with "
             "--public-data)", EXIT_INVALID)
    if not public_data:
        fail("spec.data.path: --verify publishes un-noised losses of the data it trains on; "
             "pass --public-data to declare it public (private data is refused)", EXIT_INVALID)


def candidates(plan: Any, k: int, spec: Any, loss_model: Any) -> list[VerifyCandidate]:
    """The pick, K − 1 runners-up and the perturbations (deduplicated), σ calibrated for ε."""
    import numpy as np

    from dptrain.planner import get_preset, scaled_shape
    from dptrain.privacy import calibrate_noise_multiplier

    n = plan.dataset_size
    wanted: list[tuple[str, str, int, int, int]] = [
        ("pick", plan.model_shape.name, plan.model_params, plan.batch_size, plan.iterations)]
    b, t, m = plan.batch_size, plan.iterations, plan.model_params
    # ×2 and ×4 each way bracket the pick; ×8 cost the most (8× the steps at B÷8) and never won.
    for f in (4, 2):
        if f * b <= n and t >= f:
            wanted.append((f"B×{f}, T÷{f}", plan.model_shape.name, m, f * b, t // f))
        if b >= f:
            wanted.append((f"B÷{f}, T×{f}", plan.model_shape.name, m, b // f, f * t))
    for factor in (4.0, 0.25):  # the neighbouring model sizes, at equal compute
        other = scaled_shape(plan.model_shape.non_embedding_params * factor)
        if other.param_count != m:
            steps = max(1, round(t * m / other.param_count))
            wanted.append((f"model {other.name}", other.name, other.param_count, b, steps))
    # K − 1 runners-up that are not already a perturbation.
    taken = {(w[2], w[3], w[4]) for w in wanted}
    ups = [c for c in plan.near_optimal
           if (c.model_params, c.batch_size, c.iterations) not in taken][:max(0, k - 1)]
    wanted[1:1] = [(f"runner-up {i + 1}", c.model_preset, c.model_params, c.batch_size,
                    c.iterations) for i, c in enumerate(ups)]
    seen: set[tuple[int, int, int]] = set()
    out: list[VerifyCandidate] = []
    for label, preset, params, batch, steps in wanted:
        if (params, batch, steps) in seen:
            continue
        seen.add((params, batch, steps))
        if preset != plan.model_shape.name:
            get_preset(preset)  # every candidate is a buildable shape
        sigma = (plan.noise_multiplier if label == "pick" else calibrate_noise_multiplier(
            epsilon=spec.privacy.epsilon, delta=spec.privacy.delta, sampling_rate=batch / n,
            steps=steps, accountant=spec.privacy.accountant, dataset_size=n,
            physical_batch_size=n))
        predicted = (None if plan.loss_source == "paper" else float(loss_model.predict(
            np.array(params), np.array(steps), np.array(sigma / batch))))
        # Each candidate at its own best learning rate (the table's, for its σ̄ and T), as the
        # planner would give it: the pick is compared with alternatives at their best.
        lr = (plan.learning_rate if label == "pick" or spec.training.learning_rate is not None
              else loss_model.learning_rate(params, sigma / batch, steps) or plan.learning_rate)
        out.append(VerifyCandidate(label, preset, params, batch, steps, float(sigma), predicted,
                                   float(lr)))
    return out


def verify(plan: Any, spec: Any, k: int, *, loss_model: Any, public_data: bool,
           data_dir: pathlib.Path | None, progress: bool) -> dict[str, Any]:
    """Train every candidate; return predicted vs realised held-out loss per candidate."""
    check_public(spec, public_data)
    from dptrain.planner import default_cache_dir
    from dptrain.planner._sweep_table import SweepSettings, eval_steps
    from dptrain.trainer import make_tokenizer, prepare_or_reuse, shape_for, source_from_spec
    from dptrain.trainer._sweep import train_and_evaluate

    data = spec.data
    tokenizer = make_tokenizer(data.tokenizer, data.tokenizer_model)
    source = source_from_spec(path=data.path, builtin=data.builtin, fmt=data.format,
                              text_field=data.text_field)
    directory = data_dir or (default_cache_dir() / "sweep-data"
                             / f"{source.name.replace('/', '_')}-L{data.sequence_length}")
    dataset = prepare_or_reuse(source, tokenizer, sequence_length=data.sequence_length,
                               out_dir=directory, progress=progress)
    heldout = min(VERIFY_HELDOUT_ROWS, max(1, dataset.num_sequences // 10))
    if plan.dataset_size > dataset.num_sequences - heldout:
        fail(f"spec.data.numSequences: the plan assumes N = {plan.dataset_size} sequences but "
             f"the data has {dataset.num_sequences - heldout} besides the {heldout} held out",
             EXIT_INVALID)
    rows = []
    for cand in candidates(plan, k, spec, loss_model):
        shape = shape_for(cand.preset, vocab_size=tokenizer.vocab_size)
        settings = SweepSettings(
            steps=cand.iterations, sequence_length=data.sequence_length,
            eval_steps=eval_steps(cand.iterations, points=VERIFY_EVAL_POINTS, every=None),
            heldout_rows=heldout, clip_norm=plan.clip_norm, optimizer=spec.training.optimizer,
            weight_decay=spec.training.weight_decay,
            warmup_steps=round(0.05 * cand.iterations), microbatch_size=None,
            physical_batch_size=None, seed=0)
        curve, diverged, step_s = train_and_evaluate(
            dataset, shape, batch_size=cand.batch_size, steps=cand.iterations,
            sigma=cand.noise_multiplier, learning_rate=cand.learning_rate, settings=settings,
            train_rows=plan.dataset_size)
        realised = None if diverged or not curve else curve[-1].heldout_loss
        rows.append({**dataclasses.asdict(cand), "realised_loss": realised,
                     "wall_seconds": curve[-1].seconds if curve else None,
                     "step_seconds": None if math.isnan(step_s) else step_s,
                     "relative_error": (None if realised is None or cand.predicted_loss is None
                                        else cand.predicted_loss / realised - 1)})
    done = [r for r in rows if r["realised_loss"] is not None]
    best = min(done, key=lambda r: r["realised_loss"]) if done else None
    pick = rows[0]
    return {"candidates": rows, "dataset_sequences": dataset.num_sequences,
            "heldout_rows": heldout,
            "best": best["label"] if best else None,
            "pick_gap": (None if best is None or pick["realised_loss"] is None
                         else pick["realised_loss"] / best["realised_loss"] - 1),
            "note": "σ for each candidate is calibrated for the job's ε at its (q, T); the runs "
                    "account no privacy and publish un-noised losses (public data only)"}


def human(v: dict[str, Any]) -> list[str]:
    """Lines for the plan's human output."""
    lines = ["", "Verification (trained at equal compute and ε; held-out loss):",
             f"  {'candidate':<22}{'model':<13}{'B':>7}{'T':>8}{'σ':>8}{'predicted':>11}"
             f"{'realised':>10}{'error':>8}{'wall':>8}"]
    for r in v["candidates"]:
        pred = "n/a" if r["predicted_loss"] is None else f"{r['predicted_loss']:.4f}"
        real = "diverged" if r["realised_loss"] is None else f"{r['realised_loss']:.4f}"
        err = "" if r["relative_error"] is None else f"{r['relative_error']:+.1%}"
        wall = "" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f} s"
        lines.append(f"  {r['label']:<22}{r['preset']:<13}{r['batch_size']:>7}"
                     f"{r['iterations']:>8}{r['noise_multiplier']:>8.3g}{pred:>11}{real:>10}"
                     f"{err:>8}{wall:>8}")
    if v["pick_gap"] is not None:
        lines.append(f"  best realised: {v['best']}; the pick is {v['pick_gap']:+.1%} from it")
    return lines


def plot(v: dict[str, Any], path: str) -> None:
    """Predicted vs realised held-out loss, one point per candidate (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    pts = [r for r in v["candidates"]
           if r["realised_loss"] is not None and r["predicted_loss"] is not None]
    for r in pts:
        ax.scatter(r["predicted_loss"], r["realised_loss"],
                   marker="*" if r["label"] == "pick" else "o", s=160 if r["label"] == "pick"
                   else 50)
        ax.annotate(r["label"], (r["predicted_loss"], r["realised_loss"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    if pts:
        lo = min(min(r["predicted_loss"], r["realised_loss"]) for r in pts)
        hi = max(max(r["predicted_loss"], r["realised_loss"]) for r in pts)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="predicted = realised")
        ax.legend(fontsize=8)
    ax.set_xlabel("predicted loss (nats/token)")
    ax.set_ylabel("realised held-out loss (nats/token)")
    ax.set_title("dptrain plan --verify")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
