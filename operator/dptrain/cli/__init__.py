"""The `dptrain` command line: the only place that joins the operator and the trainer."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dptrain` console script (``argv``: None reads ``sys.argv``).

    As the console script (no ``argv``), the process first restarts itself with glibc's malloc
    on huge pages (``_huge_pages``), before the commands' heavy imports.
    """
    if argv is None:
        from dptrain.cli._huge_pages import reexec_with_huge_pages

        reexec_with_huge_pages()
    from dptrain.cli._main import main as run

    return run(argv)


def build_parser() -> argparse.ArgumentParser:
    """The `dptrain` argument parser (every command group registered)."""
    from dptrain.cli._main import build_parser as build

    return build()


__all__ = ["build_parser", "main"]
