"""The durable ledger of steps charged (its reporters are in ``_reporters``).

The trainer *reserves* steps before running them: it writes the new cumulative count to the
ledger file beside the checkpoints (atomically, fsynced) and to the job's reporter, and only then
runs those steps. Anything derived from a step — a checkpoint, a progress report, the final model
— is therefore persisted after a ledger that already counts it. A crash can leave the ledger
ahead of the work (a conservative over-count), never behind it.

The count is of *executions*, not of the step index: a trainer restarted from a checkpoint older
than the ledger continues to charge from the ledger's count, so repeated steps are charged again.

Reporters (:class:`Reporter`: a file, or the job's status; ``dptrain.trainer._reporters``)
receive every charge before the steps run, and progress after.

Formal guarantees:
    1. Durable before use: :meth:`DurableLedger.reserve` returns only after the new count is
       fsynced to the ledger file (file and directory) and accepted by every reporter; it raises
       otherwise, and the loop runs only reserved steps.
    2. Monotone: the ledger file's count never decreases (a lower write is refused), and a resumed
       ledger starts at the maximum of every record it is given (file, reporters, checkpoint).
    3. Budget: :meth:`DurableLedger.reserve` refuses (``BudgetExceededError``) a reservation whose
       cumulative ε would exceed the budget, before writing anything.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any, Protocol

from dptrain.privacy import EpsilonCurve, PrivacyLedger
from dptrain.trainer._storage import RemoteDir, StorageError

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"
PROGRESS_FILE = "progress.json"


class LedgerError(RuntimeError):
    """The ledger could not be recorded durably; no further step may run."""


class BudgetExceededError(RuntimeError):
    """A reservation would take ε past the budget."""


def now_iso() -> str:
    """The current UTC time, RFC 3339 (what Kubernetes status fields use)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Progress:
    """What the trainer publishes about itself (``status.progress`` in a pod).

    Attributes:
        steps_charged: steps charged so far (the ledger).
        step: steps included in the current parameters.
        loss: recent DP estimate of the training loss (released under the job's ε).
        tokens_per_second: recent throughput of the physical batch (public).
        epsilon_spent: ε of ``steps_charged``.
        end_state: ``Succeeded``/``BudgetExhausted``/``Failed`` once finished.
        raw_loss: raw loss of the sampled rows (only with the opt-in; not privatised).
        unaccounted_release: what is published outside ε, when anything is.
        mechanism: the fingerprint of the mechanism run (``status.progress.mechanism``), which
            the operator compares with the plan it accounts.
        evaluation: the latest held-out evaluation (``status.progress.evaluation``; not
            covered by ε).
        artifacts: where the finished run's outputs lie (``status.progress.artifacts``).
    """

    steps_charged: int
    step: int
    loss: float | None = None
    tokens_per_second: float | None = None
    epsilon_spent: float | None = None
    end_state: str | None = None
    raw_loss: float | None = None
    unaccounted_release: str | None = None
    mechanism: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    artifacts: dict[str, Any] | None = None

    def to_status(self) -> dict[str, Any]:
        """CamelCase ``status.progress`` (the fields of ``dptrain.api.ProgressStatus``)."""
        out: dict[str, Any] = {"stepsCharged": self.steps_charged, "step": self.step,
                               "lastUpdate": now_iso()}
        if self.loss is not None:
            out["loss"] = float(self.loss)
        if self.tokens_per_second is not None:
            out["tokensPerSecond"] = float(self.tokens_per_second)
        if self.end_state is not None:
            out["endState"] = self.end_state
        if self.raw_loss is not None:
            out["rawLoss"] = float(self.raw_loss)
        if self.unaccounted_release is not None:
            out["unaccountedRelease"] = self.unaccounted_release
        if self.mechanism is not None:
            out["mechanism"] = dict(self.mechanism)
        if self.evaluation is not None:
            out["evaluation"] = dict(self.evaluation)
        if self.artifacts is not None:
            out["artifacts"] = dict(self.artifacts)
        return out


class Reporter(Protocol):
    """Where the trainer publishes its ledger and progress."""

    def known_steps_charged(self) -> int:
        """The highest count this reporter has recorded (0 if none)."""
        ...

    def record_charge(self, progress: Progress) -> None:
        """Record a new count durably; raise :class:`LedgerError` if that is impossible."""
        ...

    def report(self, progress: Progress) -> None:
        """Publish progress (best effort: failures are logged, not raised)."""
        ...


