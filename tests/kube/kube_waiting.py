"""Poll with a deadline: tests wait for a state, never for a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.2,
             what: str = "condition", describe: Callable[[], str] | None = None) -> T:
    """Call ``probe`` until it returns something truthy; fail with context after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            context = describe() if describe is not None else repr(last)
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}: {context}")
        time.sleep(interval)
