"""The `dptrain` command line: the only place that joins the operator and the trainer."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dptrain` console script (``argv``: None reads ``sys.argv``).

    As the console script (no ``argv``), the process first restarts itself with a C allocator
    that keeps XLA's step memory mapped (``_allocator``: jemalloc where installed, else glibc's
    malloc on huge pages), before the commands' heavy imports.
    """
    if argv is None:
        import sys

        from dptrain.cli._allocator import reexec_with_fast_allocator

        try:
            reexec_with_fast_allocator()
        except ValueError as error:  # a bad DPTRAIN_MALLOC
            print(f"dptrain: {error}", file=sys.stderr)
            return 2
    from dptrain.cli._main import main as run

    return run(argv)


def build_parser() -> argparse.ArgumentParser:
    """The `dptrain` argument parser (every command group registered)."""
    from dptrain.cli._main import build_parser as build

    return build()


__all__ = ["build_parser", "main"]
