"""Does the trainer run the mechanism the operator accounts? Pure checks, no I/O.

The operator's ledger is only as good as the assumption that the pods run the planned DP-SGD
mechanism. Two independent checks catch a drift between the two:

- the *fingerprint* the trainer sends with every progress report (``status.progress.mechanism``:
  q, σ as used, δ, N, physical batch, clip norm, accountant, dataset checksum) is compared with
  the plan (:func:`mechanism_mismatches`);
- the trainer's ConfigMap (created ``immutable: true``) is compared with the config the operator
  built from the plan, so a ConfigMap deleted and re-created with other content is caught before a
  new pod reads it (:func:`config_mismatches`). The ConfigMap is read on every reconcile (each
  progress report, each safety-timer tick); it is not watched, because the operator may not
  list or watch ConfigMaps (no bulk read of other objects).

Formal guarantees (checked in ``tests/test_operator_verification.py``):
    1. A fingerprint passes only if every accounting field equals the plan's (q, δ, clip norm to a
       relative 1e-9; N, accountant exactly; σ exactly the plan's σ rounded up to float32), the
       physical batch is at least the plan's (more rows only make truncation rarer), and the
       dataset checksum equals the expected one when one is known.
    2. A missing fingerprint on a report is a mismatch (field ``mechanism``): an unverifiable
       report never passes silently.
    3. Every mismatch names the differing field by its status path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dptrain.api import MechanismFingerprint, PlanStatus
from dptrain.privacy import round_up_to_float32

FIELD_PREFIX = "status.progress.mechanism."
REL_TOLERANCE = 1e-9


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOLERANCE, abs_tol=0.0)


def expected_fingerprint(plan: PlanStatus, delta: float,
                         dataset_checksum: str | None = None) -> MechanismFingerprint:
    """The fingerprint an honest trainer of ``plan`` sends."""
    return MechanismFingerprint(
        sampling_rate=plan.sampling_rate,
        noise_multiplier=round_up_to_float32(plan.noise_multiplier),
        delta=delta, dataset_size=plan.dataset_size,
        physical_batch_size=plan.physical_batch_size, clip_norm=plan.clip_norm,
        accountant=plan.accountant, dataset_checksum=dataset_checksum)


def mechanism_mismatches(plan: PlanStatus, delta: float, reported: MechanismFingerprint | None,
                         expected_checksum: str | None) -> list[str]:
    """Every way the reported mechanism differs from the accounted one (empty: it matches).

    Args:
        plan: the plan the operator accounts.
        delta: the ledger's δ.
        reported: the trainer's fingerprint (None: the report carried none).
        expected_checksum: the dataset checksum the job must train on, when known.
    """
    if reported is None:
        return ["status.progress.mechanism: the progress report carries no mechanism "
                "fingerprint"]
    want = expected_fingerprint(plan, delta, expected_checksum)
    out: list[str] = []

    def differ(field: str, got: Any, expected: Any, rule: str = "") -> None:
        out.append(f"{FIELD_PREFIX}{field}: the trainer runs {got!r}, the plan accounts "
                   f"{expected!r}{rule}")

    if not _close(reported.sampling_rate, want.sampling_rate):
        differ("samplingRate", reported.sampling_rate, want.sampling_rate)
    if reported.noise_multiplier != want.noise_multiplier:
        differ("noiseMultiplier", reported.noise_multiplier, want.noise_multiplier,
               " (σ as used: float32, rounded up)")
    if not _close(reported.delta, want.delta):
        differ("delta", reported.delta, want.delta)
    if reported.dataset_size != want.dataset_size:
        differ("datasetSize", reported.dataset_size, want.dataset_size)
    if reported.physical_batch_size < want.physical_batch_size:
        differ("physicalBatchSize", reported.physical_batch_size, want.physical_batch_size,
               " (must be at least the plan's)")
    if not _close(reported.clip_norm, want.clip_norm):
        differ("clipNorm", reported.clip_norm, want.clip_norm)
    if reported.accountant != want.accountant:
        differ("accountant", reported.accountant, want.accountant)
    if expected_checksum is not None and reported.dataset_checksum != expected_checksum:
        differ("datasetChecksum", reported.dataset_checksum, expected_checksum)
    return out


def leaf_differences(expected: Any, observed: Any, path: str = "") -> list[str]:
    """Dotted paths (camelCase keys) where two JSON documents differ."""
    if isinstance(expected, Mapping) and isinstance(observed, Mapping):
        out: list[str] = []
        for key in sorted(set(expected) | set(observed)):
            out += leaf_differences(expected.get(key), observed.get(key),
                                    f"{path}.{key}" if path else str(key))
        return out
    return [] if expected == observed else [path or "<root>"]


def config_mismatches(expected: Mapping[str, Any], observed: Mapping[str, Any] | None,
                      immutable: bool) -> list[str]:
    """How the trainer's ConfigMap differs from the config the operator built for it.

    Args:
        expected: the ``config.json`` document the operator would write now.
        observed: the parsed ``config.json`` of the ConfigMap in the cluster (None: unreadable).
        immutable: whether the ConfigMap is marked ``immutable: true``.
    """
    if observed is None:
        return ["configMap.data.config.json: not a readable trainer config"]
    out = [f"configMap.data.config.json: {path}"
           for path in leaf_differences(expected, observed)]
    if not immutable:
        out.append("configMap.immutable: the trainer's ConfigMap must be immutable")
    return out