def _fsync_dir(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durably(path: pathlib.Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class LedgerFile:
    """``ledger.json`` beside the checkpoints: the local durable record of steps charged.

    With ``remote`` (``spec.checkpoint.uri``) the record is also written there, as one object
    replaced whole by each write (a single PUT: atomic, and durable once acknowledged), after the
    local file; a write returns only when both hold it. Reading takes the larger of the two
    records, so a fresh machine resumes from the remote count.
    """

    def __init__(self, directory: str | os.PathLike[str], *, remote: str | None = None) -> None:
        self.path = pathlib.Path(directory) / LEDGER_FILE
        self.remote = (RemoteDir(remote, field="spec.checkpoint.uri")
                       if remote is not None else None)
        self._remote_count: int | None = None  # the remote count as last read or written

    def read(self) -> dict[str, Any] | None:
        """The last record (the larger, local or remote), or ``None`` when there is none."""
        records = []
        if self.path.is_file():
            records.append(dict(json.loads(self.path.read_text())))
        if self.remote is not None:
            try:
                data = self.remote.read_bytes(LEDGER_FILE)
            except StorageError as error:
                raise LedgerError(str(error)) from None
            if data is not None:
                records.append(dict(json.loads(data)))
                self._remote_count = int(records[-1]["steps_charged"])
            else:
                self._remote_count = 0
        return max(records, key=lambda r: int(r["steps_charged"])) if records else None

    def steps_charged(self) -> int:
        """The recorded count (0 when there is no file)."""
        record = self.read()
        return int(record["steps_charged"]) if record else 0

    def write(self, ledger: PrivacyLedger, epsilon_spent: float) -> None:
        """Record ``ledger`` durably; a count below the recorded one is refused."""
        if self.remote is not None and self._remote_count is not None:
            # This process is the job's only writer: the remote holds what it last wrote
            # (one GET per job, not one per step).
            local = (int(json.loads(self.path.read_text())["steps_charged"])
                     if self.path.is_file() else 0)
            recorded = max(local, self._remote_count)
        else:
            recorded = self.steps_charged()
        if ledger.steps_charged < recorded:
            raise LedgerError(f"refusing to lower the ledger in {self.path} from {recorded} to "
                              f"{ledger.steps_charged} steps charged")
        record = {
            "steps_charged": ledger.steps_charged, "epsilon_spent": epsilon_spent,
            "epsilon_budget": ledger.epsilon_budget, "delta": ledger.mechanism.delta,
            "accountant": ledger.mechanism.accountant, "updated": now_iso(),
            "ledger": ledger.to_dict()}
        write_json_durably(self.path, record)
        if self.remote is not None:
            try:
                self.remote.write_bytes(LEDGER_FILE, json.dumps(record, indent=2,
                                                                sort_keys=True).encode())
            except StorageError as error:
                raise LedgerError(str(error)) from None
            self._remote_count = ledger.steps_charged


class DurableLedger:
    """The privacy ledger with its durable records (see the module's Formal guarantees)."""

    def __init__(self, ledger: PrivacyLedger, curve: EpsilonCurve, ledger_file: LedgerFile,
                 reporters: Sequence[Reporter] = (), *, writer: bool = True,
                 horizon: int | None = None) -> None:
        """Keep ``ledger`` with its records.

        Args:
            ledger: the privacy ledger to start from.
            curve: "ε after t steps" of the mechanism (the plan's curve, shared with the
                operator: ``dptrain.planner.plan_curve``).
            ledger_file: the local durable record.
            reporters: where charges and progress are published.
            writer: whether this process writes records (only one process of a job does).
            horizon: the most steps this ledger may ever be asked about (default: the
                curve's last grid point); the budget's exact ceiling is searched up to it.
        """
        self._ledger = ledger
        self._curve = curve
        self._horizon = horizon
        self._file = ledger_file
        self._reporters = tuple(reporters)
        self._writer = writer  # only one process of a multi-host job writes
        self._max_within: int | None = None

    @property
    def state(self) -> PrivacyLedger:
        """The current privacy ledger."""
        return self._ledger

    @property
    def steps_charged(self) -> int:
        """Steps charged so far."""
        return self._ledger.steps_charged

    def epsilon_spent(self) -> float:
        """ε of the steps charged (see :meth:`epsilon_at`)."""
        return self.epsilon_at(self._ledger.steps_charged)

    def epsilon_at(self, steps: int) -> float:
        """An upper bound on ε after ``steps``, fast.

        The curve's look-up, capped at the budget for counts the exact bound already certified
        (``max_steps_within`` is exact): between grid points the look-up can exceed a budget
        that the exact ε meets.
        """
        value = self._curve.epsilon_at(steps)
        if steps <= self._ceiling():
            value = min(value, self._ledger.epsilon_budget)
        return value

    def _ceiling(self) -> int:
        if self._max_within is None:
            self._max_within = self._curve.max_steps_within(self._ledger.epsilon_budget,
                                                             self._horizon)
        return self._max_within

    def resume(self, *records: int) -> int:
        """Start from the largest of the file, the reporters and ``records``; returns it."""
        counts = [self._ledger.steps_charged, self._file.steps_charged(), *records]
        counts += [r.known_steps_charged() for r in self._reporters]
        self._ledger = self._ledger.merge(max(counts))
        return self._ledger.steps_charged

    def affordable(self, limit: int) -> int:
        """How many more steps (at most ``limit``) the budget allows."""
        return max(0, min(limit, self._ceiling() - self._ledger.steps_charged))

    def reserve(self, steps: int, progress: Progress) -> None:
        """Charge ``steps`` more and record the count durably before they run.

        Raises:
            BudgetExceededError: the new count's ε would pass the budget (nothing written).
            LedgerError: a record could not be written.
        """
        # The same exact bound as :meth:`affordable` (``max_steps_within`` is exact): the
        # curve's conservative look-up between grid points could refuse a step that
        # ``affordable`` granted, and the loop would crash instead of ending BudgetExhausted.
        if steps > 0 and self.affordable(steps) < steps:
            raise BudgetExceededError(
                f"charging {steps} more step(s) after {self._ledger.steps_charged} would exceed "
                f"ε budget {self._ledger.epsilon_budget}")
        new = self._ledger.charge(steps)
        if self._writer:
            eps = self.epsilon_at(new.steps_charged)
            self._file.write(new, eps)
            record = dataclasses.replace(progress, steps_charged=new.steps_charged,
                                         epsilon_spent=eps)
            for reporter in self._reporters:
                reporter.record_charge(record)
        self._ledger = new

    def report(self, progress: Progress) -> None:
        """Publish progress to every reporter (best effort)."""
        if not self._writer:
            return
        for reporter in self._reporters:
            reporter.report(progress)
