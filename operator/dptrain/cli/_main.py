"""Root parser of `dptrain`; each command group registers itself from its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dptrain.cli import (
    _api_commands,
    _model_commands,
    _operator_commands,
    _planner_commands,
    _privacy_commands,
    _sweep_commands,
    _trainer_commands,
)
from dptrain.cli._output import EXIT_USAGE, CliError, json_parent

_GROUPS = (_privacy_commands, _api_commands, _planner_commands, _sweep_commands,
           _trainer_commands, _model_commands, _operator_commands)


class _Parser(argparse.ArgumentParser):
    """argparse that exits with one line (and code 2) on bad arguments, never a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full `dptrain` argument parser."""
    parser = _Parser(
        prog="dptrain",
        description="Train language models with differential privacy: plan with the DP scaling "
                    "law, train with DP-SGD (JAX), enforce the ε budget, on one machine or on "
                    "Kubernetes.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    common = json_parent()
    for group in _GROUPS:
        group.register(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dptrain` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
    except CliError as error:
        print(f"dptrain {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"dptrain {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
