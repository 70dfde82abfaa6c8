"""The DPDataset custom resource: a dataset and the privacy budget shared by every job on it.

A DPTrainingJob opts in with ``spec.data.datasetRef``. The operator admits a job only if the
composition (dp-accounting, not a sum of ε) of every job charged to the dataset plus the new job's
plan fits the dataset's ε at its δ, and keeps the dataset's ledger of charges in
``status.charges`` (written only by the operator; users' roles do not include ``/status``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

from dptrain.api._base import _Model, _Status
from dptrain.api._job import DataSpec, ObjectMeta, PrivacySpec
from dptrain.api._status import Condition

DATASET_KIND = "DPDataset"
DATASET_PLURAL = "dpdatasets"
DATASET_SINGULAR = "dpdataset"
DATASET_SHORT_NAMES = ("dpds",)

Checksum = Annotated[str, StringConstraints(min_length=1, max_length=256,
                                            pattern=r"^[A-Za-z0-9:._/+=-]+$")]


class DPDatasetSpec(_Model):
    """A dataset (by its source or its checksum) and its total privacy budget."""

    privacy: PrivacySpec
    """Total budget of every job on this dataset together (ε, δ, accountant)."""
    data: DataSpec | None = None
    """The documents, as a job's spec.data states them (jobs must state the same)."""
    checksum: Checksum | None = None
    """Checksum of the source documents (the trainer's dataset checksum); instead of `data`."""

    @model_validator(mode="after")
    def _one_source(self) -> DPDatasetSpec:
        if (self.data is None) == (self.checksum is None):
            raise ValueError("spec: must set exactly one of data and checksum")
        if self.data is not None and self.data.dataset_ref is not None:
            raise ValueError("spec.data.datasetRef: a dataset cannot refer to a dataset")
        return self


ChargeState = Literal["Reserved", "Running", "Charged"]


class DatasetCharge(_Status):
    """One job's charge against the dataset (kept after the job is deleted if it ran)."""

    job: str
    """The job's name."""
    uid: str
    """The job's uid (a new job of the same name is another charge)."""
    sampling_rate: float
    noise_multiplier: float
    physical_batch_size: int | None = None
    dataset_size: int | None = None
    reserved_steps: int
    """Steps admitted (the plan's maximum); they count until the job ends."""
    steps_charged: int = 0
    """Steps the job's ledger charged (what counts once it has run)."""
    state: ChargeState = "Reserved"
    """Reserved (admitted, nothing run), Running, Charged (final: ended or deleted)."""
    epsilon: float | None = None
    """ε of this job alone at the dataset's δ (informational)."""


class DPDatasetStatus(_Status):
    """The dataset's ledger and its summary."""

    epsilon_spent: float = 0.0
    """Composed ε of the steps actually charged."""
    epsilon_reserved: float = 0.0
    """Composed ε of every admission minus ε spent (planned, not yet run)."""
    epsilon_remaining: float | None = None
    """Budget minus the composed ε of every admission."""
    epsilon_budget: float | None = None
    jobs: int = 0
    """Jobs with a charge."""
    charges: list[DatasetCharge] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


class DPDataset(BaseModel):
    """A dataset with a privacy budget shared by its jobs."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True, allow_inf_nan=False, strict=True)

    api_version: Literal["dptrain.io/v1alpha1"] = "dptrain.io/v1alpha1"
    kind: Literal["DPDataset"] = "DPDataset"
    metadata: ObjectMeta
    spec: DPDatasetSpec
    status: DPDatasetStatus | None = Field(default=None)
