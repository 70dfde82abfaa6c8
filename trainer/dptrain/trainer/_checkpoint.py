"""Checkpoints with orbax: parameters, optimizer state, and a JSON record of the rest.

A checkpoint of step ``s`` (the number of steps whose updates the parameters include) holds three
items: ``params`` and ``opt_state`` (orbax ``StandardSave``, exact float round trip) and ``meta``
(JSON: step, the public seed, the SHA-256 fingerprint of the job's secret key — never the key:
sampling and noise are functions of the key and the execution count, so there is no other RNG
state — the ledger, the model shape, the plan and the dataset identity).

Checkpoints are written synchronously: the loop must know a checkpoint is complete before it
reports it, and the ledger ordering (ledger first, then checkpoint) relies on program order.

With a ``remote`` directory (``spec.checkpoint.uri``: ``s3://``, ``gs://`` or ``file://``) orbax
still writes to the local ``directory`` — orbax 0.12 builds its tensorstore kvstore for ``gs://``
only and refuses other non-local paths (``build_kvstore_tspec`` requires an absolute local path),
so S3 cannot be written by orbax itself — and each finished step directory is then uploaded
through fsspec, file by file, followed by a commit marker (:data:`COMMIT_MARKER`). Only steps with
a marker are complete: a crash mid-upload leaves a step that is never restored. On start the
latest committed step is downloaded into ``directory`` when it is not there (a fresh pod, a new
machine); the remote keeps the ``keep`` newest committed steps. One code path serves every
scheme, so what the S3 tests show holds for GCS.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
from typing import Any

import orbax.checkpoint as ocp

from dptrain.planner import ModelShape
from dptrain.trainer._storage import RemoteDir

_ITEMS = ("params", "opt_state", "meta")
#: Written into a remote step directory after all its files: the step is complete.
COMMIT_MARKER = "_DPTRAIN_COMMITTED"


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
    """Save and restore training state in ``directory`` (one sub-directory per step).

    With ``remote`` (a URI) every saved step is also uploaded there, and the latest committed
    remote step is downloaded on start (see the module docstring).

    Raises:
        StorageError: the remote cannot be read (names ``spec.checkpoint.uri``).
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 3,
                 remote: str | None = None) -> None:
        self.directory = pathlib.Path(directory).absolute()
        self.keep = keep
        self.remote = (RemoteDir(remote, field="spec.checkpoint.uri")
                       if remote is not None else None)
        if self.remote is not None:
            self._pull_latest()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=_ITEMS)

    def remote_steps(self) -> list[int]:
        """Steps committed to the remote, oldest first (empty without a remote)."""
        if self.remote is None:
            return []
        steps = set()
        for name in self.remote.files():
            parts = name.split("/")
            if len(parts) == 2 and parts[1] == COMMIT_MARKER and parts[0].isdigit():
                steps.add(int(parts[0]))
        return sorted(steps)

    def _pull_latest(self) -> None:
        assert self.remote is not None
        steps = self.remote_steps()
        if not steps or (self.directory / str(steps[-1])).is_dir():
            return
        step = steps[-1]
        self.directory.mkdir(parents=True, exist_ok=True)
        # Into a temporary sibling, then renamed: orbax never sees a half-downloaded step.
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{step}.download-",
                                                dir=self.directory))
        try:
            self.remote.download(str(step), staging)
            (staging / COMMIT_MARKER).unlink(missing_ok=True)
            staging.rename(self.directory / str(step))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _push(self, step: int) -> None:
        assert self.remote is not None
        name = str(step)
        self.remote.remove(f"{name}/{COMMIT_MARKER}")  # a re-save is incomplete until re-marked
        self.remote.upload(self.directory / name, name)
        self.remote.write_bytes(f"{name}/{COMMIT_MARKER}", b"")
        for old in self.remote_steps()[:-self.keep]:
            self.remote.remove(f"{old}/{COMMIT_MARKER}")  # no longer complete, then gone
            self.remote.remove(str(old))

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
        if self.remote is not None:
            self._push(step)

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
            where = self.remote.uri if self.remote is not None else self.directory
            raise FileNotFoundError(f"no checkpoint in {where}")
        return step


def shape_to_dict(shape: ModelShape) -> dict[str, Any]:
    """A model shape as JSON (stored in checkpoints so the audit can rebuild the model)."""
    return dataclasses.asdict(shape)


def shape_from_dict(data: dict[str, Any]) -> ModelShape:
    """Inverse of :func:`shape_to_dict`."""
    return ModelShape(**data)
