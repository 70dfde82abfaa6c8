"""Playing the kubelet: run a Job's container as a local process, volumes mapped to directories.

The real ``dptrain`` command of the pod runs with the Job's environment; its mounts become
temporary directories (the ConfigMap and Secret items written as the kubelet would), every
in-pod path in the config and the environment is rewritten to them, and the API server is the
emulator's.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

# The kubelet projects the ServiceAccount token into the pod at a fixed path that a test cannot
# write; this entry point points the trainer's reporter at the token file the test projects.
ENTRY = """
import dataclasses, os, pathlib, sys
from dptrain.trainer import _reporters
_from_env = _reporters.KubernetesTarget.from_env.__func__
def _projected(cls, env=None):
    target = _from_env(cls, env)
    return dataclasses.replace(target, token_path=pathlib.Path(os.environ["TEST_TOKEN_FILE"]),
                               ca_path=None)
_reporters.KubernetesTarget.from_env = classmethod(_projected)
from dptrain.cli import main
sys.exit(main())
"""


def run_pod(kube, kube_api, job_name: str, root: Path) -> subprocess.Popen[bytes]:
    """Start the container of Job ``job_name`` as a local process (completion index 0)."""
    job = kube.get("batch/v1/jobs", "default", job_name)
    assert job is not None
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        local = root / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        source = volumes[mount["name"]]
        if "configMap" in source:
            data = kube.get("v1/configmaps", "default", source["configMap"]["name"])["data"]
            for key, value in data.items():
                (local / key).write_text(value)
        if "secret" in source:  # the job's key, decoded as the kubelet writes it
            data = kube.get("v1/secrets", "default", source["secret"]["secretName"])["data"]
            for item in source["secret"]["items"]:
                (local / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
        mounts[mount["mountPath"]] = local

    pattern = re.compile(r"(?<![\w./-])(" + "|".join(
        re.escape(m) for m in sorted(mounts, key=len, reverse=True)) + r')(?=/|$|"|\s)')

    def local_path(text: str) -> str:
        # One pass, at path boundaries: a mapped path is never rewritten again.
        return pattern.sub(lambda match: str(mounts[match.group(1)]), text)

    for key in list((mounts["/etc/dptrain"]).iterdir()):
        key.write_text(local_path(key.read_text()))
    env = dict(os.environ)
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = local_path(item["value"])
        else:  # the completion index, as the Job controller would set it
            assert "job-completion-index" in item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = "0"
    env["DPTRAIN_API_SERVER"] = kube_api.url  # what kubernetes.default.svc resolves to here
    token = root / "token"
    token.write_text("projected-service-account-token")
    env["TEST_TOKEN_FILE"] = str(token)
    env.setdefault("JAX_PLATFORMS", "cpu")
    command = [local_path(arg) for arg in container["command"]]
    assert command[0] == "dptrain"
    log = open(root / f"{job_name}.log", "wb")  # noqa: SIM115 - the process owns it
    return subprocess.Popen([sys.executable, "-c", ENTRY, *command[1:]], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=root)


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # the kubelet's graceful stop of a deleted pod
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return int(process.returncode)
