"""`dptrain run`, `dptrain train`, `dptrain prepare-data` and `dptrain audit memorization`.

JAX is imported inside the handlers only, so that the rest of the CLI starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import signal
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dptrain.api import DPTrainingJob, InvalidJobError, PlanStatus, load_job, parse_job
from dptrain.cli._output import EXIT_ERROR, EXIT_INVALID, emit, fail

if TYPE_CHECKING:
    from dptrain.trainer import PreparedDataset, TrainResult

DEFAULT_RUNS_DIR = "runs"


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


# ------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[threading.Event]:
    """An event set by SIGTERM (pod deletion): the loop checkpoints and stops."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _metrics_port(args: argparse.Namespace) -> int | None:
    if args.metrics_port is not None:
        return args.metrics_port or None
    return 9100 if os.environ.get("DPTRAIN_REPORT") == "kubernetes" else None


def _dataset_for(job: DPTrainingJob, *, base_dir: pathlib.Path, prepared_dir: pathlib.Path,
                 progress: bool) -> PreparedDataset:
    """The prepared dataset of ``job``: opened if prepared, else prepared (or reused)."""
    from dptrain.trainer import (
        load_dataset,
        make_tokenizer,
        prepare_or_reuse,
        source_from_spec,
    )
    data = job.spec.data
    if data.format == "prepared":
        if data.path is None:
            fail("spec.data.path: required when format is prepared", EXIT_INVALID)
        path = pathlib.Path(data.path)
        return load_dataset(path if path.is_absolute() else base_dir / path)
    location = (job.status.dataset.location if job.status and job.status.dataset else None)
    if location and (pathlib.Path(location) / "manifest.json").is_file():
        return load_dataset(location)
    source = source_from_spec(path=data.path, builtin=data.builtin, fmt=data.format,
                              text_field=data.text_field, base_dir=base_dir)
    model_path = None
    if data.tokenizer_model is not None:
        model_path = pathlib.Path(data.tokenizer_model)
        model_path = model_path if model_path.is_absolute() else base_dir / model_path
    elif data.tokenizer == "huggingface" and job.spec.model.pretrained is not None:
        model_path = pathlib.Path(job.spec.model.pretrained.path)  # the checkpoint's tokenizer
        model_path = model_path if model_path.is_absolute() else base_dir / model_path
    tokenizer = make_tokenizer(data.tokenizer, model_path)
    return prepare_or_reuse(source, tokenizer, sequence_length=data.sequence_length,
                            out_dir=prepared_dir, progress=progress)


def _plan(job: DPTrainingJob, dataset_size: int,
          base_dir: pathlib.Path | None = None) -> tuple[PlanStatus, Any]:
    from dptrain.planner import InfeasibleBudgetError, make_plan
    model = None
    if job.spec.model.pretrained is not None:  # the checkpoint fixes the model
        from dptrain.trainer import pretrained_model
        model = pretrained_model(job, base_dir=base_dir or pathlib.Path.cwd())[0]
    try:
        plan = make_plan(job.spec, dataset_size=dataset_size, model=model)
    except InfeasibleBudgetError as error:
        fail(str(error), EXIT_INVALID)
    return plan.to_status(), plan.model_shape


def _result_dict(result: TrainResult, report: dict[str, Any]) -> dict[str, Any]:
    return {**report, "exit_code": result.exit_code}


def _human(result: dict[str, Any]) -> str:
    def num(value: Any, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)
    return (f"{result['end_state']}: {result['steps']} steps, ε = "
            f"{num(result['epsilon_spent'], '.4g')} of {result['epsilon_budget']:g} "
            f"(δ = {result['delta']:g}); loss {num(result['initial_loss'], '.4f')} → "
            f"{num(result['final_loss'], '.4f')}; {num(result['tokens_per_second'], ',.0f')} "
            f"tokens/s\nreport: {result.get('report')}")


