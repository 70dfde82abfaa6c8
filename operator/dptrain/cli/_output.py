"""Shared output conventions: `--json` on stdout, one-line errors on stderr, exit codes."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

# The exit codes are part of the pod contract (the operator reads the trainer's): defined there.
from dptrain.api import (
    EXIT_BUDGET_EXHAUSTED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_USAGE,
)

__all__ = ["EXIT_BUDGET_EXHAUSTED", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_INVALID", "EXIT_OK",
           "EXIT_USAGE", "CliError", "emit", "fail", "json_parent"]


class CliError(Exception):
    """An error to report as one line (no traceback) with an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def emit(args: argparse.Namespace, result: dict[str, Any],
         human: Callable[[dict[str, Any]], str] | None = None) -> None:
    """Print ``result`` as JSON (``--json``) or as human-readable text."""
    if getattr(args, "json", False) or human is None:
        sys.stdout.write(json.dumps(_jsonable(result), indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(human(result).rstrip("\n") + "\n")


def fail(message: str, exit_code: int = EXIT_ERROR) -> NoReturn:
    """Stop the command with a one-line message."""
    raise CliError(message, exit_code)


def json_parent() -> argparse.ArgumentParser:
    """A parent parser that gives a subcommand the `--json` flag."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true",
                        help="print machine-readable JSON on stdout instead of text")
    return parent
