"""A finished run's outputs: the Hugging Face export and where everything lies.

:func:`finish_artifacts` (``dptrain run/train --export``) and :func:`export_checkpoint`
(``dptrain export``; with ``report_status`` the operator's export pod, which merge-patches
``status.progress.artifacts`` of its job for the operator to copy into ``status.artifacts``).
The export is post-processing of the released model: no privacy cost.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from typing import Any

from dptrain.api import EXPORT_DIR
from dptrain.trainer._loop import BUDGET_EXHAUSTED, SUCCEEDED, TrainResult
from dptrain.trainer._reporters import KubernetesReporter, KubernetesTarget

log = logging.getLogger(__name__)


class StatusReportError(RuntimeError):
    """A result could not be reported to the job's status (nothing was lost locally)."""


def finish_artifacts(result: TrainResult, output: pathlib.Path,
                     export_format: str | None) -> dict[str, Any]:
    """Export the final model if asked (``huggingface``); where the run's outputs lie.

    Exports only a final model (Succeeded or BudgetExhausted). An export that fails is logged
    and reported (``exportError``), not raised: the training and its ledger stand, and a
    restarted pod would only fail the same way.
    """
    artifacts: dict[str, Any] = {"checkpoint": str(result.checkpoint_dir),
                                 "report": str(output / "report.json")}
    if export_format is None or result.end_state not in (SUCCEEDED, BUDGET_EXHAUSTED):
        return artifacts
    if export_format != "huggingface":
        artifacts["exportError"] = f"unknown export format {export_format!r}"
        return artifacts
    from dptrain.trainer._export import export_huggingface

    target = result.checkpoint_dir / EXPORT_DIR
    try:
        export_huggingface(result.checkpoint_dir, target, overwrite=True)
    except Exception as error:  # any failure is reported; the run stands
        log.error("export to %s failed: %s", target, error)
        artifacts["exportError"] = f"{type(error).__name__}: {error}"
    else:
        artifacts["export"] = str(target)
    return artifacts


def export_checkpoint(checkpoint: pathlib.Path, output: pathlib.Path, *, step: int | None = None,
                      overwrite: bool = False, adapter_only: bool = False,
                      report_status: bool = False) -> Any:
    """``dptrain export``: write the Hugging Face directory, and report it if asked.

    With ``report_status`` (the operator's export pod) merge-patch
    ``status.progress.artifacts`` of the pod's job. Returns the ``ExportResult``.

    Raises:
        ExportError: the checkpoint cannot be exported (reported as ``exportError`` first).
        StatusReportError: the export was written but could not be reported.
    """
    from dptrain.trainer._export import ExportError, export_huggingface

    artifacts: dict[str, Any] = {"checkpoint": str(checkpoint)}
    if (checkpoint / "report.json").is_file():
        artifacts["report"] = str(checkpoint / "report.json")
    try:
        result = export_huggingface(checkpoint, output, step=step, overwrite=overwrite,
                                    adapter_only=adapter_only)
    except ExportError as error:
        if report_status:
            with contextlib.suppress(StatusReportError):
                _report_artifacts({**artifacts, "exportError": str(error)})
        raise
    if report_status:
        _report_artifacts({**artifacts, "export": str(output)})
    return result


def _report_artifacts(artifacts: dict[str, Any]) -> None:
    try:
        reporter = KubernetesReporter(KubernetesTarget.from_env())
        reporter.patch_status({"progress": {"artifacts": artifacts}})
    except (OSError, ValueError) as error:
        raise StatusReportError(f"cannot report status.progress.artifacts: {error}") from error
