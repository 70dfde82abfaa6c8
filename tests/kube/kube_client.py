"""A tiny synchronous REST client for tests: what `kubectl apply/get/patch/delete` would send."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from dptrain.operator._kube import resource_path

GROUP_PATH = "/apis/dptrain.io/v1alpha1"


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status}: {body.get('message', body)}")
        self.status = status
        self.body = body


def path_of(resource: str, namespace: str | None = None, name: str | None = None,
            subresource: str | None = None) -> str:
    """``batch/v1/jobs`` → ``/apis/batch/v1/namespaces/NS/jobs/NAME``."""
    *group_version, plural = resource.split("/")
    return resource_path("/".join(group_version), plural, namespace, name, subresource)


class KubeHTTP:
    """JSON over HTTP against the emulator."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token  # a ServiceAccount token: requests are RBAC-checked as that account

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base_url + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as error:
            text = error.read().decode()
            try:
                payload = json.loads(text)
            except ValueError:
                payload = {"message": text}
            raise ApiError(error.code, payload) from None
        return json.loads(text) if text else {}

    def create(self, resource: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path_of(resource, namespace), body)

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path_of(resource, namespace, name))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def list(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return list(self.request("GET", path_of(resource, namespace))["items"])

    def merge_patch(self, resource: str, namespace: str, name: str, body: dict[str, Any],
                    subresource: str | None = None) -> dict[str, Any]:
        return self.request("PATCH", path_of(resource, namespace, name, subresource), body,
                            "application/merge-patch+json")

    def delete(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        return self.request("DELETE", path_of(resource, namespace, name))

    # DPTrainingJob shortcuts
    def create_job(self, manifest: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        return self.create("dptrain.io/v1alpha1/dptrainingjobs", namespace, manifest)

    def get_job(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.get("dptrain.io/v1alpha1/dptrainingjobs", namespace, name)

    def events_for(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        return [e for e in self.list("v1/events", namespace)
                if (e.get("involvedObject") or {}).get("name") == name]
