"""The trainer's entry points: a local run, a trainer pod, data preparation.

``dptrain run`` (:func:`prepare_run` then :func:`train_job`), ``dptrain train`` in a trainer pod
(:func:`train_pod`) and ``dptrain prepare-data`` (:func:`prepare_data`) resolve a job's dataset,
plan and reporters here and run the loop; they raise typed errors (:class:`InvalidInputError`,
:class:`StatusReportError`, ``TrainingInterruptedError``, ``InvalidJobError``, ``DataError``)
and the CLI only parses arguments and maps those errors to exit codes.

In a pod (the pod contract, ``dptrain.api._contract``) the trainer follows ``status.plan`` of its
config as is (re-planning would break the match with the operator's accounting), resumes from
the steps its config's status says were charged, reports through ``DPTRAIN_REPORT``, joins a
multi-host job from the JAX variables, and on SIGTERM saves a checkpoint and stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from dptrain.api import (
    ENV_REPORT,
    REPORT_KUBERNETES,
    TRAINER_METRICS_PORT,
    DPTrainingJob,
    PlanStatus,
    load_job,
    load_manifests,
    parse_job,
    steps_charged_of,
)
from dptrain.planner import InfeasibleBudgetError, ModelShape, make_plan
from dptrain.trainer._artifacts import StatusReportError, finish_artifacts
from dptrain.trainer._config import config_from_plan, pretrained_model
from dptrain.trainer._data import (
    ARRAY_NAME,
    BUILTIN_STDLIB_DOCS,
    MANIFEST_NAME,
    DataError,
    PreparedDataset,
    fetch_prepared,
    load_dataset,
    prepare_dataset,
    prepare_or_reuse,
    source_from_spec,
)
from dptrain.trainer._distributed import ProcessInfo, initialize_from_env
from dptrain.trainer._evaluation import (
    EVAL_DATA_DIR,
    data_source,
    evaluation_status,
    prepare_evaluation,
)
from dptrain.trainer._ledger import Progress
from dptrain.trainer._loop import TrainResult, train
from dptrain.trainer._report import write_report
from dptrain.trainer._reporters import (
    FileReporter,
    KubernetesReporter,
    KubernetesTarget,
    reporters_from_env,
)
from dptrain.trainer._storage import RemoteDir
from dptrain.trainer._tokenizer import make_tokenizer

DEFAULT_RUNS_DIR = "runs"
#: Where data preparation publishes the prepared sequences under ``spec.checkpoint.uri``.
PREPARED_DIR = "prepared"
MIN_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH = 16, 32768


class InvalidInputError(ValueError):
    """The job or an input is invalid; the message names the field (or flag) and the rule."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How a training run behaves (not what it trains).

    Attributes:
        metrics_port: Prometheus port; None: the default (:data:`TRAINER_METRICS_PORT` in a
            pod, off locally); 0: off.
        ledger_block: steps reserved in the ledger at a time.
        progress: show progress bars.
        export: ``huggingface``: export the final model to ``<checkpoint dir>/export`` when
            the run ends with its model final (Succeeded or BudgetExhausted); None: no export
            (in a cluster the operator's export Job does it, ``dptrain.api.export_command``).
    """

    metrics_port: int | None = None
    ledger_block: int = 1
    progress: bool = True
    export: str | None = None


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """A finished run: the loop's result and the report written (empty on other hosts)."""

    result: TrainResult
    report: dict[str, Any]

    @property
    def exit_code(self) -> int:
        """``EXIT_OK`` or ``EXIT_BUDGET_EXHAUSTED`` (the pod contract's codes)."""
        return self.result.exit_code


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
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


def metrics_port(requested: int | None, env: dict[str, str] | None = None) -> int | None:
    """The Prometheus port to serve (see :attr:`RunOptions.metrics_port`)."""
    if requested is not None:
        return requested or None
    env = dict(os.environ if env is None else env)
    return TRAINER_METRICS_PORT if env.get(ENV_REPORT) == REPORT_KUBERNETES else None


def dataset_for(job: DPTrainingJob, *, base_dir: pathlib.Path, prepared_dir: pathlib.Path,
                progress: bool) -> PreparedDataset:
    """The prepared dataset of ``job``: opened if prepared, else prepared (or reused).

    Raises:
        InvalidInputError: ``format: prepared`` without a path.
        DataError: the data cannot be read or prepared.
    """
    data = job.spec.data
    if data.format == "prepared" and data.uri is not None:
        return fetch_prepared(data.uri, prepared_dir)
    if data.format == "prepared":
        if data.path is None:
            raise InvalidInputError("spec.data.path: required when format is prepared")
        path = pathlib.Path(data.path)
        return load_dataset(path if path.is_absolute() else base_dir / path)
    location = (job.status.dataset.location if job.status and job.status.dataset else None)
    if location and "://" in location:  # data preparation published it beside the checkpoints
        try:
            return fetch_prepared(location, prepared_dir)
        except DataError:
            pass  # gone (a new bucket, kept steps pruned by hand): prepare again below
    elif location and (pathlib.Path(location) / "manifest.json").is_file():
        return load_dataset(location)
    source = data_source(job, base_dir)  # minus a held-out split, if any
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


def local_plan(job: DPTrainingJob, dataset_size: int,
               base_dir: pathlib.Path | None = None) -> tuple[PlanStatus, ModelShape]:
    """The planner's plan for ``job`` on N sequences (a local run plans for itself).

    A pretrained checkpoint (``spec.model.pretrained``, relative to ``base_dir``, default the
    working directory) fixes the model.

    Raises:
        InvalidInputError: no plan fits the budgets (the message names the field).
        InvalidJobError: the pretrained checkpoint cannot be read or represented.
    """
    model = None
    if job.spec.model.pretrained is not None:  # the checkpoint fixes the model
        model = pretrained_model(job, base_dir=base_dir or pathlib.Path.cwd())[0]
    try:
        plan = make_plan(job.spec, dataset_size=dataset_size, model=model)
    except InfeasibleBudgetError as error:
        raise InvalidInputError(str(error)) from None
    return plan.to_status(), plan.model_shape


@dataclasses.dataclass(frozen=True)
class LocalRun:
    """A local run, resolved: the job, its plan and model, its data and where it writes.

    ``base_dir``: the manifest's directory (relative paths in the job are resolved from it).
    """

    job: DPTrainingJob
    plan: PlanStatus
    shape: ModelShape
    dataset: PreparedDataset
    output: pathlib.Path
    base_dir: pathlib.Path


def prepare_run(file: pathlib.Path, output: pathlib.Path | None, *,
                progress: bool = True) -> LocalRun:
    """Load the manifest, prepare its data and plan it (``dptrain run`` before training).

    Raises:
        InvalidInputError: no such file, or no plan fits.
        InvalidJobError: the manifest is invalid.
        DataError: the data cannot be read or prepared.
    """
    try:
        job = load_job(file)
    except FileNotFoundError:
        raise InvalidInputError(f"{file}: no such file") from None
    out = output or pathlib.Path(DEFAULT_RUNS_DIR) / job.metadata.name
    out.mkdir(parents=True, exist_ok=True)
    base_dir = file.resolve().parent
    dataset = dataset_for(job, base_dir=base_dir, prepared_dir=out / "data", progress=progress)
    plan, shape = local_plan(job, dataset.num_sequences, base_dir)
    return LocalRun(job=job, plan=plan, shape=shape, dataset=dataset, output=out,
                    base_dir=base_dir)


def train_job(job: DPTrainingJob, plan: PlanStatus, shape: ModelShape | None,
              dataset: PreparedDataset, output: pathlib.Path, options: RunOptions, *,
              initial_steps_charged: int = 0, in_pod: bool = False,
              key_file: pathlib.Path | None = None,
              base_dir: pathlib.Path | None = None) -> RunOutcome:
    """Train ``plan`` for ``job`` and write the report (on the leading process).

    Args:
        job: the job.
        plan: the plan to carry out (the operator's in a pod).
        shape: the model (None: the plan's preset).
        dataset: the prepared data.
        output: where the report, plots, history (and locally the key) go.
        options: run behaviour.
        initial_steps_charged: a known lower bound of the ledger (the job's status).
        in_pod: report through ``DPTRAIN_REPORT`` and join a multi-host job from the
            environment (a pod); else report to ``progress.json`` as one process.
        key_file: the job's secret key (a pod: the mounted Secret); None: ``OUTPUT/job.key``,
            created on a fresh run.
        base_dir: resolves a relative ``spec.model.pretrained.path`` (a local run: the
            manifest's directory; None: the working directory).

    Raises:
        TrainingInterruptedError: SIGTERM; the last finished step was checkpointed.
        InvalidJobError: the plan does not fit the data or the budget, or a checkpoint
            belongs to another run.
    """
    process = initialize_from_env() if in_pod else ProcessInfo(process_id=0, num_processes=1)
    eval_dir = output / EVAL_DATA_DIR
    if process.num_processes > 1:  # the output may be a volume every host shares
        eval_dir = eval_dir / str(process.process_id)
    evaluation = prepare_evaluation(job, dataset.tokenizer,
                                    sequence_length=dataset.manifest.sequence_length,
                                    out_dir=eval_dir, base_dir=base_dir or pathlib.Path.cwd(),
                                    progress=options.progress)
    config = config_from_plan(
        job, plan, dataset=dataset, output_dir=output, shape=shape, base_dir=base_dir,
        metrics_port=metrics_port(options.metrics_port) if process.is_leader else None,
        progress=options.progress, ledger_block=options.ledger_block,
        initial_steps_charged=initial_steps_charged, key_file=key_file,
        create_key=key_file is None, evaluation=evaluation)
    reporters = reporters_from_env(output) if in_pod else [FileReporter(output)]
    with stop_on_sigterm() as stop:
        result = train(config, reporters=reporters, process=process, stop=stop)
    report: dict[str, Any] = {}
    if process.is_leader:
        artifacts = finish_artifacts(result, output, options.export)
        extra = {"job": job.metadata.name, "plan": plan.model_dump(mode="json", by_alias=True),
                 "report": str(output / "report.json"), "artifacts": artifacts}
        if job.spec.checkpoint.uri is not None:
            extra["checkpoint_uri"] = job.spec.checkpoint.uri
        report = write_report(result, output, extra=extra)
        if job.spec.checkpoint.uri is not None:  # the pod's scratch goes; the bucket stays
            RemoteDir(job.spec.checkpoint.uri, field="spec.checkpoint.uri").publish(
                output, ("report.json", "loss.png", "epsilon.png"))
        if in_pod or options.export:
            # Where the outputs lie (a file reporter rewrites progress.json: keep the rest).
            final = Progress(steps_charged=result.steps_charged, step=result.step,
                             loss=result.history[-1]["loss"] if result.history else None,
                             epsilon_spent=result.epsilon_spent, end_state=result.end_state,
                             evaluation=(evaluation_status(result.evaluations[-1])
                                         if result.evaluations else None),
                             artifacts=artifacts)
            for reporter in reporters:
                reporter.report(final)
    return RunOutcome(result=result, report=report)


def load_pod_config(path: pathlib.Path) -> tuple[DPTrainingJob, int]:
    """The job in a pod config and the steps its status says were charged.

    Raises:
        InvalidInputError: no such file, or not exactly one document.
        InvalidJobError: the manifest is invalid.
    """
    try:
        documents = list(load_manifests(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: no such file") from None
    if len(documents) != 1:
        raise InvalidInputError(f"{path}: must hold exactly one DPTrainingJob")
    manifest = documents[0]
    return parse_job(manifest), steps_charged_of(manifest.get("status"))


def train_pod(config_path: pathlib.Path, output: pathlib.Path | None, options: RunOptions, *,
              key_file: pathlib.Path | None = None) -> RunOutcome:
    """``dptrain train``: train the job of a pod config (see the module docstring).

    Raises:
        see :func:`load_pod_config`, :func:`dataset_for` and :func:`train_job`.
    """
    job, charged = load_pod_config(config_path)
    # With a uri the checkpoint path is scratch: orbax's staging, prepared data, the report.
    checkpoint = pathlib.Path(job.spec.checkpoint.path or "checkpoints")
    out = output or checkpoint
    out.mkdir(parents=True, exist_ok=True)
    dataset = dataset_for(job, base_dir=pathlib.Path.cwd(), prepared_dir=checkpoint / "prepared",
                          progress=options.progress)
    shape: ModelShape | None
    if job.status is not None and job.status.plan is not None:
        # Follow the operator's plan as is: its accounting must match ours.
        plan, shape = job.status.plan, None
    else:
        plan, shape = local_plan(job, dataset.num_sequences)
    return train_job(job, plan, shape, dataset, out, options, initial_steps_charged=charged,
                     in_pod=True, key_file=key_file)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrepareRequest:
    """What ``dptrain prepare-data`` is asked: a job's ``spec.data``, or explicit sources.

    Attributes:
        output: where the prepared sequences go.
        config: a DPTrainingJob manifest whose ``spec.data`` to prepare (else the fields below).
        input: a file or directory of documents.
        builtin: use the built-in corpus.
        fmt: ``jsonl`` or ``text``.
        text_field: the JSONL key of the text.
        tokenizer: ``byte`` or ``sentencepiece``.
        tokenizer_model: the sentencepiece model.
        sequence_length: tokens per sequence.
        canaries: random canaries to insert (memorization audits).
        canary_repeats: copies of each canary.
        report_status: merge-patch ``status.dataset`` of the pod's job.
        progress: show a progress bar.
    """

    output: pathlib.Path
    config: pathlib.Path | None = None
    input: pathlib.Path | None = None
    builtin: bool = False
    fmt: str = "jsonl"
    text_field: str = "text"
    tokenizer: str = "byte"
    tokenizer_model: pathlib.Path | None = None
    sequence_length: int = 1024
    canaries: int = 0
    canary_repeats: int = 10
    report_status: bool = False
    progress: bool = True


def prepare_data(request: PrepareRequest) -> dict[str, Any]:
    """Tokenize and pack documents into sequences; returns the prepared dataset's summary.

    Raises:
        InvalidInputError: a bad sequence length or config.
        DataError, ValueError: the documents cannot be read or prepared.
        StatusReportError: ``status.dataset`` could not be patched (the data is prepared).
    """
    from dptrain.trainer._audit import make_canaries

    checkpoint_uri = None
    if request.config is not None:
        job, _ = load_pod_config(request.config)
        checkpoint_uri = job.spec.checkpoint.uri
        data = job.spec.data
        # The trainer's own source (a held-out split excluded): the same N and checksum.
        source = data_source(job, pathlib.Path.cwd())
        tokenizer = make_tokenizer(data.tokenizer, data.tokenizer_model)
        length = data.sequence_length
    else:
        source = source_from_spec(
            path=str(request.input) if request.input else None,
            builtin=BUILTIN_STDLIB_DOCS if request.builtin else None, fmt=request.fmt,
            text_field=request.text_field)
        tokenizer = make_tokenizer(request.tokenizer, request.tokenizer_model)
        length = request.sequence_length
    if not MIN_SEQUENCE_LENGTH <= length <= MAX_SEQUENCE_LENGTH:
        raise InvalidInputError(f"--sequence-length: must be in [{MIN_SEQUENCE_LENGTH}, "
                                f"{MAX_SEQUENCE_LENGTH}] (got {length})")
    canaries = (make_canaries(tokenizer, count=request.canaries, length=min(length, 100))
                if request.canaries > 0 else [])
    dataset = prepare_dataset(source, tokenizer, sequence_length=length,
                              out_dir=request.output, canaries=canaries,
                              canary_repeats=request.canary_repeats, progress=request.progress)
    manifest = dataset.manifest
    result = {"location": str(dataset.directory.resolve()), **manifest.to_dict()}
    if checkpoint_uri is not None:
        # No volume is shared with the trainer pods: publish the sequences beside the
        # checkpoints (the same private storage), the manifest last, so that they are fetched
        # instead of tokenized again.
        remote = RemoteDir(checkpoint_uri, field="spec.checkpoint.uri")
        remote.publish(dataset.directory, (ARRAY_NAME,), under=PREPARED_DIR)
        remote.write_bytes(f"{PREPARED_DIR}/{MANIFEST_NAME}", (dataset.directory /
                                                              MANIFEST_NAME).read_bytes())
        result["location"] = remote.url(PREPARED_DIR)
    result.pop("canaries")
    result["canaries"] = len(manifest.canaries)
    if request.report_status:
        try:
            reporter = KubernetesReporter(KubernetesTarget.from_env())
            reporter.patch_status({"dataset": {"numSequences": manifest.num_sequences,
                                               "location": result["location"],
                                               "checksum": manifest.source_checksum}})
        except (OSError, ValueError) as error:
            raise StatusReportError(f"cannot report status.dataset: {error}") from error
    return result
