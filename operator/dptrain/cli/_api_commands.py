"""`dptrain crd` and `dptrain validate`: the DPTrainingJob API from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dptrain.api import (
    InvalidJobError,
    crd_manifest,
    crd_yaml,
    dataset_crd_manifest,
    dataset_crd_yaml,
    load_manifests,
    parse_job,
)
from dptrain.api import validate_job as validate_semantics
from dptrain.cli._output import EXIT_INVALID, emit


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `crd` and `validate`."""
    crd = subparsers.add_parser(
        "crd", parents=[common], help="print the DPTrainingJob CustomResourceDefinition",
        description="Print the CRD generated from dptrain's API models (YAML, or JSON with "
                    "--json). `dptrain crd | kubectl apply -f -` installs it; "
                    "`--kind DPDataset` prints the DPDataset CRD.")
    crd.add_argument("--kind", choices=("DPTrainingJob", "DPDataset"), default="DPTrainingJob",
                     help="which CRD to print (default: DPTrainingJob)")
    crd.set_defaults(handler=_crd)

    validate = subparsers.add_parser(
        "validate", parents=[common], help="check DPTrainingJob manifests (schema + semantics)",
        description="Validate DPTrainingJob manifests against the schema and the semantic "
                    "rules. Prints one line per problem and exits 3 if any file is invalid.")
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.set_defaults(handler=_validate)


def _crd(args: argparse.Namespace) -> int:
    dataset = args.kind == "DPDataset"
    if args.json:
        emit(args, dataset_crd_manifest() if dataset else crd_manifest())
    else:
        sys.stdout.write(dataset_crd_yaml() if dataset else crd_yaml())
    return 0


def _problems(path: Path) -> tuple[list[str], int]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return [f"{path}: cannot read: {error.__class__.__name__}: {error}"], 0
    problems: list[str] = []
    count = 0
    try:
        for document in load_manifests(text):
            if document.get("kind") != "DPTrainingJob":
                continue
            count += 1
            name = (document.get("metadata") or {}).get("name", "?")
            try:
                validate_semantics(parse_job(document))
            except InvalidJobError as error:
                problems.extend(f"{path}: {name}: {line}" for line in error.lines)
    except InvalidJobError as error:
        problems.extend(f"{path}: {line}" for line in error.lines)
    if count == 0 and not problems:
        problems.append(f"{path}: holds no DPTrainingJob")
    return problems, count


def _validate(args: argparse.Namespace) -> int:
    results: list[dict[str, Any]] = []
    all_problems: list[str] = []
    for path in args.files:
        problems, count = _problems(path)
        results.append({"file": str(path), "jobs": count, "valid": not problems,
                        "problems": problems})
        all_problems.extend(problems)
    if args.json:
        emit(args, {"valid": not all_problems, "files": results})
    else:
        for line in all_problems:
            print(line, file=sys.stderr)
        for r in results:
            if r["valid"]:
                print(f"{r['file']}: ok ({r['jobs']} DPTrainingJob)")
    return EXIT_INVALID if all_problems else 0
