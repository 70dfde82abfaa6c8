"""The hostile-manifest corpus, posted over HTTP with the operator running; and a canary.

Every file of tests/data/bad-manifests/ is sent as ``kubectl apply`` would. Each must be rejected
either by the CRD schema (422 from the API, naming the field) or by the operator (phase Failed,
a condition and a Warning event naming the field, and nothing created). Meanwhile the operator
keeps serving: a good job created before is untouched, one created after is planned normally.

The canary test puts a secret-looking string in a job's annotations, in the dataset the
data-preparation pod reads (run for real by the test's kubelet), in the ServiceAccount token the
pod reports with and in the operator's own credentials; it must never appear in the operator's
logs (JSON, verbose) or in any event.
"""

from __future__ import annotations

import copy
import json
import secrets
from pathlib import Path

import pytest
import yaml
from kube_client import ApiError
from kube_kubelet import Kubelet, finish_job
from kube_ledger import children, status_of
from kube_samples import job_manifest
from kube_server import EmulatorServer
from kube_waiting import wait_for

from dptrain.api import load_manifests

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CORPUS = sorted((ROOT / "tests" / "data" / "bad-manifests").glob("*.yaml"))
KINDS = ["ConfigMap", "Job", "Role", "RoleBinding", "Service", "ServiceAccount"]


