"""Play the kubelet and the Job controller for the Jobs the operator creates.

:class:`Kubelet` runs the container of a created Job as a local process with that Job's
environment: volumes become local directories (a PersistentVolumeClaim is one directory per claim
shared by every pod that mounts it, so checkpoints survive restarts as they would on a real
volume; an ``emptyDir`` is fresh per pod), the ConfigMap is written out with in-pod paths
rewritten to local ones, the completion index is 0 and ``DPTRAIN_API_SERVER`` is the emulator.
:func:`finish_job` then writes the Job condition the Job controller would write when the pod
ended.

The process runs :data:`ENTRY`, which behaves exactly like ``dptrain`` with three test hooks,
all inert unless their environment variable is set:

- the reporter reads the ServiceAccount token from ``TEST_TOKEN_FILE`` (the kubelet projects
  it to a fixed path that a test cannot write);
- ``DPTRAIN_TEST_EXEC_LOG=<file>``: one line (the step index) is appended to ``<file>`` before
  each DP step is dispatched: the ground truth of how many steps were ever *executed*;
- ``DPTRAIN_TEST_FAULT=<where>:<n>`` kills the process with SIGKILL at the n-th (1-based, in this
  process) ``step`` (right after the step is dispatched: the step is in flight), ``save`` (a
  checkpoint fully written to its temporary directory, the final rename not yet done) or
  ``report`` (right after a progress report reached the API server).
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kube_client import KubeHTTP

ENTRY = r"""
import dataclasses, os, pathlib, signal, sys

from dptrain.trainer import _ledger, _loop, _reporters

_from_env = _reporters.KubernetesTarget.from_env.__func__

def _projected(cls, env=None):
    target = _from_env(cls, env)
    token = os.environ.get("TEST_TOKEN_FILE")
    if not token:
        return target
    return dataclasses.replace(target, token_path=pathlib.Path(token), ca_path=None)

_reporters.KubernetesTarget.from_env = classmethod(_projected)

_fault = os.environ.get("DPTRAIN_TEST_FAULT", "")
_where, _, _n = _fault.partition(":")
_counts = {"step": 0, "save": 0, "report": 0}

