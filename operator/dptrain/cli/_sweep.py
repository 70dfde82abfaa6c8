"""`dptrain sweep`: measure a loss table (model × σ̄ × learning rate × step) with the DP trainer."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `sweep`."""
    del subparsers, common
