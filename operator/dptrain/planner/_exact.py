"""Exact privacy numbers of a chosen plan, through :mod:`dptrain.privacy`, cached on disk.

The σ table only steers the search; the plan's σ, its most steps within budget and the ε it
plans to spend come from the privacy module's own calibration (the functions that enforce the
budget). PLD calibration costs seconds, so results are memoised in a JSON file next to the σ
table, keyed by every input; a warm plan re-uses them.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

from dptrain.privacy import (
    AccountantName,
    DpSgdMechanism,
    calibrate_noise_multiplier,
    calibrate_steps,
    epsilon,
)

CACHE_VERSION = 1


class ExactAccounting:
    """Calibrations of one planner process, backed by ``<cache_dir>/exact.json``.

    Args:
        cache_dir: directory of the cache file, or None for memory only.
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None) -> None:
        self.path = (pathlib.Path(cache_dir) / "exact.json") if cache_dir is not None else None
        self._memo: dict[str, float] = {}
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") == CACHE_VERSION:
                self._memo.update({k: float(v) for k, v in data["entries"].items()})
        except (OSError, ValueError, KeyError, AttributeError):
            pass

    def _store(self, key: str, value: float) -> float:
        self._memo[key] = value
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                on_disk = json.loads(self.path.read_text()).get("entries", {})
            except (OSError, ValueError, AttributeError):
                on_disk = {}
            on_disk.update(self._memo)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".json.tmp")
            with os.fdopen(fd, "w") as handle:
                json.dump({"version": CACHE_VERSION, "entries": on_disk}, handle)
            os.replace(tmp, self.path)
        return value

    def _cached(self, key: list[Any]) -> tuple[str, float | None]:
        self._load()
        text = json.dumps(key)
        return text, self._memo.get(text)

    def noise_multiplier(self, *, epsilon_budget: float, delta: float, sampling_rate: float,
                         steps: int, accountant: AccountantName, dataset_size: int,
                         physical_batch_size: int) -> float:
        """The least σ with ε(steps) ≤ budget (``calibrate_noise_multiplier``)."""
        key, hit = self._cached(["sigma", epsilon_budget, delta, sampling_rate, steps, accountant,
                                 dataset_size, physical_batch_size])
        if hit is not None:
            return hit
        sigma = calibrate_noise_multiplier(epsilon=epsilon_budget, delta=delta,
                                           sampling_rate=sampling_rate, steps=steps,
                                           accountant=accountant, dataset_size=dataset_size,
                                           physical_batch_size=physical_batch_size)
        return self._store(key, sigma)

    def max_steps(self, *, epsilon_budget: float, mechanism: DpSgdMechanism, cap: int) -> int:
        """The most steps ≤ ``cap`` within the budget (``calibrate_steps``)."""
        key, hit = self._cached(["steps", epsilon_budget, repr(mechanism), cap])
        if hit is not None:
            return int(hit)
        steps = calibrate_steps(epsilon=epsilon_budget, delta=mechanism.delta,
                                sampling_rate=mechanism.sampling_rate,
                                noise_multiplier=mechanism.noise_multiplier,
                                accountant=mechanism.accountant,
                                dataset_size=mechanism.dataset_size,
                                physical_batch_size=mechanism.physical_batch_size, max_steps=cap)
        return int(self._store(key, float(steps)))

    def epsilon(self, mechanism: DpSgdMechanism, steps: int) -> float:
        """ε after ``steps`` steps (``dptrain.privacy.epsilon``)."""
        key, hit = self._cached(["epsilon", repr(mechanism), steps])
        if hit is not None:
            return hit
        return self._store(key, epsilon(mechanism, steps))