def _train_and_report(job: DPTrainingJob, plan: PlanStatus, shape: Any, dataset: PreparedDataset,
                      output: pathlib.Path, args: argparse.Namespace, *,
                      initial_steps_charged: int = 0, env_reporters: bool = False,
                      key_file: pathlib.Path | None = None) -> int:
    from dptrain.trainer import (
        FileReporter,
        ProcessInfo,
        TrainingInterruptedError,
        config_from_plan,
        initialize_from_env,
        reporters_from_env,
        train,
        write_report,
    )
    process = initialize_from_env() if env_reporters else ProcessInfo(process_id=0,
                                                                      num_processes=1)
    file = getattr(args, "file", None)
    config = config_from_plan(job, plan, dataset=dataset, output_dir=output, shape=shape,
                              base_dir=file.resolve().parent if file is not None else None,
                              metrics_port=_metrics_port(args) if process.is_leader else None,
                              progress=not args.no_progress and not args.json,
                              ledger_block=args.ledger_block,
                              initial_steps_charged=initial_steps_charged,
                              key_file=key_file, create_key=key_file is None)
    reporters = reporters_from_env(output) if env_reporters else [FileReporter(output)]
    with _stop_on_sigterm() as stop:
        try:
            result = train(config, reporters=reporters, process=process, stop=stop)
        except TrainingInterruptedError as error:
            fail(str(error), 143)
    report: dict[str, Any] = {}
    if process.is_leader:
        report = write_report(result, output, extra={
            "job": job.metadata.name, "plan": plan.model_dump(mode="json", by_alias=True),
            "report": str(output / "report.json")})
    emit(args, _result_dict(result, report or {"end_state": result.end_state}), _human)
    return result.exit_code


def _bad_input(error: Exception) -> None:
    lines = getattr(error, "lines", None) or [str(error)]
    fail("; ".join(lines), EXIT_INVALID)


# ----------------------------------------------------------------------------------- handlers


def _run(args: argparse.Namespace) -> int:
    from dptrain.trainer import DataError
    try:
        job = load_job(args.file)
    except FileNotFoundError:
        fail(f"{args.file}: no such file", EXIT_INVALID)
    except InvalidJobError as error:
        _bad_input(error)
    output = args.output or pathlib.Path(DEFAULT_RUNS_DIR) / job.metadata.name
    output.mkdir(parents=True, exist_ok=True)
    try:
        dataset = _dataset_for(job, base_dir=args.file.resolve().parent,
                               prepared_dir=output / "data",
                               progress=not args.no_progress and not args.json)
        plan, shape = _plan(job, dataset.num_sequences, args.file.resolve().parent)
        if args.dataset_ledger is None:
            return _train_and_report(job, plan, shape, dataset, output, args)
        return _run_on_dataset(job, plan, shape, dataset, output, args)
    except (InvalidJobError, DataError) as error:
        _bad_input(error)
    raise AssertionError("unreachable")


def _run_on_dataset(job: DPTrainingJob, plan: PlanStatus, shape: Any, dataset: PreparedDataset,
                    output: pathlib.Path, args: argparse.Namespace) -> int:
    """``--dataset-ledger``: admission on the dataset before training, the charge after."""
    import json

    from dptrain.api import DPDatasetSpec, load_manifests
    from dptrain.cli import _dataset_ledger

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
                                          run_id, job.metadata.name, plan)
    except _dataset_ledger.DatasetBudgetError as error:
        fail(str(error), 4)
    if not args.json:
        print(f"DPDataset {ref}: admitted; composed ε {admission.composed:.4g} of "
              f"{admission.budget:g}", flush=True)
    try:
        return _train_and_report(job, plan, shape, dataset, output, args)
    finally:
        ledger = output / "checkpoints" / "ledger.json"
        candidates = [output / "report.json", ledger]
        steps = 0
        for path in candidates:
            if path.is_file():
                record = json.loads(path.read_text())
                steps = max(steps, int(record.get("steps_charged") or 0))
        _dataset_ledger.record(args.dataset_ledger, ref, run_id, steps)