def expected_field(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# expect-field:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{path.name} has no expect-field header")


def names_field(text: str, field: str) -> bool:
    """Whether an error text points at ``field`` (or at its parent, naming the leaf)."""
    if field in text:
        return True
    parent, _, leaf = field.rpartition(".")
    return bool(parent) and parent in text and f"'{leaf}'" in text


def running_with_children(kube, name):
    job = kube.get_job(name)
    if (job or {}).get("status", {}).get("phase") != "Running":
        return None
    objs = children(kube, name)
    return job if sorted(o["kind"] for o in objs) == KINDS else None


def test_every_corpus_manifest_is_rejected_and_the_operator_keeps_serving(kube, start_operator):
    assert len(CORPUS) >= 40
    operator = start_operator()
    kube.create_job(job_manifest("good-before"))
    before = wait_for(lambda: running_with_children(kube, "good-before"), timeout=60,
                      what="good-before running")
    before_children = {o["metadata"]["uid"] for o in children(kube, "good-before")}
    by_schema, by_operator = [], []
    for index, path in enumerate(CORPUS):
        field = expected_field(path)
        [document] = list(load_manifests(path.read_text()))
        document = copy.deepcopy(document)
        if field != "metadata.name":  # unique names; the name cases keep their bad names
            document["metadata"]["name"] = f"bad-{index:02d}"
        name = document["metadata"]["name"]
        try:
            kube.create_job(document)
        except ApiError as error:
            assert error.status == 422, (path.name, error.status, str(error))
            assert names_field(str(error), field), (path.name, field, str(error))
            by_schema.append(path.name)
            continue
        by_operator.append((path.name, name, field))
    for file, name, field in by_operator:
        status = wait_for(lambda n=name: (s := status_of(kube, n)).get("phase") == "Failed" and s,
                          timeout=30, what=f"{file} Failed",
                          describe=lambda n=name: json.dumps(status_of(kube, n)))
        failed = {c["type"]: c for c in status["conditions"]}
        assert failed["SpecValid"]["status"] == "False", (file, failed)
        assert names_field(failed["SpecValid"]["message"], field), (file, field, failed)
        wait_for(lambda n=name, f=field: [e for e in kube.events_for(n) if e["type"] == "Warning"
                                          and names_field(e["message"], f)],
                 timeout=15, what=f"a Warning event naming {field} for {file}")
        assert "plan" not in status and "privacy" not in status, (file, status)
        assert children(kube, name) == [], file
    assert len(by_schema) + len(by_operator) == len(CORPUS)
    assert by_schema and by_operator  # both lines of defence were exercised
    # The operator kept serving: alive, the earlier job untouched, a new job planned normally.
    assert operator.process is not None and operator.process.poll() is None
    after = kube.get_job("good-before")
    assert after["status"]["plan"] == before["status"]["plan"]
    assert after["status"]["privacy"] == before["status"]["privacy"]
    assert after["status"]["phase"] == "Running"
    assert {o["metadata"]["uid"] for o in children(kube, "good-before")} == before_children
    kube.create_job(job_manifest("good-after"))
    wait_for(lambda: running_with_children(kube, "good-after"), timeout=60,
             what="good-after running")
    # Nothing else exists: only the two good jobs have children.
    for resource in ("v1/configmaps", "v1/serviceaccounts", "batch/v1/jobs", "v1/services"):
        owners = sorted((o["metadata"].get("labels") or {}).get("dptrain.io/job")
                        for o in kube.list(resource, "default"))
        assert owners == ["good-after", "good-before"], (resource, owners)
    assert "Traceback" not in operator.tail(2000)


CANARY = "dptrain-canary-" + secrets.token_hex(12)


class CanaryEmulator(EmulatorServer):
    """The emulator; the kubeconfig it writes holds the canary as the operator's token."""

    def write_kubeconfig(self, path: Path) -> Path:
        written = super().write_kubeconfig(path)
        config = yaml.safe_load(written.read_text())
        config["users"][0]["user"]["token"] = f"{CANARY}-operator-token"
        written.write_text(yaml.safe_dump(config))
        return written


@pytest.fixture()
def kube_api():
    server = CanaryEmulator().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_a_canary_never_reaches_operator_logs_or_events(kube, kube_api, start_operator,
                                                       tmp_path):
    operator = start_operator("--log-format", "json", "--verbose")
    kubelet = Kubelet(kube, kube_api.url, tmp_path / "kubelet")
    docs = [json.dumps({"text": f"line {i}: the password is {CANARY}-data {i} " * 3})
            for i in range(200)]
    (kubelet.claim_dir("corpus") / "docs.jsonl").write_text("\n".join(docs) + "\n")
    manifest = job_manifest(
        "canary", data={"builtin": None, "path": "docs.jsonl", "volume": {"claimName": "corpus"},
                        "numSequences": None, "sequenceLength": 64},
        privacy={"delta": 1e-6}, training={"batchSize": 16})
    manifest["metadata"]["annotations"] = {"example.com/api-key": f"{CANARY}-annotation"}
    manifest["metadata"]["labels"] = {"team": "canary"}
    kube.create_job(manifest)
    # An invalid twin whose bad field is not the canary, carrying the canary elsewhere.
    bad = job_manifest("canary-bad", privacy={"delta": 1e-2})
    bad["metadata"]["annotations"] = {"example.com/api-key": f"{CANARY}-annotation"}
    kube.create_job(bad)
    wait_for(lambda: kube.get("batch/v1/jobs", "default", "canary-prepare"), timeout=30,
             what="the data-preparation Job")
    pod = kubelet.run("canary-prepare", env={"JAX_PLATFORMS": "cpu"})
    try:
        code = pod.process.wait(180)
    finally:
        kubelet.stop_all()
    assert code == 0, pod.log()
    finish_job(kube, "canary-prepare", 0)
    wait_for(lambda: status_of(kube, "canary").get("phase") == "Running", timeout=60,
             what="the canary job planned after preparation",
             describe=lambda: json.dumps(status_of(kube, "canary")))
    wait_for(lambda: status_of(kube, "canary-bad").get("phase") == "Failed", timeout=30,
             what="the invalid twin Failed")
    # The canary really went everywhere it could leak from ...
    assert status_of(kube, "canary")["dataset"]["numSequences"] > 0
    assert CANARY in json.dumps(kube.get_job("canary")["metadata"])
    assert CANARY in (kubelet.claim_dir("corpus") / "docs.jsonl").read_text()
    # ... and reached neither the logs nor any event nor the status.
    operator.stop()
    log = operator.log_path.read_text(errors="replace")
    assert len(log) > 1000 and '"level"' in log  # JSON, verbose: the leakiest configuration
    assert CANARY not in log
    events = kube.list("v1/events", "default")
    assert len(events) >= 3
    assert CANARY not in json.dumps(events)
    for name in ("canary", "canary-bad"):
        assert CANARY not in json.dumps(status_of(kube, name)), name
    assert CANARY not in pod.log(10**6)
