"""`dptrain run`, `dptrain train`, `dptrain prepare-data` and `dptrain audit memorization`.

Argument parsing and exit codes only: the work is the trainer's (``dptrain.trainer._entry``),
which raises typed errors that are mapped here (bad input → ``EXIT_INVALID``, SIGTERM →
``EXIT_INTERRUPTED``, a status that cannot be reported → ``EXIT_ERROR``, a dataset budget that
refuses the run → ``EXIT_BUDGET_EXHAUSTED``). JAX is imported inside the handlers only, so that
the rest of the CLI starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dptrain.api import InvalidJobError
from dptrain.cli._output import (
    EXIT_BUDGET_EXHAUSTED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    emit,
    fail,
)

if TYPE_CHECKING:
    from dptrain.trainer import LocalRun, RunOptions, RunOutcome

def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the trainer's commands (each with `--help` and `--json`)."""
    run = subparsers.add_parser(
        "run", parents=[common], help="run a DPTrainingJob on this machine",
        description="Prepare the data, plan, train with DP-SGD under the ε budget and write "
                    "report.json plus loss/ε plots. The job's secret key (batch sampling and "
                    "noise) is created once in OUTPUT/job.key (mode 0600) and reused on resume; "
                    "keep it private and keep it with the run. Exit 0 when the plan completes, 4 "
                    "when the budget stopped training early, 3 on bad input, 1 on other errors.")
    run.add_argument("file", type=pathlib.Path, metavar="FILE", help="DPTrainingJob manifest")
    run.add_argument("--output", type=pathlib.Path, default=None,
                     help="output directory (default: runs/<job name>)")
    run.add_argument("--dataset-ledger", type=pathlib.Path, default=None, metavar="PATH",
                     help="a local dataset ledger (JSON): a job with spec.data.datasetRef runs "
                          "only if the composition of every run charged to the dataset plus "
                          "this one fits its budget (the DPDataset comes from FILE or PATH); "
                          "exit 4 otherwise")
    _training_options(run)
    run.set_defaults(handler=_run)

    train = subparsers.add_parser(
        "train", parents=[common], help="train from a pod config (the container entrypoint)",
        description="Train the DPTrainingJob in FILE (a manifest whose status.plan, when present, "
                    "is followed as is). Reports through DPTRAIN_REPORT (file|kubernetes); joins "
                    "a multi-host job from JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/"
                    "JAX_PROCESS_ID.")
    train.add_argument("--config", type=pathlib.Path, required=True, metavar="FILE",
                       help="DPTrainingJob manifest (JSON or YAML)")
    train.add_argument("--output", type=pathlib.Path, default=None,
                       help="output directory (default: the checkpoint path)")
    train.add_argument("--key-file", type=pathlib.Path, default=None, metavar="FILE",
                       help="the job's secret key, mounted from its Secret by the operator (must "
                            "exist); default: OUTPUT/job.key, created on a fresh run")
    _training_options(train)
    train.set_defaults(handler=_train)

    prepare = subparsers.add_parser(
        "prepare-data", parents=[common], help="tokenize and pack documents into sequences",
        description="Read documents (JSONL, text files or a built-in corpus), tokenize, pack/"
                    "split them into fixed-length sequences and store them memory-mapped with a "
                    "manifest (N, length, tokenizer, checksum).")
    source = prepare.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=pathlib.Path, metavar="FILE",
                        help="take spec.data from this DPTrainingJob manifest")
    source.add_argument("--input", type=pathlib.Path, help="file or directory of documents")
    source.add_argument("--builtin", choices=["stdlib-docs"], help="a corpus shipped with dptrain")
    prepare.add_argument("--output", type=pathlib.Path, required=True, help="output directory")
    prepare.add_argument("--format", choices=["jsonl", "text"], default="jsonl")
    prepare.add_argument("--text-field", default="text", help="JSONL key of the text")
    prepare.add_argument("--tokenizer", choices=["byte", "sentencepiece"], default="byte")
    prepare.add_argument("--tokenizer-model", type=pathlib.Path, default=None)
    prepare.add_argument("--sequence-length", type=int, default=1024)
    prepare.add_argument("--canaries", type=int, default=0,
                         help="insert this many random canaries (memorization audits)")
    prepare.add_argument("--canary-repeats", type=int, default=10,
                         help="copies of each canary")
    prepare.add_argument("--report", choices=["none", "kubernetes"], default="none",
                         help="kubernetes: merge-patch status.dataset of DPTRAIN_JOB_NAME")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.set_defaults(handler=_prepare)

    audit = subparsers.add_parser(
        "audit", help="empirical privacy checks of a trained model",
        description="Empirical privacy checks of a trained model.")
    audits = audit.add_subparsers(dest="audit_command", metavar="CHECK")
    audits.required = True
    memo = audits.add_parser(
        "memorization", parents=[common], help="prefix→suffix memorization rates",
        description="Prompt with 50-token prefixes of training sequences (and of canaries, if "
                    "the data has them), greedy-decode 50 tokens and report exact and "
                    "approximate (edit distance ≤ 10%%) match rates with Clopper–Pearson "
                    "intervals.")
    memo.add_argument("--checkpoint", type=pathlib.Path, required=True, metavar="DIR",
                      help="checkpoint directory (or a run's output directory)")
    memo.add_argument("--samples", type=int, default=100, help="training sequences to test")
    memo.add_argument("--data", type=pathlib.Path, default=None,
                      help="prepared dataset (default: the one recorded in the checkpoint)")
    memo.add_argument("--seed", type=int, default=0)
    memo.set_defaults(handler=_audit_memorization)