def _load_config(path: pathlib.Path) -> tuple[DPTrainingJob, int]:
    """The job in a pod config and the steps its status says were charged."""
    from dptrain.api import load_manifests
    try:
        documents = list(load_manifests(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        fail(f"{path}: no such file", EXIT_INVALID)
    if len(documents) != 1:
        fail(f"{path}: must hold exactly one DPTrainingJob", EXIT_INVALID)
    manifest = documents[0]
    status = manifest.get("status") or {}
    charged = max(int((status.get(part) or {}).get("stepsCharged") or 0)
                  for part in ("privacy", "progress"))
    return parse_job(manifest), charged


def _train(args: argparse.Namespace) -> int:
    from dptrain.trainer import DataError
    try:
        job, charged = _load_config(args.config)
        checkpoint = pathlib.Path(job.spec.checkpoint.path or "checkpoints")
        output = args.output or checkpoint
        output.mkdir(parents=True, exist_ok=True)
        dataset = _dataset_for(job, base_dir=pathlib.Path.cwd(),
                               prepared_dir=checkpoint / "prepared",
                               progress=not args.no_progress and not args.json)
        if job.status is not None and job.status.plan is not None:
            # Follow the operator's plan as is: its accounting must match ours.
            plan, shape = job.status.plan, None
        else:
            plan, shape = _plan(job, dataset.num_sequences)
        return _train_and_report(job, plan, shape, dataset, output, args,
                                 initial_steps_charged=charged, env_reporters=True,
                                 key_file=args.key_file)
    except (InvalidJobError, DataError) as error:
        _bad_input(error)
    raise AssertionError("unreachable")


def _prepare(args: argparse.Namespace) -> int:
    from dptrain.trainer import (
        BUILTIN_STDLIB_DOCS,
        DataError,
        KubernetesReporter,
        KubernetesTarget,
        make_canaries,
        make_tokenizer,
        prepare_dataset,
        source_from_spec,
    )
    progress = not args.no_progress and not args.json
    try:
        if args.config is not None:
            job, _ = _load_config(args.config)
            data = job.spec.data
            source = source_from_spec(path=data.path, builtin=data.builtin, fmt=data.format,
                                      text_field=data.text_field, base_dir=pathlib.Path.cwd())
            tokenizer = make_tokenizer(data.tokenizer, data.tokenizer_model)
            length = data.sequence_length
        else:
            source = source_from_spec(
                path=str(args.input) if args.input else None,
                builtin=BUILTIN_STDLIB_DOCS if args.builtin else None, fmt=args.format,
                text_field=args.text_field)
            tokenizer = make_tokenizer(args.tokenizer, args.tokenizer_model)
            length = args.sequence_length
        if not 16 <= length <= 32768:
            fail(f"--sequence-length: must be in [16, 32768] (got {length})", EXIT_INVALID)
        canaries = (make_canaries(tokenizer, count=args.canaries, length=min(length, 100))
                    if args.canaries > 0 else [])
        dataset = prepare_dataset(source, tokenizer, sequence_length=length,
                                  out_dir=args.output, canaries=canaries,
                                  canary_repeats=args.canary_repeats, progress=progress)
    except (DataError, ValueError) as error:
        _bad_input(error)
    manifest = dataset.manifest
    result = {"location": str(dataset.directory.resolve()), **manifest.to_dict()}
    result.pop("canaries")
    result["canaries"] = len(manifest.canaries)
    if args.report == "kubernetes":
        reporter = KubernetesReporter(KubernetesTarget.from_env())
        try:
            reporter.patch_status({"dataset": {"numSequences": manifest.num_sequences,
                                               "location": result["location"],
                                               "checksum": manifest.source_checksum}})
        except OSError as error:
            fail(f"cannot report status.dataset: {error}", EXIT_ERROR)
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