def _maybe_die(where):
    _counts[where] += 1
    if _where == where and _counts[where] == int(_n):
        sys.stderr.write(f"TEST FAULT: SIGKILL at {where} {_n}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

_exec_log = os.environ.get("DPTRAIN_TEST_EXEC_LOG")
if _exec_log or _where == "step":
    _compiled = _loop.compiled_step

    def _compiled_step(*args, **kwargs):
        step_fn, optimizer, static = _compiled(*args, **kwargs)

        def step(params, opt_state, tokens, mask, key, index, sigma):
            if _exec_log:
                fd = os.open(_exec_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, f"{int(index)}\n".encode())
                finally:
                    os.close(fd)
            out = step_fn(params, opt_state, tokens, mask, key, index, sigma)
            _maybe_die("step")
            return out

        return step, optimizer, static

    _loop.compiled_step = _compiled_step

if _where == "save":
    from orbax.checkpoint._src.path import atomicity

    _finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def _finalize_or_die(self, *args, **kwargs):
        _maybe_die("save")
        return await _finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = _finalize_or_die

if _where == "report":
    _report = _ledger.DurableLedger.report

    def _report_or_die(self, progress):
        _report(self, progress)
        _maybe_die("report")

    _ledger.DurableLedger.report = _report_or_die

from dptrain.cli import main
sys.exit(main())
"""


class Pod:
    """A running (or ended) local process standing in for a Job's pod."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, job_uid: str) -> None:
        self.process = process
        self.log_path = log_path
        self.job_uid = job_uid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def kill(self) -> None:
        """SIGKILL (a node dies, the OOM killer strikes)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)

    def stop(self, grace: float = 60.0) -> int:
        """The kubelet's graceful stop: SIGTERM, then SIGKILL after the grace period."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


class Kubelet:
    """Runs Jobs' containers as local processes under ``root``."""

    def __init__(self, kube: KubeHTTP, api_url: str, root: Path, *,
                 env: Mapping[str, str] | None = None, namespace: str = "default",
                 grant: Callable[[str, str, str], None] | None = None) -> None:
        self.kube = kube
        self.api_url = api_url
        self.root = root
        self.env = dict(env or {})
        self.namespace = namespace
        self.pods: list[Pod] = []
        #: ``grant(token, namespace, service_account)``: register each pod's token with the
        #: emulator so that the pod's requests are RBAC-checked as its ServiceAccount.
        self.grant = grant
        self.root.mkdir(parents=True, exist_ok=True)

    def claim_dir(self, claim: str) -> Path:
        """The local directory standing in for PersistentVolumeClaim ``claim``."""
        path = self.root / "pvc" / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, job_name: str, *, env: Mapping[str, str] | None = None, index: int = 0,
            extra_args: tuple[str, ...] = ()) -> Pod:
        """Start the container of Job ``job_name`` (completion ``index``).

        ``extra_args`` are appended to the container's command: pods have their own network
        namespace, local processes do not (``--metrics-port 0`` avoids clashes on 9100).
        """
        job = self.kube.get("batch/v1/jobs", self.namespace, job_name)
        assert job is not None, f"no Job {job_name}"
        uid = job["metadata"]["uid"]
        pod_root = self.root / "pods" / f"{job_name}-{len(self.pods)}"
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts: dict[str, Path] = {}
        config_dirs: list[Path] = []
        for mount in container["volumeMounts"]:
            source = volumes[mount["name"]]
            if "persistentVolumeClaim" in source:
                local = self.claim_dir(source["persistentVolumeClaim"]["claimName"])
                if mount.get("subPath"):
                    local = local / mount["subPath"]
            else:
                local = pod_root / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "secret" in source:  # written as the kubelet does: decoded, read-only files
                name = source["secret"]["secretName"]
                secret = self.kube.get("v1/secrets", self.namespace, name)
                assert secret is not None, f"no Secret {name}"
                items = source["secret"].get("items") or [
                    {"key": k, "path": k} for k in secret.get("data", {})]
                for item in items:
                    target = local / item["path"]
                    target.write_bytes(base64.b64decode(secret["data"][item["key"]]))
                    target.chmod(source["secret"].get("defaultMode", 0o644) & 0o700)
            if "configMap" in source:
                name = source["configMap"]["name"]
                config = self.kube.get("v1/configmaps", self.namespace, name)
                assert config is not None, f"no ConfigMap {name}"
                for key, value in config["data"].items():
                    (local / key).write_text(value)
                config_dirs.append(local)
            mounts[mount["mountPath"]] = local

        pattern = re.compile(r"(?<![\w./-])(" + "|".join(
            re.escape(m) for m in sorted(mounts, key=len, reverse=True)) + r')(?=/|$|"|\s)')

        def local_path(text: str) -> str:
            # One pass, at path boundaries: a mapped path is never rewritten again.
            return pattern.sub(lambda match: str(mounts[match.group(1)]), text)

        for directory in config_dirs:
            for item in directory.iterdir():
                item.write_text(local_path(item.read_text()))
        environ = dict(os.environ)
        for source in container.get("envFrom", []):  # every key of the Secret, as the kubelet
            name = source["secretRef"]["name"]
            secret = self.kube.get("v1/secrets", self.namespace, name)
            assert secret is not None, f"no Secret {name}"
            environ.update({k: base64.b64decode(v).decode()
                            for k, v in secret.get("data", {}).items()})
        for item in container.get("env", []):
            if "value" in item:
                environ[item["name"]] = local_path(item["value"])
            else:  # the completion index, as the Job controller sets it
                assert "job-completion-index" in item["valueFrom"]["fieldRef"]["fieldPath"]
                environ[item["name"]] = str(index)
        environ["DPTRAIN_API_SERVER"] = self.api_url  # what kubernetes.default.svc is here
        token = pod_root / "token"
        token_value = f"projected-token-{job_name}-{len(self.pods)}"
        token.write_text(token_value)
        if self.grant is not None:
            self.grant(token_value, self.namespace, pod["serviceAccountName"])
        environ["TEST_TOKEN_FILE"] = str(token)
        environ.setdefault("JAX_PLATFORMS", "cpu")
        environ.update(self.env)
        environ.update(env or {})
        command = [local_path(arg) for arg in container["command"]]
        assert command[0] == "dptrain", command
        log_path = pod_root / "pod.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, "-c", ENTRY, *command[1:], *extra_args],
                                       env=environ,
                                       stdout=log, stderr=subprocess.STDOUT, cwd=pod_root)
        started = Pod(process, log_path, uid)
        self.pods.append(started)
        return started

    def stop_all(self) -> None:
        """Stop every pod still running (SIGKILL: nothing of theirs matters any more)."""
        for pod in self.pods:
            if pod.returncode is None:
                pod.kill()


def finish_job(kube: KubeHTTP, name: str, returncode: int, *, namespace: str = "default",
               uid: str | None = None) -> bool:
    """Write the condition the Job controller writes when the (only) pod ended.

    Exit 0 completes the Job; anything else fails it (exit 4 by the pod failure policy, a
    signal by the backoff limit of 0). Returns False when the Job (of ``uid``) is gone.
    """
    job = kube.get("batch/v1/jobs", namespace, name)
    if job is None or (uid is not None and job["metadata"]["uid"] != uid):
        return False
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if returncode == 0:
        condition: dict[str, Any] = {"type": "Complete", "status": "True",
                                     "lastTransitionTime": now}
    else:
        reason = "PodFailurePolicy" if returncode == 4 else "BackoffLimitExceeded"
        condition = {"type": "Failed", "status": "True", "reason": reason,
                     "message": f"container exited with {returncode}", "lastTransitionTime": now}
    kube.merge_patch("batch/v1/jobs", namespace, name,
                     {"status": {"conditions": [condition]}}, "status")
    return True
