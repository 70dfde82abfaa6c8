"""`dptrain` commands of the planner (filled in by the planner work)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this group's subcommands (each with `--help` and `--json` via `common`)."""
    del subparsers, common
