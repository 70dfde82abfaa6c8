"""`dptrain plan`: the scaling-law planner from the command line (sweep: _sweep_commands)."""

from __future__ import annotations

import argparse
import math
import pathlib
from typing import Any

from dptrain.cli._output import EXIT_INVALID, emit, fail

DEFAULT_PLOT_EPSILONS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `plan`."""
    plan = subparsers.add_parser(
        "plan", parents=[common], help="choose model, batch, steps and noise for a job",
        description="Read a DPTrainingJob manifest and choose the model size, batch, number of "
                    "steps and noise multiplier that minimise predicted loss within its "
                    "compute, privacy and data budgets (DP scaling law, McKenna et al. 2025); "
                    "size the pods that run it.")
    plan.add_argument("file", metavar="FILE", help="DPTrainingJob manifest (YAML or JSON)")
    plan.add_argument("--dataset-size", type=int, metavar="N",
                      help="dataset size N in sequences (default: spec.data.numSequences)")
    plan.add_argument("--table", metavar="CSV",
                      help="results table for the loss model (default: the shipped table)")
    plan.add_argument("--cache-dir", metavar="DIR",
                      help="σ-table cache (default: $DPTRAIN_CACHE_DIR or ~/.cache/dptrain)")
    plan.add_argument("--plot", metavar="PNG",
                      help="write the privacy–utility–compute frontier to this PNG")
    plan.add_argument("--allow-extrapolation", action="store_true",
                      help="plan even when every affordable configuration rests on the loss "
                           "model far outside its measured data (default: refuse)")
    plan.add_argument("--verify", type=int, default=0, metavar="K",
                      help="train the top K candidates and perturbations of the pick (B×4, "
                           "B÷4, another model size) at the planned compute and ε, and print "
                           "predicted vs realised held-out loss (public data only)")
    plan.add_argument("--verify-plot", metavar="PNG",
                      help="with --verify: write predicted vs realised loss to this PNG")
    plan.add_argument("--public-data", action="store_true",
                      help="with --verify: declare a local spec.data.path public")
    plan.add_argument("--data-dir", type=pathlib.Path, default=None,
                      help="with --verify: where the prepared dataset is kept")
    plan.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    from dptrain.api import InvalidJobError, load_job, validate_job
    from dptrain.planner import InfeasibleBudgetError, make_plan

    try:
        job = load_job(args.file)
        validate_job(job)
    except InvalidJobError as error:
        fail("; ".join(error.lines), EXIT_INVALID)
    except OSError as error:
        fail(f"{args.file}: {error.strerror or error}")
    spec = job.spec
    n = args.dataset_size or spec.data.num_sequences
    if n is None:
        fail("spec.data.numSequences: required to plan without prepared data (or pass "
             "--dataset-size N)", EXIT_INVALID)
    if args.verify < 0:
        fail(f"--verify: must be >= 0, got {args.verify}", EXIT_INVALID)
    if args.verify:
        from dptrain.cli._plan_verify import check_public

        check_public(spec, args.public_data)  # refuse before any work
    model, fixed_by = None, None
    try:
        if spec.model.pretrained is not None:  # the checkpoint fixes the model (needs JAX)
            from dptrain.trainer import pretrained_model
            model, _, directory = pretrained_model(
                job, base_dir=pathlib.Path(args.file).resolve().parent)
            fixed_by = f"spec.model.pretrained ({directory})"
        plan = make_plan(spec, dataset_size=n, table=args.table, cache_dir=args.cache_dir,
                         allow_extrapolation=args.allow_extrapolation, model=model)
    except InvalidJobError as error:
        fail("; ".join(error.lines), EXIT_INVALID)
    except (InfeasibleBudgetError, ValueError, KeyError) as error:
        fail(str(error).strip("'\""), EXIT_INVALID)
    result = plan.to_dict()
    result["model_fixed_by"] = fixed_by
    if args.plot:
        _plot(args, spec, n, plan)
        result["plot"] = args.plot
    if args.verify:
        from dptrain.cli._plan_verify import plot, verify
        from dptrain.planner import TableLossModel, default_loss_model

        loss_model = TableLossModel.from_csv(args.table) if args.table else default_loss_model()
        result["verify"] = verify(plan, spec, args.verify, loss_model=loss_model,
                                  public_data=args.public_data, data_dir=args.data_dir,
                                  progress=not args.json)
        if args.verify_plot:
            plot(result["verify"], args.verify_plot)
            result["verify"]["plot"] = args.verify_plot
    emit(args, result, _human)
    return 0


def _human(r: dict[str, Any]) -> str:
    pod = r["pod"]
    lines = [
        f"Plan ({r['bound']}-bound): {r['model_preset']} ({r['model_params']:.3g} parameters)",
        *([f"  model fixed by {r['model_fixed_by']}: planned batch, iterations, σ and "
           "learning rate for it (no model-size search)"] if r.get("model_fixed_by") else []),
        f"  batch B = {r['batch_size']} (physical {r['physical_batch_size']}), "
        f"q = {r['sampling_rate']:.3g}, T = {r['iterations']} steps "
        f"(max within ε: {r['max_steps']})",
        f"  σ = {r['noise_multiplier']:.4g}, σ̄ = σ/B = {r['noise_batch_ratio']:.3g}, "
        f"ε planned = {r['epsilon_planned']:.4g} of {r['epsilon_budget']:g} "
        f"(δ = {r['delta']:g}, {r['accountant'].upper()})",
        f"  predicted loss {_num(r['predicted_loss'])}, compute {r['compute_flops']:.3g} FLOPs"
        + (f" of {r['compute_budget']:.3g}" if r["compute_budget"] else "")
        + f", learning rate {r['learning_rate']:g}",
        f"  pods: {pod['hosts']} × {pod['accelerator']}"
        + (f" ({pod['chips_per_host']} chips each" if pod["chips_per_host"] else " (")
        + (f", topology {pod['topology']}" if pod["topology"] else "")
        + f"), microbatch {pod['microbatch_size']} × {pod['accumulation_steps']} accumulation, "
        f"~{pod['memory']['total'] / 2**30:.2f} GiB per chip, "
        f"est. {_duration(pod['est_wall_seconds'])} at {pod['utilization']:.1%} utilisation",
        f"  rests on: {_SOURCES.get(r['loss_source'], r['loss_source'])}",
        f"  noise-batch ratio regime: {r['noise_regime']} — {r['noise_regime_guidance']}",
    ]
    rows = r["near_optimal"]
    if rows:
        lines.append("")
        lines.append("Runners-up (within 1% of the best predicted loss, or the next best; σ from "
                     "the σ table; wall time on these pods):")
        header = f"  {'model':<14}{'params':>10}{'batch':>9}{'steps':>10}{'σ':>9}{'σ̄':>10}" \
                 f"{'loss':>9}{'FLOPs':>10}{'wall':>10}{'util':>6}"
        lines.append(header)
        for c in rows:
            lines.append(f"  {c['model_preset']:<14}{c['model_params']:>10.3g}"
                         f"{c['batch_size']:>9}{c['iterations']:>10}"
                         f"{c['noise_multiplier']:>9.3g}{c['noise_batch_ratio']:>10.3g}"
                         f"{c['predicted_loss']:>9.4f}{c['compute_flops']:>10.3g}"
                         f"{_duration(c['wall_seconds']):>10}{_pct(c['utilization']):>6}")
    for warning in r["warnings"]:
        lines.append(f"warning: {warning}")
    if r.get("plot"):
        lines.append(f"frontier plot: {r['plot']}")
    if r.get("verify"):
        from dptrain.cli._plan_verify import human

        lines += human(r["verify"])
        if r["verify"].get("plot"):
            lines.append(f"verification plot: {r['verify']['plot']}")
    return "\n".join(lines)


_SOURCES = {"measured": "the measured loss table (see loss_model)",
            "paper": "the paper's published optima (McKenna et al. 2025, Table 2); no measured "
                     "data reaches this budget"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.3g} h"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _plot(args: argparse.Namespace, spec: Any, n: int, plan: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dptrain.planner import frontier

    base = plan.compute_budget or plan.compute_flops
    budgets = [base / 10.0, base, base * 10.0]
    points = frontier(spec, dataset_size=n, epsilons=list(DEFAULT_PLOT_EPSILONS),
                      compute_budgets=budgets, table=args.table, cache_dir=args.cache_dir)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for budget in budgets:
        xs = [p["epsilon"] for p in points if p["compute_budget"] == budget and p["loss"]]
        ys = [p["loss"] for p in points if p["compute_budget"] == budget and p["loss"]]
        ax.plot(xs, ys, marker="o", label=f"C = {budget:.2g} FLOPs")
    if plan.predicted_loss is not None and math.isfinite(plan.predicted_loss):
        ax.scatter([plan.epsilon_budget], [plan.predicted_loss], marker="*", s=250, c="red",
                   zorder=5, label=f"chosen: {plan.model_shape.name}, B={plan.batch_size}, "
                                   f"T={plan.iterations}")
    ax.set_xscale("log")
    ax.set_xlabel("privacy budget ε")
    ax.set_ylabel("predicted loss (nats/token)")
    ax.set_title(f"Privacy–utility–compute frontier (N = {n:.3g}, δ = {spec.privacy.delta:g})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)
