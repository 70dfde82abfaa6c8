"""`dptrain` commands of the operator (filled in by the operator work)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this group's subcommands (each with `--help` and `--json` via `common`)."""
    del subparsers, common
