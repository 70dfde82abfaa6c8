"""Where the trainer publishes its ledger and progress: a file, or its job's status.

:class:`FileReporter` writes ``progress.json`` in the output directory (local runs);
:class:`KubernetesReporter` merge-patches ``status.progress`` of the DPTrainingJob at the pod
contract's status path (``dptrain.api.status_path``) with the pod's ServiceAccount token over
plain HTTPS (``urllib``; the trainer must not import kubernetes). ``DPTRAIN_REPORT`` chooses
(:func:`reporters_from_env`). A charge must be acknowledged; progress is best effort.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

from dptrain.api import (
    ENV_API_SERVER,
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_REPORT,
    IN_CLUSTER_API_SERVER,
    REPORT_FILE,
    REPORT_KUBERNETES,
    SERVICE_ACCOUNT_DIR,
    status_path,
    steps_charged_of,
)
from dptrain.trainer._ledger import (
    PROGRESS_FILE,
    LedgerError,
    Progress,
    Reporter,
    write_json_durably,
)

log = logging.getLogger(__name__)

class FileReporter:
    """Writes ``progress.json`` (the latest progress, durably) into a directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(directory) / PROGRESS_FILE

    def known_steps_charged(self) -> int:
        """The count in ``progress.json`` (0 when absent)."""
        if not self.path.is_file():
            return 0
        return int(json.loads(self.path.read_text()).get("stepsCharged", 0))

    def record_charge(self, progress: Progress) -> None:
        """Write the new count."""
        self._write(progress)

    def report(self, progress: Progress) -> None:
        """Write the latest progress."""
        try:
            self._write(progress)
        except OSError as error:  # progress is advisory: the ledger file is the record
            log.warning("could not write %s: %s", self.path, error)

    def _write(self, progress: Progress) -> None:
        data = progress.to_status()
        if progress.epsilon_spent is not None:
            data["epsilonSpent"] = progress.epsilon_spent
        write_json_durably(self.path, data)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KubernetesTarget:
    """Which DPTrainingJob to report to, and how to reach the API server."""

    name: str
    namespace: str
    api_server: str = IN_CLUSTER_API_SERVER
    token_path: pathlib.Path = SERVICE_ACCOUNT_DIR / "token"
    ca_path: pathlib.Path | None = SERVICE_ACCOUNT_DIR / "ca.crt"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> KubernetesTarget:
        """Read ``DPTRAIN_JOB_NAME``, ``DPTRAIN_JOB_NAMESPACE`` and ``DPTRAIN_API_SERVER``."""
        env = dict(os.environ if env is None else env)
        missing = [k for k in (ENV_JOB_NAME, ENV_JOB_NAMESPACE) if not env.get(k)]
        if missing:
            raise ValueError(f"{ENV_REPORT}={REPORT_KUBERNETES} needs {', '.join(missing)} set")
        return cls(name=env[ENV_JOB_NAME], namespace=env[ENV_JOB_NAMESPACE],
                   api_server=env.get(ENV_API_SERVER) or IN_CLUSTER_API_SERVER)

    @property
    def status_url(self) -> str:
        """The job's status subresource."""
        return self.api_server.rstrip("/") + status_path(self.namespace, self.name)


class KubernetesReporter:
    """Merge-patches ``status.progress`` of the job with the pod's ServiceAccount token.

    A charge must be acknowledged by the API server (retried with back-off, then
    :class:`LedgerError`); progress reports are tried once and only logged on failure.
    """

    def __init__(self, target: KubernetesTarget, *, attempts: int = 5, timeout_s: float = 10.0,
                 backoff_s: float = 1.0) -> None:
        self.target = target
        self._attempts = attempts
        self._timeout = timeout_s
        self._backoff = backoff_s
        self._context: ssl.SSLContext | None = None
        if target.api_server.startswith("https"):
            cafile = str(target.ca_path) if target.ca_path and target.ca_path.is_file() else None
            self._context = ssl.create_default_context(cafile=cafile)

    def known_steps_charged(self) -> int:
        """The larger of ``status.privacy.stepsCharged`` and ``status.progress.stepsCharged``."""
        try:
            body = self._request("GET", None)
        except (OSError, ValueError) as error:
            raise LedgerError(f"cannot read the ledger from {self.target.status_url}: "
                              f"{error}") from error
        return steps_charged_of(body.get("status"))

    def record_charge(self, progress: Progress) -> None:
        """Patch the new count; retried, then :class:`LedgerError`."""
        delay = self._backoff
        for attempt in range(1, self._attempts + 1):
            try:
                self._patch(progress)
                return
            except (OSError, ValueError) as error:
                if attempt == self._attempts:
                    raise LedgerError(f"cannot record {progress.steps_charged} steps charged at "
                                      f"{self.target.status_url}: {error}") from error
                log.warning("ledger patch failed (attempt %d): %s", attempt, error)
                time.sleep(delay)
                delay *= 2

    def report(self, progress: Progress) -> None:
        """Patch progress once; failures are logged."""
        try:
            self._patch(progress)
        except (OSError, ValueError) as error:
            log.warning("progress patch failed: %s", error)

    def patch_status(self, status: dict[str, Any]) -> None:
        """Merge-patch ``status`` (e.g. ``{"dataset": {...}}``) into the job's status."""
        self._request("PATCH", {"status": status})

    def _patch(self, progress: Progress) -> None:
        self.patch_status({"progress": progress.to_status()})

    def _request(self, method: str, body: dict[str, Any] | None) -> dict[str, Any]:
        # The projected token rotates: read it for every request.
        token = self.target.token_path.read_text().strip()
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/merge-patch+json"
        request = urllib.request.Request(self.target.status_url, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout,
                                        context=self._context) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise OSError(f"HTTP {error.code} {error.reason}") from error
        return dict(json.loads(payload)) if payload else {}


def reporters_from_env(output_dir: str | os.PathLike[str],
                       env: dict[str, str] | None = None) -> list[Reporter]:
    """The reporters ``DPTRAIN_REPORT`` asks for (``file`` by default, or ``kubernetes``)."""
    env = dict(os.environ if env is None else env)
    kind = env.get(ENV_REPORT, REPORT_FILE)
    if kind == REPORT_FILE:
        return [FileReporter(output_dir)]
    if kind == REPORT_KUBERNETES:
        return [KubernetesReporter(KubernetesTarget.from_env(env))]
    raise ValueError(f"{ENV_REPORT} must be '{REPORT_FILE}' or '{REPORT_KUBERNETES}' "
                     f"(got {kind!r})")
