"""The JAX DP-SGD trainer: a Gemma-2-style decoder trained with Poisson-sampled DP-SGD.

Modules, one concept each: ``_model`` (the decoder), ``_tokenizer`` and ``_data`` (documents to
memory-mapped sequences), ``_keys`` (the secret job key and per-execution keys), ``_sampling``
(Poisson batches), ``_noise`` (Gaussian noise without a cut-off tail), ``_ghost`` (ghost
clipping), ``_dpsgd`` (the step), ``_mesh`` (devices), ``_optimizer``, ``_ledger`` (durable steps
charged), ``_reporters`` (a file or the job's status), ``_checkpoint`` (orbax), ``_resume``
(checkpoint metadata, resume rules, the job's key), ``_loop`` (training with the budget guard),
``_report`` (report.json and plots), ``_audit`` (memorization), ``_distributed`` (multi-host
start-up), ``_metrics`` (Prometheus), ``_config`` (resolved settings, keeping the plan),
``_entry`` (the pod and local entry points: ``dptrain run``, ``train``, ``prepare-data``).
"""

from dptrain.trainer._artifacts import export_checkpoint
from dptrain.trainer._audit import (
    MatchRate,
    MemorizationResult,
    audit_checkpoint,
    clopper_pearson,
    edit_distance,
    make_canaries,
    memorization,
    training_prompts,
)
from dptrain.trainer._checkpoint import Checkpointer, Restored
from dptrain.trainer._config import TrainConfig, config_from_plan, pretrained_model, shape_for
from dptrain.trainer._data import (
    BUILTIN_STDLIB_DOCS,
    DataError,
    DatasetManifest,
    DocumentSource,
    PreparedDataset,
    load_dataset,
    prepare_dataset,
    prepare_or_reuse,
    source_from_spec,
    stdlib_docs_source,
)
from dptrain.trainer._distributed import ProcessInfo, distributed_env, initialize_from_env
from dptrain.trainer._dpsgd import (
    DpSgdConfig,
    StepMetrics,
    add_noise,
    clip_and_sum,
    make_dp_step,
    make_plain_step,
    model_loss_fn,
)
from dptrain.trainer._entry import (
    DEFAULT_RUNS_DIR,
    InvalidInputError,
    LocalRun,
    PrepareRequest,
    RunOptions,
    RunOutcome,
    StatusReportError,
    prepare_data,
    prepare_run,
    train_job,
    train_pod,
)
from dptrain.trainer._ledger import (
    BudgetExceededError,
    DurableLedger,
    LedgerError,
    LedgerFile,
    Progress,
    Reporter,
)
from dptrain.trainer._loop import (
    BUDGET_EXHAUSTED,
    SUCCEEDED,
    TrainingInterruptedError,
    TrainResult,
    mechanism_for,
    train,
)
from dptrain.trainer._lora import AdaptersUnchangedError, LoraConfig
from dptrain.trainer._mesh import make_mesh
from dptrain.trainer._metrics import TrainerMetrics
from dptrain.trainer._model import Decoder, build_model, count_params, sequence_loss
from dptrain.trainer._optimizer import make_optimizer
from dptrain.trainer._report import REPORT_KEYS, write_report
from dptrain.trainer._reporters import (
    FileReporter,
    KubernetesReporter,
    KubernetesTarget,
    reporters_from_env,
)
from dptrain.trainer._sampling import PoissonSampler, SampledBatch
from dptrain.trainer._storage import StorageError
from dptrain.trainer._tokenizer import ByteTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "BUDGET_EXHAUSTED",
    "BUILTIN_STDLIB_DOCS",
    "DEFAULT_RUNS_DIR",
    "REPORT_KEYS",
    "SUCCEEDED",
    "AdaptersUnchangedError",
    "BudgetExceededError",
    "ByteTokenizer",
    "Checkpointer",
    "DataError",
    "DatasetManifest",
    "Decoder",
    "DocumentSource",
    "DpSgdConfig",
    "DurableLedger",
    "FileReporter",
    "InvalidInputError",
    "KubernetesReporter",
    "KubernetesTarget",
    "LedgerError",
    "LedgerFile",
    "LocalRun",
    "LoraConfig",
    "MatchRate",
    "MemorizationResult",
    "PoissonSampler",
    "PrepareRequest",
    "PreparedDataset",
    "ProcessInfo",
    "Progress",
    "Reporter",
    "Restored",
    "RunOptions",
    "RunOutcome",
    "SampledBatch",
    "StatusReportError",
    "StepMetrics",
    "StorageError",
    "Tokenizer",
    "TrainConfig",
    "TrainResult",
    "TrainerMetrics",
    "TrainingInterruptedError",
    "add_noise",
    "audit_checkpoint",
    "build_model",
    "clip_and_sum",
    "clopper_pearson",
    "config_from_plan",
    "count_params",
    "distributed_env",
    "edit_distance",
    "export_checkpoint",
    "initialize_from_env",
    "load_dataset",
    "make_canaries",
    "make_dp_step",
    "make_mesh",
    "make_optimizer",
    "make_plain_step",
    "make_tokenizer",
    "mechanism_for",
    "memorization",
    "model_loss_fn",
    "prepare_data",
    "prepare_dataset",
    "prepare_or_reuse",
    "prepare_run",
    "pretrained_model",
    "reporters_from_env",
    "sequence_loss",
    "shape_for",
    "source_from_spec",
    "stdlib_docs_source",
    "train",
    "train_job",
    "train_pod",
    "training_prompts",
    "write_report",
]