def _training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on this port (default: 9100 in pods, "
                             "off locally; 0 disables)")
    parser.add_argument("--ledger-block", type=int, default=1,
                        help="steps reserved in the ledger at a time (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--export", choices=["huggingface"], default=None,
                        help="when the run ends with a final model (Succeeded or "
                             "BudgetExhausted), export it to CHECKPOINT_DIR/export (on a "
                             "cluster the operator's export Job does this)")


# ------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _typed_errors(*, bad_values: bool = False) -> Iterator[None]:
    """Map the trainer's typed errors to one-line messages and exit codes.

    ``bad_values``: any ``ValueError`` is bad input too (data preparation's readers raise it).
    """
    from dptrain.trainer import (
        AdaptersUnchangedError,
        DataError,
        InvalidInputError,
        LedgerError,
        StatusReportError,
        StorageError,
        TrainingInterruptedError,
    )
    try:
        yield
    except TrainingInterruptedError as error:
        fail(str(error), EXIT_INTERRUPTED)
    except (StatusReportError, StorageError, LedgerError, AdaptersUnchangedError) as error:
        # Object storage or a durable record failed, or the adapters never moved: an error
        # (retried), not bad input.
        fail(str(error), EXIT_ERROR)
    except (InvalidJobError, InvalidInputError, DataError, ValueError) as error:
        if not (bad_values or isinstance(error, (InvalidJobError, InvalidInputError, DataError))):
            raise
        lines = getattr(error, "lines", None) or [str(error)]
        fail("; ".join(lines), EXIT_INVALID)


def _options(args: argparse.Namespace) -> RunOptions:
    from dptrain.trainer import RunOptions
    return RunOptions(metrics_port=args.metrics_port, ledger_block=args.ledger_block,
                      progress=not args.no_progress and not args.json, export=args.export)


def _human(result: dict[str, Any]) -> str:
    def num(value: Any, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)
    return (f"{result['end_state']}: {result['steps']} steps, ε = "
            f"{num(result['epsilon_spent'], '.4g')} of {result['epsilon_budget']:g} "
            f"(δ = {result['delta']:g}); loss {num(result['initial_loss'], '.4f')} → "
            f"{num(result['final_loss'], '.4f')}; {num(result['tokens_per_second'], ',.0f')} "
            f"tokens/s\nreport: {result.get('report')}" + _human_extras(result))


def _human_extras(result: dict[str, Any]) -> str:
    lines = ""
    evaluation = result.get("evaluation")
    if evaluation:
        lines += (f"\nheld-out loss {evaluation['loss']:.4f}, perplexity "
                  f"{evaluation['perplexity']:.4g} at step {evaluation['step']} "
                  "(not covered by ε: data not trained on)")
    artifacts = result.get("artifacts") or {}
    if artifacts.get("export"):
        lines += f"\nexport: {artifacts['export']}"
    elif artifacts.get("exportError"):
        lines += f"\nexport failed: {artifacts['exportError']}"
    return lines


def _emit_outcome(args: argparse.Namespace, outcome: RunOutcome) -> int:
    result = outcome.report or {"end_state": outcome.result.end_state}
    emit(args, {**result, "exit_code": outcome.exit_code}, _human)
    return outcome.exit_code


# ----------------------------------------------------------------------------------- handlers


def _run(args: argparse.Namespace) -> int:
    from dptrain.trainer import prepare_run, train_job
    options = _options(args)
    with _typed_errors():
        run = prepare_run(args.file, args.output, progress=options.progress)
        if args.dataset_ledger is None:
            outcome = train_job(run.job, run.plan, run.shape, run.dataset, run.output, options,
                                base_dir=run.base_dir)
        else:
            outcome = _run_on_dataset(run, args, options)
    return _emit_outcome(args, outcome)


