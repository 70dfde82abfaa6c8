"""The durable ledger and the reporters (dptrain.trainer._ledger guarantees)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dptrain.api import ProgressStatus
from dptrain.privacy import DpSgdMechanism, EpsilonCurve, PrivacyLedger, epsilon
from dptrain.trainer import (
    BudgetExceededError,
    DurableLedger,
    FileReporter,
    KubernetesReporter,
    KubernetesTarget,
    LedgerError,
    LedgerFile,
    Progress,
    reporters_from_env,
)

MECHANISM = DpSgdMechanism(sampling_rate=0.01, noise_multiplier=1.0, delta=1e-5,
                           accountant="rdp")


def make_ledger(tmp_path, budget, reporters=()):
    curve = EpsilonCurve.build(MECHANISM, 200)
    return DurableLedger(PrivacyLedger(mechanism=MECHANISM, epsilon_budget=budget), curve,
                         LedgerFile(tmp_path), reporters)


def test_reserve_writes_the_file_before_returning(tmp_path):
    ledger = make_ledger(tmp_path, 10.0)
    ledger.reserve(3, Progress(steps_charged=0, step=0))
    record = json.loads((tmp_path / "ledger.json").read_text())
    assert record["steps_charged"] == 3
    assert record["epsilon_spent"] >= epsilon(MECHANISM, 3)
    assert record["ledger"]["mechanism"]["noise_multiplier"] == 1.0


def test_reserve_refuses_to_pass_the_budget_and_writes_nothing(tmp_path):
    budget = (epsilon(MECHANISM, 50) + epsilon(MECHANISM, 51)) / 2
    ledger = make_ledger(tmp_path, budget)
    assert ledger.affordable(1000) == 50
    ledger.reserve(50, Progress(steps_charged=0, step=0))
    with pytest.raises(BudgetExceededError):
        ledger.reserve(1, Progress(steps_charged=50, step=50))
    assert json.loads((tmp_path / "ledger.json").read_text())["steps_charged"] == 50
    assert ledger.affordable(1000) == 0
    # What it reports is an upper bound of the exact ε that never shows more than the budget
    # for steps the exact bound allowed (the grid look-up alone could).
    assert epsilon(MECHANISM, 50) <= ledger.epsilon_spent() <= budget


def test_the_ledger_file_never_decreases(tmp_path):
    ledger_file = LedgerFile(tmp_path)
    ledger_file.write(PrivacyLedger(mechanism=MECHANISM, epsilon_budget=5.0, steps_charged=7), 1.0)
    with pytest.raises(LedgerError, match="refusing to lower"):
        ledger_file.write(PrivacyLedger(mechanism=MECHANISM, epsilon_budget=5.0,
                                        steps_charged=6), 1.0)
    assert ledger_file.steps_charged() == 7


def test_resume_takes_the_largest_record(tmp_path):
    LedgerFile(tmp_path).write(PrivacyLedger(mechanism=MECHANISM, epsilon_budget=5.0,
                                             steps_charged=4), 1.0)
    reporter = FileReporter(tmp_path / "out")
    reporter.record_charge(Progress(steps_charged=9, step=2))
    ledger = make_ledger(tmp_path, 10.0, [reporter])
    assert ledger.resume(6) == 9


def test_progress_matches_the_api_status_model():
    status = Progress(steps_charged=5, step=3, loss=2.5, tokens_per_second=100.0,
                      end_state="Succeeded").to_status()
    parsed = ProgressStatus.model_validate(status)
    assert (parsed.steps_charged, parsed.step, parsed.loss, parsed.end_state) == (
        5, 3, 2.5, "Succeeded")


class FakeApiServer:
    """Records requests to a job's status and answers like the API server."""

    def __init__(self, status=None, fail_patches=0):
        self.requests = []
        self.status = status or {}
        self.fail_patches = fail_patches
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(("GET", self.path, dict(self.headers), None))
                self._reply(200, {"status": outer.status})

            def do_PATCH(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(("PATCH", self.path, dict(self.headers), body))
                if outer.fail_patches > 0:
                    outer.fail_patches -= 1
                    self._reply(500, {"message": "boom"})
                else:
                    self._reply(200, {"status": body["status"]})

            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def reporter_for(server, tmp_path, **kwargs):
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    target = KubernetesTarget(name="job-a", namespace="team", api_server=server.url,
                              token_path=token, ca_path=None)
    return KubernetesReporter(target, backoff_s=0.01, **kwargs)


def test_kubernetes_reporter_merge_patches_status_progress(tmp_path):
    with FakeApiServer() as server:
        reporter = reporter_for(server, tmp_path)
        reporter.record_charge(Progress(steps_charged=12, step=11, loss=1.5))
    method, path, headers, body = server.requests[-1]
    assert method == "PATCH"
    assert path == "/apis/dptrain.io/v1alpha1/namespaces/team/dptrainingjobs/job-a/status"
    assert headers["Authorization"] == "Bearer secret-token"
    assert headers["Content-Type"] == "application/merge-patch+json"
    assert body["status"]["progress"]["stepsCharged"] == 12
    assert set(body) == {"status"} and set(body["status"]) == {"progress"}


def test_kubernetes_reporter_reads_the_larger_recorded_count(tmp_path):
    status = {"privacy": {"stepsCharged": 40}, "progress": {"stepsCharged": 38}}
    with FakeApiServer(status=status) as server:
        assert reporter_for(server, tmp_path).known_steps_charged() == 40


def test_a_charge_is_retried_then_fails_loudly(tmp_path):
    with FakeApiServer(fail_patches=2) as server:
        reporter_for(server, tmp_path, attempts=3).record_charge(Progress(steps_charged=1,
                                                                          step=0))
    assert [r[0] for r in server.requests] == ["PATCH"] * 3
    with FakeApiServer(fail_patches=10) as server:
        with pytest.raises(LedgerError, match="cannot record 1 steps charged"):
            reporter_for(server, tmp_path, attempts=2).record_charge(
                Progress(steps_charged=1, step=0))
        # Progress reports are best effort: a failure is logged, not raised.
        reporter_for(server, tmp_path).report(Progress(steps_charged=1, step=1))


def test_reporters_from_env(tmp_path):
    assert isinstance(reporters_from_env(tmp_path, {})[0], FileReporter)
    reporters = reporters_from_env(tmp_path, {"DPTRAIN_REPORT": "kubernetes",
                                              "DPTRAIN_JOB_NAME": "a",
                                              "DPTRAIN_JOB_NAMESPACE": "b"})
    assert reporters[0].target.status_url.endswith("/namespaces/b/dptrainingjobs/a/status")
    with pytest.raises(ValueError, match="DPTRAIN_JOB_NAME"):
        reporters_from_env(tmp_path, {"DPTRAIN_REPORT": "kubernetes"})


def test_trainer_metrics_are_served_with_the_agreed_names():
    import socket
    import urllib.request

    from dptrain.trainer import TrainerMetrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = TrainerMetrics("job-a", port=port, addr="127.0.0.1")
    try:
        metrics.update(step=3, loss=2.5, epsilon_spent=1.25, epsilon_budget=8.0,
                       tokens_per_second=1000.0, new_steps=3)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        metrics.close()
    body = text.decode()
    for line in ('dptrain_trainer_step{job="job-a"} 3.0', 'dptrain_trainer_loss{job="job-a"} 2.5',
                 'dptrain_trainer_epsilon_spent{job="job-a"} 1.25',
                 'dptrain_trainer_epsilon_budget{job="job-a"} 8.0',
                 'dptrain_trainer_tokens_per_second{job="job-a"} 1000.0',
                 'dptrain_trainer_steps_total{job="job-a"} 3.0'):
        assert line in body
