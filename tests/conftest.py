"""Shared pytest fixtures (each area appends its own section)."""

# --- operator test fixtures (owned by the operator work; see tests/kube/) -----------------------
import os as _os
import sys as _sys
from pathlib import Path as _Path

import pytest as _pytest

_sys.path.insert(0, str(_Path(__file__).parent / "kube"))


@_pytest.fixture(scope="session")
def planner_cache_dir(tmp_path_factory: _pytest.TempPathFactory) -> _Path:
    """One planner cache (σ tables) for the whole session, shared with operator processes."""
    configured = _os.environ.get("DPTRAIN_TEST_CACHE_DIR")
    return _Path(configured) if configured else tmp_path_factory.mktemp("planner-cache")


@_pytest.fixture()
def kube_api():
    """A fresh Kubernetes API emulator (kmock + fixes) on a random port; stopped afterwards."""
    from kube_server import EmulatorServer

    server = EmulatorServer().start()
    try:
        yield server
    finally:
        server.stop()


@_pytest.fixture()
def kube(kube_api):
    """A JSON-over-HTTP client of the emulator (what kubectl would send)."""
    from kube_client import KubeHTTP

    return KubeHTTP(kube_api.url)


@_pytest.fixture()
def start_operator(kube_api, tmp_path: _Path, planner_cache_dir: _Path):
    """Start the real operator (`dptrain operator -A`) against the emulator; always stopped."""
    from kube_operator import OperatorProcess

    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    started: list[OperatorProcess] = []

    def start(*extra_args: str, env: dict[str, str] | None = None) -> OperatorProcess:
        process = OperatorProcess(
            kubeconfig, tmp_path / f"operator-{len(started)}.log",
            extra_args=("--cache-dir", str(planner_cache_dir), *extra_args), env=env)
        started.append(process)
        return process.start()

    try:
        yield start
    finally:
        for process in started:
            process.stop()
