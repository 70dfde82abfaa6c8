"""The `dptrain` command line: the only place that joins the operator and the trainer."""

from dptrain.cli._main import build_parser, main

__all__ = ["build_parser", "main"]
