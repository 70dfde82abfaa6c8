"""The operator–trainer pod contract: what a trainer pod is given and what it must do.

Both sides import these names: the operator builds pods from them (``dptrain.operator._children``)
and the trainer reads them (``dptrain.trainer``); neither writes them down again.

- **Config**: the ConfigMap's ``config.json`` is mounted read-only at :data:`CONFIG_PATH`: a
  complete ``DPTrainingJob`` manifest with in-pod paths, whose ``status.plan`` the trainer follows
  as is and whose ``status.dataset`` names the prepared data.
- **Mounts**: the data volume at :data:`DATA_MOUNT`, the pretrained checkpoint's volume read-only
  at :data:`PRETRAINED_MOUNT`, the evaluation data's at :data:`EVAL_DATA_MOUNT`, checkpoints at
  :data:`CHECKPOINT_MOUNT`, the
  job's secret key at :data:`KEY_PATH` (never an env var), the ServiceAccount token in
  :data:`SERVICE_ACCOUNT_DIR`; with ``spec.checkpoint.uri`` the checkpoint mount is scratch
  (orbax stages there, then uploads), and a ``keyFile`` storage credential is mounted in
  ``dptrain.api._storage.STORAGE_SECRET_DIR``.
- **Environment**: :data:`ENV_JOB_NAME`, :data:`ENV_JOB_NAMESPACE`, :data:`ENV_API_SERVER`,
  :data:`ENV_REPORT` (:data:`REPORT_KUBERNETES` in pods, :data:`REPORT_FILE` locally) and, for
  multi-host jobs, :data:`ENV_JAX_COORDINATOR`, :data:`ENV_JAX_NUM_PROCESSES`,
  :data:`ENV_JAX_PROCESS_ID`.
- **Ports**: JAX's coordinator on :data:`COORDINATOR_PORT`, the trainer's Prometheus metrics on
  :data:`TRAINER_METRICS_PORT`.
- **Reporting**: the trainer merge-patches ``status.progress`` (``status.dataset`` for data
  preparation) at :func:`status_path` of its job on the API server (:data:`IN_CLUSTER_API_SERVER`
  unless told otherwise); it resumes from :func:`steps_charged_of` the job's status.
- **Export**: once a job has ended with a final model (Succeeded or BudgetExhausted) and its
  checkpoints are on a volume, an export pod runs :func:`export_command`: it writes the Hugging
  Face directory to :data:`EXPORT_DIR` under the checkpoint directory and merge-patches
  ``status.progress.artifacts`` (``checkpoint``, ``export``, ``report``; ``exportError`` on
  failure), which the operator copies to ``status.artifacts``.
- **Exit codes**: :data:`EXIT_OK` done, :data:`EXIT_BUDGET_EXHAUSTED` stopped at the last step
  within the budget (final: never retried), :data:`EXIT_INTERRUPTED` stopped by SIGTERM after
  saving a checkpoint; anything else is an error (the CLI's codes below).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from dptrain.api._base import GROUP, PLURAL, VERSION

# ------------------------------------------------------------------------------ exit codes
EXIT_OK = 0
EXIT_ERROR = 1  # any other failure (one line on stderr)
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_INVALID = 3  # the job or an input is invalid (the message names the field and the rule)
EXIT_BUDGET_EXHAUSTED = 4  # the trainer stopped at the last step within the privacy budget
EXIT_INTERRUPTED = 143  # 128 + SIGTERM: stopped on request (pod deletion), last checkpoint saved

# ------------------------------------------------------------------------------ files and mounts
CONFIG_DIR = "/etc/dptrain"
CONFIG_FILE = "config.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
DATA_MOUNT = "/data"
CHECKPOINT_MOUNT = "/checkpoints"
PRETRAINED_MOUNT = "/pretrained"  # spec.model.pretrained.volume, always read-only
EVAL_DATA_MOUNT = "/eval-data"  # spec.evaluation.data.volume
EXPORT_DIR = "export"  # under the checkpoint directory: the automatic Hugging Face export
KEY_DIR = "/var/run/secrets/dptrain.io"
KEY_FILE = "key"
KEY_PATH = f"{KEY_DIR}/{KEY_FILE}"
SERVICE_ACCOUNT_DIR = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")

# ------------------------------------------------------------------------------ environment
ENV_JOB_NAME = "DPTRAIN_JOB_NAME"
ENV_JOB_NAMESPACE = "DPTRAIN_JOB_NAMESPACE"
ENV_API_SERVER = "DPTRAIN_API_SERVER"
ENV_REPORT = "DPTRAIN_REPORT"
REPORT_FILE = "file"
REPORT_KUBERNETES = "kubernetes"
ENV_JAX_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_JAX_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_JAX_PROCESS_ID = "JAX_PROCESS_ID"

# ------------------------------------------------------------------------------ network
IN_CLUSTER_API_SERVER = "https://kubernetes.default.svc"
COORDINATOR_PORT = 8476
TRAINER_METRICS_PORT = 9100


def trainer_command() -> list[str]:
    """The trainer pods' command: train from the mounted config with the mounted key."""
    return ["dptrain", "train", "--config", CONFIG_PATH, "--key-file", KEY_PATH]


def export_command(checkpoint: str) -> list[str]:
    """The export pod's command: the latest checkpoint in ``checkpoint`` to ``EXPORT_DIR``."""
    return ["dptrain", "export", checkpoint, "--format", "huggingface", "--output",
            f"{checkpoint.rstrip('/')}/{EXPORT_DIR}", "--overwrite", "--report",
            REPORT_KUBERNETES]


def prepare_command(output: str) -> list[str]:
    """The data-preparation pod's command: prepare into ``output``, report ``status.dataset``."""
    return ["dptrain", "prepare-data", "--config", CONFIG_PATH, "--output", output,
            "--report", REPORT_KUBERNETES]


def status_path(namespace: str, name: str) -> str:
    """The API path of a DPTrainingJob's ``status`` subresource (what the trainer patches)."""
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"


def steps_charged_of(status: Mapping[str, Any] | None) -> int:
    """The steps a job's status says were charged: the larger of the ledger and the progress.

    A trainer resumes from this count, never below it (``status.privacy`` is the operator's
    ledger; ``status.progress`` the last count a trainer reported, which may be ahead of it).
    """
    status = status or {}
    return max(int((status.get(part) or {}).get("stepsCharged") or 0)
               for part in ("privacy", "progress"))
