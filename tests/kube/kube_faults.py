"""Fault injection for the API emulator: errors, slow answers and dropped watch streams.

:class:`FaultyKubernetes` is the emulator of ``kube_emulator`` with a list of :class:`Fault`
rules consulted on every request. A rule matches requests by method, resource, name,
subresource, watch-or-not and client (the operator's own REST client, kopf, or anyone), and then
delays the request, answers it with an error instead of serving it (409/422/500/...), or — for
watch requests — serves the stream for a while and then drops it (a clean end of stream, as a
server-side timeout does, or a ``410 Gone`` ERROR event, as an expired resourceVersion does).
Every rule counts its hits, so a test can assert that the faults it planned really happened.

:class:`FaultyEmulatorServer` runs it in a thread like ``kube_server.EmulatorServer`` and adds
thread-safe controls (``add``, ``clear``, ``drop_watches``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import enums, rendering
from kube_emulator import DPTrainKubernetes, _error
from kube_server import EmulatorServer

#: User-Agent prefixes of the operator's HTTP clients: its own REST client and kopf's.
OPERATOR_AGENTS = ("dptrain-operator", "kopf/")
#: What a trainer (urllib) or a test client sends.
PYTHON_AGENTS = ("Python-urllib",)

_REASONS = {409: "Conflict", 410: "Gone", 422: "Invalid", 429: "TooManyRequests",
            500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}


@dataclasses.dataclass(kw_only=True)
class Fault:
    """One fault rule (all given criteria must match; ``None`` matches anything).

    Attributes:
        method: HTTP method (``GET``, ``POST``, ``PATCH``, ``DELETE``).
        resource: plural of the resource (``jobs``, ``dptrainingjobs``, ``events``...).
        name: object name.
        subresource: e.g. ``status``.
        watch: True for watch requests only, False for anything but watches.
        agents: User-Agent prefixes of the clients it applies to (None: every client).
        status: answer with this HTTP error instead of serving the request.
        reason: the Status reason (default: the usual one for ``status``).
        delay: seconds to hold the request before serving (or failing) it.
        drop_after: watch requests only: end the stream after this many seconds.
        drop_mode: ``eof`` (the stream just ends) or ``gone`` (a 410 ERROR event, then the end).
        skip: let this many matching requests through untouched first.
        times: hit at most this many requests (None: every one).
        probability: hit a matching request with this probability (seeded ``rng``).
        hits: how many requests it hit so far.
        seen: how many requests matched so far (hit or not).
    """

    method: str | None = None
    resource: str | None = None
    name: str | None = None
    subresource: str | None = None
    watch: bool | None = None
    agents: tuple[str, ...] | None = OPERATOR_AGENTS
    status: int | None = None
    reason: str | None = None
    delay: float = 0.0
    drop_after: float | None = None
    drop_mode: str = "eof"
    skip: int = 0
    times: int | None = None
    probability: float = 1.0
    hits: int = 0
    seen: int = 0

    def matches(self, request: rendering.Request) -> bool:
        """Whether the request is one this rule is about (hit or not)."""
        if self.method is not None and request.method.value != self.method.upper():
            return False
        is_watch = request.action == enums.action.WATCH
        if self.watch is not None and is_watch != self.watch:
            return False
        resource = request.resource
        if self.resource is not None and (resource is None or resource.plural != self.resource):
            return False
        if self.name is not None and request.name != self.name:
            return False
        if self.subresource is not None and request.subresource != self.subresource:
            return False
        if self.agents is not None:
            agent = request.headers.get("User-Agent", "")
            if not agent.startswith(self.agents):
                return False
        return True

    def take(self, rng: random.Random) -> bool:
        """Count a matching request; True if this rule hits it."""
        self.seen += 1
        if self.seen <= self.skip:
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        if self.probability < 1.0 and rng.random() >= self.probability:
            return False
        self.hits += 1
        return True

    @property
    def exhausted(self) -> bool:
        """A limited rule that has hit all its requests."""
        return self.times is not None and self.hits >= self.times


@attrs.define(kw_only=True)
class FaultyKubernetes(DPTrainKubernetes):
    """The emulator with :class:`Fault` rules applied to every request."""

    faults: list[Fault] = attrs.field(factory=list)
    seed: int = 0
    #: Every request seen: (method, resource plural, name, subresource, watch, agent, outcome);
    #: the outcome ends with the HTTP status answered (e.g. ``served 201``, ``failed 500``).
    journal: list[tuple[str, str | None, str | None, str | None, bool, str, str]] = attrs.field(
        factory=list)

    _rng: random.Random = attrs.field(init=False, factory=random.Random)
    _drops: dict[int, tuple[asyncio.Event, list[str]]] = attrs.field(init=False, factory=dict)
    _drop_ids: Any = attrs.field(init=False, factory=itertools.count)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rng.seed(self.seed)

    def _log(self, request: rendering.Request, outcome: str) -> None:
        resource = request.resource
        self.journal.append((request.method.value, resource.plural if resource else None,
                             request.name, request.subresource,
                             request.action == enums.action.WATCH,
                             request.headers.get("User-Agent", ""), outcome))

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        drop: tuple[float, str] | None = None
        outcome = "served"
        for fault in list(self.faults):
            if not fault.matches(request) or not fault.take(self._rng):
                continue
            if fault.delay:
                outcome = f"delayed {fault.delay:g}s"
                await asyncio.sleep(fault.delay)
            if fault.status is not None:
                self._log(request, f"failed {fault.status}")
                reason = fault.reason or _REASONS.get(fault.status, "InternalError")
                raise _error(fault.status, reason, f"injected fault: {fault.status} {reason}")
            if fault.drop_after is not None and request.action == enums.action.WATCH:
                drop = (fault.drop_after, fault.drop_mode)
                outcome = f"watch dropped after {fault.drop_after:g}s ({fault.drop_mode})"
        if drop is not None:
            request_drop = self._register_drop(request)
            asyncio.get_running_loop().call_later(drop[0], self._fire, request_drop, drop[1])
        try:
            response = await super()._handle(request)
        except kmock.KubernetesError as error:
            self._log(request, f"{outcome} {error.status}")
            raise
        self._log(request, f"{outcome} {response.status}")
        return response

    # ----------------------------------------------------------------------- dropping watches

    def _register_drop(self, request: rendering.Request) -> int:
        # The watch generator looks its drop switch up by the request's identity.
        key = id(request)
        self._drops[key] = (asyncio.Event(), [])
        return key

    def _fire(self, key: int, mode: str) -> None:
        entry = self._drops.get(key)
        if entry is not None:
            entry[1].append(mode)
            entry[0].set()

    def drop_all_watches(self, mode: str = "eof") -> int:
        """End every open watch stream (call on the emulator's loop); returns how many."""
        count = 0
        for event, modes in self._drops.values():
            if not event.is_set():
                modes.append(mode)
                event.set()
                count += 1
        return count

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        key = id(request)
        if key not in self._drops:
            self._register_drop(request)
        switch, modes = self._drops[key]
        stream = super()._serve_watch(request)
        dropper = asyncio.ensure_future(switch.wait())
        step: asyncio.Future[Any] | None = None
        try:
            while True:
                step = asyncio.ensure_future(stream.__anext__())
                done, _ = await asyncio.wait({step, dropper},
                                             return_when=asyncio.FIRST_COMPLETED)
                if step in done:
                    try:
                        item = step.result()
                    except StopAsyncIteration:
                        return
                    yield item
                    continue
                if modes and modes[-1] == "gone":
                    yield {"type": "ERROR", "object": {
                        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                        "code": 410, "reason": "Gone",
                        "message": "injected fault: too old resource version"}}
                return
        finally:
            # Also on the client's disconnect (this generator cancelled): stop the inner stream's
            # pending read before closing it, or it is "already running".
            dropper.cancel()
            if step is not None and not step.done():
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
            self._drops.pop(key, None)
            with contextlib.suppress(RuntimeError):
                await stream.aclose()

    def open_watches(self) -> int:
        """How many watch streams are open now (call on the emulator's loop)."""
        return sum(1 for event, _ in self._drops.values() if not event.is_set())


class FaultyEmulatorServer(EmulatorServer):
    """:class:`kube_server.EmulatorServer` serving a :class:`FaultyKubernetes`."""

    def __init__(self, *, seed: int = 0, faults: list[Fault] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self._initial = list(faults or [])
        self.emulator: FaultyKubernetes | None = None

    async def _serve(self) -> None:
        # As EmulatorServer._serve, with the faulty emulator.
        self._stop = asyncio.Event()
        emulator = FaultyKubernetes(crd_schema=self.schema, with_jobset=self.with_jobset,
                                    faults=self._initial, seed=self.seed)
        kwargs = {"port": self._port} if self._port else {}
        async with emulator, kmock.Server(emulator, **kwargs) as server:
            self.emulator = emulator
            self.port = server.port
            self._ready.set()
            await self._stop.wait()

    @property
    def faulty(self) -> FaultyKubernetes:
        assert self.emulator is not None
        return self.emulator

    def add(self, *faults: Fault) -> None:
        """Add rules (they apply from the next request on)."""
        async def add() -> None:
            self.faulty.faults.extend(faults)
        self.call(add)

    def clear(self) -> None:
        """Remove every rule: the API behaves from now on."""
        async def clear() -> None:
            self.faulty.faults.clear()
        self.call(clear)

    def drop_watches(self, mode: str = "eof") -> int:
        """End every open watch stream now; returns how many were open."""
        async def drop() -> int:
            return self.faulty.drop_all_watches(mode)
        return int(self.call(drop))

    def open_watches(self) -> int:
        async def count() -> int:
            return self.faulty.open_watches()
        return int(self.call(count))

    def journal(self) -> list[tuple[str, str | None, str | None, str | None, bool, str, str]]:
        """A copy of every request seen so far, with what happened to it."""
        async def copy() -> list[Any]:
            return list(self.faulty.journal)
        return list(self.call(copy))
