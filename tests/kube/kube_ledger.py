"""Observing a job's ledger and children from the outside, for the fault tests.

- :class:`LedgerWatch` polls a job in a background thread and records every value of
  ``status.privacy.stepsCharged`` it sees, so a test can assert the ledger never went down.
- :func:`checkpoint_records` reads, from disk, the step and the ledger count of every complete
  checkpoint the trainer left (orbax writes one directory per step; a directory whose name is
  not a number is an unfinished save).
- :func:`children` lists a job's children by label across the kinds the operator creates.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

from kube_client import KubeHTTP

JOBS = "dptrain.io/v1alpha1/dptrainingjobs"
CHILD_RESOURCES = ("v1/configmaps", "v1/serviceaccounts", "rbac.authorization.k8s.io/v1/roles",
                   "rbac.authorization.k8s.io/v1/rolebindings", "v1/services", "batch/v1/jobs")
TERMINAL = ("Succeeded", "BudgetExhausted", "Failed")


def status_of(kube: KubeHTTP, name: str, namespace: str = "default") -> dict[str, Any]:
    return dict((kube.get_job(name, namespace) or {}).get("status") or {})


def privacy_of(kube: KubeHTTP, name: str, namespace: str = "default") -> dict[str, Any]:
    return dict(status_of(kube, name, namespace).get("privacy") or {})


def charged(kube: KubeHTTP, name: str, namespace: str = "default") -> int:
    return int(privacy_of(kube, name, namespace).get("stepsCharged") or 0)


def children(kube: KubeHTTP, name: str, namespace: str = "default") -> list[dict[str, Any]]:
    """Every object labelled as a child of job ``name``."""
    out: list[dict[str, Any]] = []
    for resource in CHILD_RESOURCES:
        out += [o for o in kube.list(resource, namespace)
                if (o["metadata"].get("labels") or {}).get("dptrain.io/job") == name]
    return out


def honest_mechanism(kube: KubeHTTP, name: str, namespace: str = "default",
                     checksum: str = "sha256:test-docs") -> dict[str, Any] | None:
    """The fingerprint an honest trainer of the job's current plan sends (None: no plan yet)."""
    from dptrain.api import PlanStatus
    from dptrain.operator._verification import expected_fingerprint

    status = status_of(kube, name, namespace)
    if not status.get("plan") or not status.get("privacy"):
        return None
    plan = PlanStatus.model_validate(status["plan"])
    return expected_fingerprint(plan, status["privacy"]["delta"], checksum).model_dump(
        mode="json", by_alias=True, exclude_none=True)


def report(kube: KubeHTTP, name: str, namespace: str = "default", **progress: Any) -> None:
    """What a trainer does: merge-patch ``status.progress`` of its job, with its fingerprint.

    The fingerprint is an honest trainer's unless ``mechanism=`` is given.
    """
    if "mechanism" not in progress:
        mechanism = honest_mechanism(kube, name, namespace)
        if mechanism is not None:
            progress["mechanism"] = mechanism
    kube.merge_patch(JOBS, namespace, name, {"status": {"progress": progress}}, "status")


def checkpoint_records(directory: Path) -> list[tuple[int, int]]:
    """(step, ledger count at save time) of every complete checkpoint in ``directory``."""
    out: list[tuple[int, int]] = []
    if not directory.is_dir():
        return out
    for entry in directory.iterdir():
        if not entry.is_dir() or not entry.name.isdigit():
            continue
        meta_files = [p for p in (entry / "meta").glob("*") if p.is_file()
                      and not p.name.startswith(".")] if (entry / "meta").is_dir() else []
        count = -1
        for path in meta_files:
            try:
                record = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(record, dict) and "ledger" in record:
                count = int(record["ledger"]["steps_charged"])
                assert int(record["step"]) == int(entry.name), (path, record["step"])
        assert count >= 0, f"checkpoint {entry} has no readable meta record"
        out.append((int(entry.name), count))
    return sorted(out)


def unfinished_saves(directory: Path) -> list[str]:
    """Names of checkpoint directories left by interrupted saves."""
    if not directory.is_dir():
        return []
    return sorted(e.name for e in directory.iterdir() if e.is_dir() and not e.name.isdigit()
                  and "tmp" in e.name)


class LedgerWatch:
    """Polls jobs' ``status.privacy.stepsCharged`` and remembers every value seen."""

    def __init__(self, kube: KubeHTTP, names: list[str], namespace: str = "default",
                 interval: float = 0.05) -> None:
        self.kube = kube
        self.names = names
        self.namespace = namespace
        self.interval = interval
        self.seen: dict[str, list[int]] = {name: [] for name in names}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name in self.names:
                try:
                    job = self.kube.get_job(name, self.namespace)
                except Exception as error:  # the API may be failing on purpose
                    self.errors.append(repr(error))
                    continue
                privacy = ((job or {}).get("status") or {}).get("privacy") or {}
                if "stepsCharged" in privacy:
                    values = self.seen[name]
                    if not values or values[-1] != privacy["stepsCharged"]:
                        values.append(int(privacy["stepsCharged"]))
            time.sleep(self.interval)

    def __enter__(self) -> LedgerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def decreases(self) -> dict[str, list[int]]:
        """Jobs whose recorded ledger ever went down, with their sequence."""
        return {name: values for name, values in self.seen.items()
                if any(b < a for a, b in itertools.pairwise(values))}
