"""`dptrain run --dataset-ledger PATH`: a dataset's budget across local runs, in a JSON file.

The same rules as the operator's DPDataset (``dptrain.operator._dataset_budget``): a run of a job
with ``spec.data.datasetRef`` is admitted only if the composition of every run charged to the
dataset plus this run's plan fits the dataset's budget; the reservation is written (under an
exclusive ``flock`` on ``PATH.lock``, atomically) before training starts, and replaced by the steps
actually charged when it ends. A run that trained is never un-charged.

The dataset's spec comes from a ``DPDataset`` document in the job's manifest file (recorded in
the ledger on first use) or from the ledger file itself. File format::

    {"datasets": {"<name>": {"spec": {...DPDataset spec...}, "charges": [{...}, ...]}}}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

from dptrain.api import DatasetCharge, DPDatasetSpec, DPTrainingJobSpec, PlanStatus
from dptrain.operator import _dataset_budget as budget


class DatasetBudgetError(Exception):
    """The run may not start: no dataset, other data, or not enough budget left."""


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[dict[str, Any]]:
    """The ledger's content under an exclusive lock; written back atomically on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        data.setdefault("datasets", {})
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            tmp = path.with_name(f".{path.name}.tmp")
            with tmp.open("w") as handle:
                json.dump(data, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)


def admit(path: pathlib.Path, name: str, manifest_spec: DPDatasetSpec | None,
          job_spec: DPTrainingJobSpec, run_id: str, job_name: str, plan: PlanStatus,
          steps_charged: int = 0) -> budget.Admission:
    """Reserve ``plan.max_steps`` steps of this run on dataset ``name``, or raise."""
    with _locked(path) as data:
        entry = data["datasets"].get(name)
        if manifest_spec is not None:
            spec = manifest_spec
        elif entry is not None:
            spec = DPDatasetSpec.model_validate(entry["spec"])
        else:
            raise DatasetBudgetError(
                f"spec.data.datasetRef: no DPDataset {name!r} in the manifest file or in {path}")
        mismatch = budget.data_mismatch(job_spec, spec, None)
        if mismatch is not None:
            raise DatasetBudgetError(f"DPDataset {name}: {mismatch}")
        charges = [DatasetCharge.model_validate(c) for c in (entry or {}).get("charges", [])]
        candidate = budget.charge_for(job_name, run_id, plan).model_copy(
            update={"steps_charged": steps_charged})
        admission = budget.admit(spec, charges, candidate)
        if not admission.fits:
            raise DatasetBudgetError(
                f"DPDataset {name}: composed ε {admission.composed:.4g} with this run would "
                f"exceed its budget {admission.budget:g} (remaining ε "
                f"{max(0.0, admission.remaining):.4g})")
        charges = budget.with_charge(charges, candidate)
        data["datasets"][name] = {
            "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
            "charges": [c.model_dump(mode="json", by_alias=True, exclude_none=True)
                        for c in charges]}
        return admission


def record(path: pathlib.Path, name: str, run_id: str, steps: int) -> None:
    """The run ended after ``steps`` charged: its charge becomes final (never lowered)."""
    with _locked(path) as data:
        entry = data["datasets"].get(name)
        if entry is None:
            return
        charges = [DatasetCharge.model_validate(c) for c in entry.get("charges", [])]
        charges = budget.update_steps(charges, run_id, steps, final=True)
        entry["charges"] = [c.model_dump(mode="json", by_alias=True, exclude_none=True)
                            for c in charges]
