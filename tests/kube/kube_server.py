"""Run the kmock-based API emulator in a background thread, with a kubeconfig pointing at it.

Tests stay synchronous: the emulator has its own event loop in its own thread, so blocking
calls in a test (subprocesses, urllib) never stall the API server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import kmock
import yaml
from kube_emulator import DPTrainKubernetes


def crd_validating_schema() -> dict[str, Any]:
    """The generated CRD schema as the API server applies it (unknown fields are errors)."""
    from dptrain.api import _crd

    return _crd.validating_schema(strict=True)


class EmulatorServer:
    """A started :class:`DPTrainKubernetes` on 127.0.0.1:<port> in a daemon thread."""

    def __init__(self, *, with_jobset: bool = False, validate: bool = True,
                 port: int | None = None) -> None:
        self.with_jobset = with_jobset
        self.schema = crd_validating_schema() if validate else None
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.emulator: DPTrainKubernetes | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._main, name="kube-emulator", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as error:  # surfaced by start()
            self._error = error
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        emulator = DPTrainKubernetes(crd_schema=self.schema, with_jobset=self.with_jobset)
        kwargs = {"port": self._port} if self._port else {}
        async with emulator, kmock.Server(emulator, **kwargs) as server:
            self.emulator = emulator
            self.port = server.port
            self._ready.set()
            await self._stop.wait()

    def start(self) -> EmulatorServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the API emulator did not start within 30 s")
        if self._error is not None:
            raise RuntimeError(f"the API emulator failed to start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def call(self, fn: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 30) -> Any:
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(fn(), self._loop)
        return future.result(timeout)

    def objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Snapshots of the live objects of a resource (e.g. ``batch/v1/jobs``)."""
        emulator = self.emulator
        assert emulator is not None

        async def snapshot() -> list[dict[str, Any]]:
            async with emulator._lock:
                return copy.deepcopy(emulator.live_objects(resource, namespace))

        return list(self.call(snapshot))

    def grant_token(self, token: str, namespace: str, service_account: str) -> None:
        """Make ``token`` a ServiceAccount token: its requests are RBAC-checked."""
        emulator = self.emulator
        assert emulator is not None

        async def grant() -> None:
            emulator.grant_token(token, namespace, service_account)

        self.call(grant)

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester",
                                                       "namespace": "default"}}],
            "current-context": "kmock",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
