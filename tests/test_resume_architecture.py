"""The resume check compares the model's architecture (issue-12, ported to _resume)."""

from __future__ import annotations

import pathlib

import pytest

from dptrain.api import InvalidJobError
from dptrain.trainer._architecture import Architecture
from dptrain.trainer._resume import check_compatible


def _meta(**extra: object) -> dict[str, object]:
    return {"key_fingerprint": "f", "seed": 0, "model_shape": {"d": 1},
            "plan": {"batchSize": 4}, "training": {"optimizer": "adamw"},
            "dataset": {"checksum": "c"}, **extra}


def test_architecture_is_compared_and_old_checkpoints_are_accepted() -> None:
    expected = _meta(architecture=Architecture().to_dict())
    where = pathlib.Path("ckpt")
    check_compatible(_meta(), expected, where)  # written before architectures were recorded
    check_compatible(_meta(architecture=Architecture().to_dict()), expected, where)
    with pytest.raises(InvalidJobError, match="architecture differs"):
        check_compatible(_meta(architecture={"other": True}), expected, where)
