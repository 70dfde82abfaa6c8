"""DPTrainingJob manifests for operator tests: tiny, CPU, fully pinned (planning is instant)."""

from __future__ import annotations

import copy
from typing import Any

BASE_SPEC: dict[str, Any] = {
    "privacy": {"epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"},
    "data": {"builtin": "stdlib-docs", "sequenceLength": 64, "numSequences": 2000},
    "model": {"preset": "tiny"},
    "training": {"batchSize": 64, "iterations": 1000, "noiseMultiplier": 1.0},
    "maxRestarts": 2,
}


def job_manifest(name: str, *, namespace: str = "default", **overrides: Any) -> dict[str, Any]:
    """A job; ``overrides`` are merged into the spec (dicts deep-merged, None deletes)."""
    spec = copy.deepcopy(BASE_SPEC)

    def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
        for key, value in patch.items():
            if value is None:
                target.pop(key, None)
            elif isinstance(value, dict) and isinstance(target.get(key), dict):
                merge(target[key], value)
            else:
                target[key] = copy.deepcopy(value)

    merge(spec, overrides)
    return {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}
