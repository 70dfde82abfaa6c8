"""The loss table shipped with dptrain, and its provenance."""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

from dptrain.planner._loss_model import TableLossModel

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
DEFAULT_TABLE = PACKAGE_DIR / "heldout_loss_table.csv"
DEFAULT_PROVENANCE = PACKAGE_DIR / "heldout_loss_table.json"


def default_provenance() -> dict[str, Any]:
    """How the shipped table was made (environment, grid, commands)."""
    try:
        data: dict[str, Any] = json.loads(DEFAULT_PROVENANCE.read_text(encoding="utf-8"))
        return data
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=1)
def default_loss_model() -> TableLossModel:
    """The shipped results table as a loss model (read once per process)."""
    return TableLossModel.from_csv(DEFAULT_TABLE, metadata=default_provenance())
