"""Checkpoints with orbax: parameters, optimizer state, and a JSON record of the rest.

A checkpoint of step ``s`` (the number of steps whose updates the parameters include) holds three
items: ``params`` and ``opt_state`` (orbax ``StandardSave``, exact float round trip) and ``meta``
(JSON: step, the public seed, the SHA-256 fingerprint of the job's secret key — never the key:
sampling and noise are functions of the key and the execution count, so there is no other RNG
state — the ledger, the model shape, the plan and the dataset identity).

Checkpoints are written synchronously: the loop must know a checkpoint is complete before it
reports it, and the ledger ordering (ledger first, then checkpoint) relies on program order.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import orbax.checkpoint as ocp

from dptrain.planner import ModelShape

_ITEMS = ("params", "opt_state", "meta")


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore` gives back.

    Attributes:
        step: steps included in the parameters.
        params: the parameter pytree.
        opt_state: the optimizer state (``None`` when not requested).
        meta: the JSON record saved with it.
    """

    step: int
    params: Any
    opt_state: Any
    meta: dict[str, Any]


class Checkpointer:
    """Save and restore training state in ``directory`` (one sub-directory per step)."""

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 3) -> None:
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=_ITEMS)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints kept, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
        """Write the checkpoint of ``step`` and wait until it is complete on disk."""
        record = {**meta, "step": step}
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(record)), force=True)
        self._manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of ``step`` (default: the latest)."""
        step = self._resolve(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, params_template: Any, opt_state_template: Any | None = None,
                step: int | None = None) -> Restored:
        """Restore into the structure (and shardings) of the templates.

        Args:
            params_template: a pytree shaped like the saved parameters (e.g. a fresh init).
            opt_state_template: likewise for the optimizer state; ``None`` skips it.
            step: which checkpoint (default: the latest).
        """
        step = self._resolve(step)
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(params_template),
                                 "meta": ocp.args.JsonRestore()}
        if opt_state_template is not None:
            items["opt_state"] = ocp.args.StandardRestore(opt_state_template)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return Restored(step=step, params=restored["params"],
                        opt_state=restored["opt_state"] if opt_state_template is not None
                        else None, meta=dict(restored["meta"]))

    def restore_raw(self, step: int | None = None) -> Any:
        """The saved parameters as plain arrays, without a template (for inspection and tests)."""
        step = self._resolve(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore()))
        return restored["params"]

    def close(self) -> None:
        """Release the manager's resources."""
        self._manager.close()

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step


def shape_to_dict(shape: ModelShape) -> dict[str, Any]:
    """A model shape as JSON (stored in checkpoints so the audit can rebuild the model)."""
    return dataclasses.asdict(shape)


def shape_from_dict(data: dict[str, Any]) -> ModelShape:
    """Inverse of :func:`shape_to_dict`."""
    return ModelShape(**data)
