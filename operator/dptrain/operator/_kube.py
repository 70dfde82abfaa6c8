"""A minimal async Kubernetes REST client for the operator's own reads and writes.

kopf watches and patches the DPTrainingJobs it serves; the children (ConfigMaps, RBAC, Jobs,
Services) and events are plain REST calls. This client reuses the credentials kopf logged in
with (a :class:`kopf.ConnectionInfo`), so both speak to the same server as the same identity.
"""

from __future__ import annotations

import base64
import json
import ssl
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer of the API server.

    Attributes:
        status: the HTTP status.
        reason: the Status object's ``reason`` (e.g. ``AlreadyExists``).
        message: the Status object's ``message``.
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def resource_path(api_version: str, plural: str, namespace: str | None,
                  name: str | None = None, subresource: str | None = None) -> str:
    """The REST path of a collection or an object (``/api/v1/...`` or ``/apis/g/v/...``)."""
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [root]
    if namespace is not None:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name is not None:
        parts.append(name)
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        return False
    context = ssl.create_default_context(
        cafile=str(info.ca_path) if info.ca_path else None,
        cadata=(info.ca_data.decode() if isinstance(info.ca_data, bytes)
                else info.ca_data) if info.ca_data else None)
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
    return context


class KubeClient:
    """get/create/patch/delete on JSON objects; errors as :class:`ApiError`."""

    def __init__(self, info: kopf.ConnectionInfo, *, timeout: float = 30.0) -> None:
        self.server = info.server.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "dptrain-operator"}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            pair = base64.b64encode(f"{info.username}:{info.password}".encode()).decode()
            headers["Authorization"] = f"Basic {pair}"
        self._headers = headers
        self._ssl = _ssl_context(info)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def _request(self, method: str, path: str, *, body: Any = None,
                       content_type: str = "application/json",
                       params: Mapping[str, str] | None = None) -> dict[str, Any]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self._session.request(method, self.server + path, data=data, headers=headers,
                                         params=params, ssl=self._ssl) as response:
            text = await response.text()
            if response.status >= 400:
                try:
                    status = json.loads(text)
                except ValueError:
                    status = {}
                raise ApiError(response.status, str(status.get("reason", response.reason)),
                               str(status.get("message", text[:500])))
            return json.loads(text) if text else {}

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object at ``path``, or None if it does not exist."""
        try:
            return await self._request("GET", path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def list(self, path: str, *, label_selector: str) -> list[dict[str, Any]]:
        """The items of a collection that match ``label_selector`` (filtered server-side)."""
        body = await self._request("GET", path, params={"labelSelector": label_selector})
        return list(body.get("items") or [])

    async def create(self, path: str, body: Mapping[str, Any]) -> bool:
        """Create an object in the collection at ``path``; False if it already existed."""
        try:
            await self._request("POST", path, body=body)
        except ApiError as error:
            if error.status == 409 and error.reason == "AlreadyExists":
                return False
            raise
        return True

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """RFC 7386 merge-patch of the object at ``path``."""
        return await self._request("PATCH", path, body=body, content_type=MERGE_PATCH)

    async def delete(self, path: str) -> bool:
        """Delete (background propagation); False if it was already gone."""
        try:
            await self._request("DELETE", path, body={
                "kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return True

    async def post_event(self, involved: Mapping[str, Any], *, type_: str, reason: str,
                         message: str, now: str) -> None:
        """Post a core/v1 Event about ``involved`` (a job body)."""
        meta = involved["metadata"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                         "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": involved.get("apiVersion"),
                               "kind": involved.get("kind"), "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "dptrain-operator"},
            "reportingComponent": "dptrain-operator",
            "reportingInstance": "dptrain-operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.create(resource_path("v1", "events", meta["namespace"]), event)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