def _run_on_dataset(run: LocalRun, args: argparse.Namespace, options: RunOptions) -> RunOutcome:
    """``--dataset-ledger``: admission on the dataset before training, the charge after."""
    from dptrain.api import DPDatasetSpec, load_manifests
    from dptrain.cli import _dataset_ledger
    from dptrain.trainer import train_job

    job, output = run.job, run.output
    ref = job.spec.data.dataset_ref
    if ref is None:
        fail("--dataset-ledger: the job has no spec.data.datasetRef", EXIT_INVALID)
    assert ref is not None
    manifest_spec = None
    for document in load_manifests(args.file.read_text()):
        if document.get("kind") == "DPDataset" and (
                document.get("metadata") or {}).get("name") == ref:
            manifest_spec = DPDatasetSpec.model_validate(document.get("spec") or {})
    # One charge per job and checkpoint directory: a resumed run updates it (its ledger count
    # is cumulative), a new job is a new charge.
    run_id = f"local:{job.metadata.name}:{output.resolve()}"
    try:
        admission = _dataset_ledger.admit(args.dataset_ledger, ref, manifest_spec, job.spec,
                                          run_id, job.metadata.name, run.plan)
    except _dataset_ledger.DatasetBudgetError as error:
        fail(str(error), EXIT_BUDGET_EXHAUSTED)
    if not args.json:
        print(f"DPDataset {ref}: admitted; composed ε {admission.composed:.4g} of "
              f"{admission.budget:g}", flush=True)
    try:
        return train_job(job, run.plan, run.shape, run.dataset, output, options,
                         base_dir=run.base_dir)
    finally:
        ledger = output / "checkpoints" / "ledger.json"
        candidates = [output / "report.json", ledger]
        steps = 0
        for path in candidates:
            if path.is_file():
                record = json.loads(path.read_text())
                steps = max(steps, int(record.get("steps_charged") or 0))
        _dataset_ledger.record(args.dataset_ledger, ref, run_id, steps)


def _train(args: argparse.Namespace) -> int:
    from dptrain.trainer import train_pod
    with _typed_errors():
        outcome = train_pod(args.config, args.output, _options(args), key_file=args.key_file)
    return _emit_outcome(args, outcome)


def _prepare(args: argparse.Namespace) -> int:
    from dptrain.trainer import PrepareRequest, prepare_data
    request = PrepareRequest(
        output=args.output, config=args.config, input=args.input, builtin=bool(args.builtin),
        fmt=args.format, text_field=args.text_field, tokenizer=args.tokenizer,
        tokenizer_model=args.tokenizer_model, sequence_length=args.sequence_length,
        canaries=args.canaries, canary_repeats=args.canary_repeats,
        report_status=args.report == "kubernetes",
        progress=not args.no_progress and not args.json)
    with _typed_errors(bad_values=True):
        result = prepare_data(request)
    emit(args, result, lambda r: (f"{r['num_sequences']} sequences of {r['sequence_length']} "
                                  f"tokens from {r['num_documents']} documents → "
                                  f"{r['location']}"))
    return 0


def _audit_memorization(args: argparse.Namespace) -> int:
    from dptrain.trainer import audit_checkpoint
    from dptrain.trainer._audit import default_checkpoint_dir
    directory = default_checkpoint_dir(args.checkpoint)
    if not directory.is_dir():
        fail(f"--checkpoint: no such directory: {args.checkpoint}", EXIT_INVALID)
    if args.samples < 1:
        fail(f"--samples: must be ≥ 1 (got {args.samples})", EXIT_INVALID)
    try:
        result = audit_checkpoint(directory, samples=args.samples, data_dir=args.data,
                                  seed=args.seed)
    except FileNotFoundError as error:
        fail(f"--checkpoint: {error}", EXIT_INVALID)
    except ValueError as error:
        fail(str(error), EXIT_INVALID)

    def human(r: dict[str, Any]) -> str:
        lines = [f"step {r['step']}: {r['samples']} training prefixes"]
        groups = [("training", r)] + ([("canaries", r["canaries"])] if "canaries" in r else [])
        for name, g in groups:
            lo, hi = g["exact_match_interval"]
            alo, ahi = g["approximate_match_interval"]
            lines.append(f"{name}: exact {g['exact_match_rate']:.3f} [{lo:.3f}, {hi:.3f}], "
                         f"approximate {g['approximate_match_rate']:.3f} [{alo:.3f}, {ahi:.3f}] "
                         f"(n={g['samples']})")
        if "canaries" in r:
            lines.append(f"note: {r['canaries']['repetition_note']}")
        lines.append(f"note: {r['privacy_note']}")
        return "\n".join(lines)

    emit(args, result, human)
    return 0
