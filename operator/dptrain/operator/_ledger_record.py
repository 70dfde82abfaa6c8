"""The operator's authoritative ledger: an annotation the trainer cannot write.

The trainer's Role may ``get`` its job and ``get``/``patch`` its ``/status`` — so it could
overwrite ``status.privacy``. The operator therefore keeps the record that counts in the
annotation ``dptrain.io/ledger`` on the DPTrainingJob: a ``/status`` patch cannot change metadata,
and the trainer's Role has no ``patch`` on the main resource. ``status.privacy`` is a published
copy: if it differs from the record (the trainer or anyone else wrote it), the operator ignores it,
posts a Warning event and restores it.

Formal guarantees (checked in ``tests/test_operator_verification.py`` and over HTTP in
``tests/test_faults_ledger_tamper.py``):
    1. :func:`authoritative` never takes a value from ``status.privacy`` when a record exists; it
       falls back to ``status.privacy`` only for a job that has no record yet (jobs created before
       the record existed), so no charged step is forgotten on upgrade.
    2. :func:`merge_records` keeps the maximum of every count it is given: the ledger never
       decreases through any sequence of records.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import pydantic

from dptrain.api import PrivacyLedgerStatus

ANNOTATION_LEDGER = "dptrain.io/ledger"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LedgerRecord:
    """What the annotation holds.

    Attributes:
        ledger: the privacy ledger (steps charged, ε spent, budget, δ, accountant).
        dataset_checksum: the dataset checksum pinned at the first verified report, when the
            operator did not know one beforehand.
    """

    ledger: PrivacyLedgerStatus
    dataset_checksum: str | None = None

    def to_annotation(self) -> str:
        """The annotation's value (compact, sorted JSON)."""
        data: dict[str, Any] = {"ledger": self.ledger.model_dump(mode="json", by_alias=True,
                                                                 exclude_none=True)}
        if self.dataset_checksum is not None:
            data["datasetChecksum"] = self.dataset_checksum
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


def read_record(meta: Mapping[str, Any]) -> LedgerRecord | None:
    """The record on a job (None when absent or unreadable)."""
    raw = (meta.get("annotations") or {}).get(ANNOTATION_LEDGER)
    if not raw:
        return None
    try:
        data = json.loads(raw)
        ledger = PrivacyLedgerStatus.model_validate(data["ledger"])
        checksum = data.get("datasetChecksum")
    except (ValueError, KeyError, TypeError, pydantic.ValidationError):
        return None
    return LedgerRecord(ledger=ledger,
                        dataset_checksum=checksum if isinstance(checksum, str) else None)


def _dump(ledger: PrivacyLedgerStatus | None) -> Any:
    return None if ledger is None else ledger.model_dump(mode="json", by_alias=True,
                                                         exclude_none=True)


def authoritative(record: LedgerRecord | None, published: PrivacyLedgerStatus | None
                  ) -> tuple[PrivacyLedgerStatus | None, bool]:
    """The ledger in force, and whether ``status.privacy`` was written by someone else.

    Args:
        record: the annotation's record.
        published: ``status.privacy`` as read.

    Returns:
        (ledger, overwritten): the record's ledger (``published`` only when there is no record)
        and True when ``status.privacy`` differs from the record.
    """
    if record is None:
        return published, False
    overwritten = published is not None and _dump(published) != _dump(record.ledger)
    return record.ledger, overwritten


def merge_records(ledger: PrivacyLedgerStatus, *counts: int) -> PrivacyLedgerStatus:
    """``ledger`` with ``steps_charged`` raised to the largest of ``counts`` (never lowered).

    The rule is :meth:`dptrain.api.PrivacyLedgerStatus.merge`'s (defined there once).
    """
    return ledger.merge(*counts)
