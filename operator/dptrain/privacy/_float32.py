"""Rounding a noise multiplier to float32 without ever lowering it.

Formal guarantees:
    1. ``round_up_to_float32(x) >= x`` for every finite ``x >= 0``, and the result is exactly
       representable as a float32 (so casting it to float32 loses nothing).
    2. It is the smallest float32 with property 1 (no more noise than needed).
"""

from __future__ import annotations

import numpy as np


def round_up_to_float32(value: float) -> float:
    """The smallest float32 value ``>= value`` (as a Python float).

    A σ cast to float32 by round-to-nearest can fall below the planned σ, which would add less
    noise than the accountant assumed; this rounding never does.
    """
    rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return float(rounded)
