"""The DP scaling-law planner: budgets in, a training plan and pod sizes out (pure Python)."""

from dptrain.planner._presets import (
    BYTE_VOCAB_SIZE,
    PRESETS,
    ModelShape,
    get_preset,
    scaled_shape,
)

__all__ = ["BYTE_VOCAB_SIZE", "PRESETS", "ModelShape", "get_preset", "scaled_shape"]
