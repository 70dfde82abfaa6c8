"""A Kubernetes API emulator for operator tests: kmock 0.8 with the fixes that kmock.md lists.

Stock kmock is an in-memory object store over real HTTP. This subclass makes it behave enough like
a kube-apiserver that a real ``kopf run`` and our trainer can talk to it:

- discovery seeded with exactly the resources dptrain uses (v1 namespaces, our CRD with its
  ``status`` subresource, batch/v1 jobs, configmaps, services, serviceaccounts, RBAC roles and
  rolebindings, v1 and events.k8s.io events, kopf's ClusterKopfPeering and KopfPeering; JobSet
  only when asked);
- ``uid``, ``resourceVersion``, ``creationTimestamp``, ``generation`` and the namespace from the
  URL stamped on create; ``generateName`` honoured; ``resourceVersion`` bumped on every write and
  ``generation`` on spec changes; 409 on duplicates and on a stale ``resourceVersion``;
- RFC 7386 merge-patch (``null`` deletes, any type replaces any type) and RFC 6902 JSON-patch, a
  failed JSON-patch ``test`` answering 422 as the API server does;
- ``/status`` semantics for resources with a status subresource: writes to the main resource
  cannot change ``status``, writes to ``/status`` change nothing else, status on create is dropped;
- every write of a DPTrainingJob validated against the generated CRD's ``openAPIV3Schema``
  (422 ``Invalid`` naming the field, like the API server);
- list responses with ``apiVersion``/``kind``/``resourceVersion`` and equality label selectors;
- owner-reference garbage collection (background propagation) when an object goes away, and of
  an object created with owners that are all gone;
- ``GET /api/v1/namespaces`` no longer crashes kmock's path parser;
- ``immutable: true`` ConfigMaps refuse changes of ``data``/``binaryData``/``immutable`` (422);
- RBAC for ServiceAccount tokens: a bearer token registered with :meth:`grant_token` is the
  ServiceAccount it names, and its requests are authorised against the Roles bound to it by the
  RoleBindings stored in the emulator (403 ``Forbidden`` otherwise, as the API server answers).
  Other tokens (the operator's, the tests') are cluster admins.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import secrets
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonschema
import kmock
from kmock._internal import apps, enums, parsing, references, rendering

# ------------------------------------------------------------------------------ path parser fix

_original_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock 0.8 crashes on ``/api/v1/namespaces`` (a cluster-scoped list); parse it here."""
    parts = [p for p in path.strip("/").split("/") if p]
    if parts in (["api", "v1", "namespaces"],):
        return parsing.ParsedPath("", "v1", "namespaces", None, None, None)
    if len(parts) == 4 and parts[:3] == ["api", "v1", "namespaces"]:
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3], None)
    return _original_parse_path(path)


parsing.parse_path = _parse_path

# ------------------------------------------------------------------------------ resources

CRD_RESOURCE = "dptrain.io/v1alpha1/dptrainingjobs"
DATASET_RESOURCE = "dptrain.io/v1alpha1/dpdatasets"
JOBSET_RESOURCE = "jobset.x-k8s.io/v1alpha2/jobsets"
PEERING_RESOURCE = "kopf.dev/v1/clusterkopfpeerings"
NAMESPACED_PEERING_RESOURCE = "kopf.dev/v1/kopfpeerings"

_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]

# resource -> (kind, namespaced, subresources)
BASE_RESOURCES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "v1/namespaces": ("Namespace", False, ("status",)),
    "v1/configmaps": ("ConfigMap", True, ()),
    "v1/secrets": ("Secret", True, ()),
    "v1/services": ("Service", True, ("status",)),
    "v1/serviceaccounts": ("ServiceAccount", True, ()),
    "v1/events": ("Event", True, ()),
    "v1/pods": ("Pod", True, ("status",)),
    "events.k8s.io/v1/events": ("Event", True, ()),
    "batch/v1/jobs": ("Job", True, ("status",)),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True, ()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True, ()),
    CRD_RESOURCE: ("DPTrainingJob", True, ("status",)),
    DATASET_RESOURCE: ("DPDataset", True, ("status",)),
    # kopf peering (HA replicas): status is a plain field there, as in kopf's own CRDs.
    PEERING_RESOURCE: ("ClusterKopfPeering", False, ()),
    NAMESPACED_PEERING_RESOURCE: ("KopfPeering", True, ()),
}


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    # details={} keeps kmock from attaching a server traceback to the Status object.
    return kmock.KubernetesError(status=status, reason=reason, message=message,
                                 details={"causes": []})


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge-patch: ``null`` deletes a key, non-objects replace wholesale."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _path_of(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "<root>"


def schema_errors(validator: jsonschema.protocols.Validator, obj: Mapping[str, Any]) -> list[str]:
    """API-server-like messages (``field: rule``) for every schema violation of ``obj``."""
    errors = sorted(validator.iter_errors(dict(obj)), key=lambda e: list(map(str, e.path)))
    return [f"{_path_of(e)}: Invalid value: {e.message}" for e in errors]


def label_selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Equality-based selectors (``a=b,c!=d,e``) as ``kubectl -l`` sends them."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@attrs.define(kw_only=True)
class DPTrainKubernetes(kmock.KubernetesEmulator):
    """kmock's emulator with the fixes above (see the module docstring)."""

    crd_schema: Mapping[str, Any] | None = None
    with_jobset: bool = False
    #: Hook for fault injection: called with each parsed request; may raise a KubernetesError.
    fault: Callable[[rendering.Request], None] | None = None
    #: How many past requests kmock keeps (0: all, as stock kmock does).
    request_history: int = 512

    #: Bearer token -> (namespace, ServiceAccount name): requests with it are RBAC-checked.
    service_account_tokens: dict[str, tuple[str, str]] = attrs.field(factory=dict)

    _rv: Iterable[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _last_rv: int = attrs.field(default=0, init=False)
    _validator: Any = attrs.field(default=None, init=False)
    _dataset_validator: Any = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        resources = dict(BASE_RESOURCES)
        if self.with_jobset:
            resources[JOBSET_RESOURCE] = ("JobSet", True, ("status",))
        for key, (kind, namespaced, subresources) in resources.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, singular=kind.lower(), verbs=_VERBS,
                subresources=subresources,
                shortnames={"DPTrainingJob": {"dptj"}, "DPDataset": {"dpds"}}.get(kind, set()),
            )
        if self.crd_schema is not None:
            cls = jsonschema.validators.validator_for(self.crd_schema, jsonschema.Draft7Validator)
            self._validator = cls(self.crd_schema)
            from dptrain.api import DPDataset, _crd

            dataset_schema = _crd.validating_schema(strict=True, model=DPDataset)
            cls = jsonschema.validators.validator_for(dataset_schema, jsonschema.Draft7Validator)
            self._dataset_validator = cls(dataset_schema)

    # ----------------------------------------------------------------------- helpers

    def _next_rv(self) -> str:
        self._last_rv = next(self._rv)  # type: ignore[call-overload]
        return str(self._last_rv)

    def _info(self, resource: references.resource) -> kmock.ResourceInfo | None:
        for known in self.resources:
            if known == resource:
                return self.resources[known]
        return None

    def _validate(self, resource: references.resource, obj: Mapping[str, Any]) -> None:
        if resource == references.resource(CRD_RESOURCE):
            validator, kind = self._validator, "DPTrainingJob"
        elif resource == references.resource(DATASET_RESOURCE):
            validator, kind = self._dataset_validator, "DPDataset"
        else:
            return
        if validator is None:
            return
        problems = schema_errors(validator, obj)
        if problems:
            name = obj.get("metadata", {}).get("name", "")
            raise _error(422, "Invalid",
                         f'{kind}.dptrain.io "{name}" is invalid: ' + "; ".join(problems))

    async def _broadcast(self, resource: references.resource, kind: str,
                         obj: Mapping[str, Any]) -> None:
        await self._buses[resource].put({"type": kind, "object": copy.deepcopy(dict(obj))})

    def _live(self, key: tuple[references.resource, str | None, str]) -> bool:
        return key in self.objects and not self.objects[key].deleted

    async def _remove(self, key: tuple[references.resource, str | None, str]) -> None:
        """Physically delete an object, then its dependents (background propagation)."""
        obj = self.objects[key]
        raw = copy.deepcopy(obj.raw)
        raw["metadata"]["resourceVersion"] = self._next_rv()
        obj.delete()
        await self._broadcast(key[0], "DELETED", raw)
        uid = raw["metadata"].get("uid")
        for other_key in list(self.objects.keys()):
            if not self._live(other_key):
                continue
            refs = self.objects[other_key].get("metadata", {}).get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in refs):
                await self._remove(other_key)

    # ----------------------------------------------------------------------- request handling

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # kmock 0.8 matches every read against its whole request history (``request in
        # payload._source`` scans all past requests through the filters): quadratic, ~0.3 s
        # per GET after a few thousand requests. Only requests still being served need to be
        # there, so keep a bounded tail (this request is the last one).
        if self.request_history and len(self._requests) > self.request_history:
            del self._requests[:len(self._requests) - self.request_history]
        if self.fault is not None:
            self.fault(request)
        self._authorize(request)
        if request.resource is None:
            return await apps.RawHandler._handle(self, request)
        if request.method == enums.method.PUT:
            raise _error(405, "MethodNotAllowed", "PUT is not supported by this emulator")
        # Writes are served here (not by kmock's reactions) so that the stamped object is returned.
        async with self._lock:
            if request.action == enums.action.CREATE:
                return aiohttp.web.json_response(await self._create(request), status=201)
            if request.action == enums.action.UPDATE and request.name is not None:
                return aiohttp.web.json_response(await self._patch(request))
            if request.action == enums.action.DELETE and request.name is not None:
                return aiohttp.web.json_response(await self._delete(request))
        return await apps.RawHandler._handle(self, request)

    # ----------------------------------------------------------------------- RBAC

    def grant_token(self, token: str, namespace: str, service_account: str) -> None:
        """Requests bearing ``token`` act as ServiceAccount ``namespace/service_account``."""
        self.service_account_tokens[token] = (namespace, service_account)

    def _verb(self, request: rendering.Request) -> str:
        if request.action == enums.action.WATCH:
            return "watch"
        method = request.method.value
        if method == "GET":
            return "get" if request.name is not None else "list"
        return {"POST": "create", "PATCH": "patch", "PUT": "update",
                "DELETE": "delete"}.get(method, method.lower())

    def _authorize(self, request: rendering.Request) -> None:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        subject = self.service_account_tokens.get(token)
        if subject is None:
            return  # not a ServiceAccount token: an admin (the operator, the tests)
        namespace, account = subject
        resource = request.resource
        group = resource.group if resource is not None else ""
        plural = resource.plural if resource is not None else ""
        target = f"{plural}/{request.subresource}" if request.subresource else plural
        verb = self._verb(request)
        roles_key = references.resource("rbac.authorization.k8s.io/v1/roles")
        bindings_key = references.resource("rbac.authorization.k8s.io/v1/rolebindings")
        bound: set[str] = set()
        for (res, ns, _), obj in list(self.objects.items()):
            if res != bindings_key or obj.deleted or ns != request.namespace:
                continue
            raw = obj.raw
            if any(s.get("kind") == "ServiceAccount" and s.get("name") == account
                   and s.get("namespace", ns) == namespace for s in raw.get("subjects") or []):
                bound.add((raw.get("roleRef") or {}).get("name", ""))
        for (res, ns, name), obj in list(self.objects.items()):
            if res != roles_key or obj.deleted or ns != request.namespace or name not in bound:
                continue
            for rule in obj.raw.get("rules") or []:
                if (group in rule.get("apiGroups", []) and target in rule.get("resources", [])
                        and (verb in rule.get("verbs", []) or "*" in rule.get("verbs", []))
                        and (not rule.get("resourceNames")
                             or request.name in rule["resourceNames"])):
                    return
        user = f"system:serviceaccount:{namespace}:{account}"
        raise _error(403, "Forbidden",
                     f'{target}{"." + group if group else ""} "{request.name or ""}" is '
                     f'forbidden: User "{user}" cannot {verb} resource "{target}" in API group '
                     f'"{group}" in the namespace "{request.namespace}"')

    async def _create(self, request: rendering.Request) -> dict[str, Any]:
        assert request.resource is not None
        if not isinstance(request.data, Mapping):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        obj: dict[str, Any] = copy.deepcopy(dict(request.data))
        info = self._info(request.resource)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _error(400, "BadRequest", "metadata must be an object")
        if request.namespace is not None:
            if meta.get("namespace") not in (None, request.namespace):
                raise _error(400, "BadRequest",
                             "the namespace of the object does not match the namespace of the URL")
            meta["namespace"] = request.namespace
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{secrets.token_hex(3)[:5]}"
            else:
                raise _error(422, "Invalid", "metadata.name: Required value: name is required")
        if info is not None and info.kind and "kind" not in obj:
            obj["kind"] = info.kind
        if "apiVersion" not in obj:
            group, version = request.resource.group, request.resource.version
            obj["apiVersion"] = f"{group}/{version}" if group else str(version)
        if info is not None and "status" in info.subresources:
            obj.pop("status", None)  # the status of a new object is the controllers' to write
        self._validate(request.resource, obj)
        key = (request.resource, meta.get("namespace"), meta["name"])
        if self._live(key):
            raise _error(409, "AlreadyExists",
                         f'{request.resource.plural} "{meta["name"]}" already exists')
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self._next_rv()
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        if key in self.objects:
            self.objects[key].create(obj)
        else:
            self.objects[key] = obj
        await self._broadcast(request.resource, "ADDED", obj)
        owners = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
        if owners and not owners & self._live_uids():
            # The garbage collector deletes a dependent whose owners are all gone (an object
            # created for an owner deleted a moment before): do it at once.
            await self._remove(key)
        return copy.deepcopy(obj)

    def _live_uids(self) -> set[str]:
        return {o.raw.get("metadata", {}).get("uid") for k, o in list(self.objects.items())
                if not o.deleted}

    async def _patch(self, request: rendering.Request) -> dict[str, Any]:
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        if not self._live(key):
            raise _error(404, "NotFound", f'{request.resource.plural} "{request.name}" not found')
        old = copy.deepcopy(self.objects[key].raw)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        data = request.data
        if content_type == "application/json-patch+json" or isinstance(data, list):
            try:
                new = jsonpatch.apply_patch(old, data, in_place=False)
            except jsonpatch.JsonPatchTestFailed as e:
                raise _error(422, "Invalid", f"the JSON patch test failed: {e}") from e
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise _error(422, "Invalid", f"the JSON patch is invalid: {e}") from e
        elif content_type == "application/apply-patch+yaml":
            raise _error(415, "UnsupportedMediaType", "server-side apply is not supported")
        elif isinstance(data, Mapping):
            wanted_rv = (data.get("metadata") or {}).get("resourceVersion")
            if wanted_rv is not None and str(wanted_rv) != old["metadata"]["resourceVersion"]:
                raise _error(409, "Conflict",
                             "the object has been modified; please apply your changes to the "
                             "latest version and try again")
            new = merge_patch(old, data)
        else:
            raise _error(400, "BadRequest", "the patch must be a JSON object or a JSON patch")
        info = self._info(request.resource)
        if info is not None and "status" in info.subresources:
            if request.subresource == "status":
                new = dict(old, status=new.get("status")) if "status" in new else {
                    k: v for k, v in old.items() if k != "status"}
            elif "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        if old.get("immutable") is True and any(
                new.get(k) != old.get(k) for k in ("data", "binaryData", "immutable")):
            raise _error(422, "Invalid", f'{info.kind if info else "object"} '
                         f'"{request.name}" is invalid: data: Forbidden: field is immutable '
                         "when `immutable` is set")
        new_meta = new.setdefault("metadata", {})
        for field in ("name", "namespace", "uid", "creationTimestamp"):
            if field in old["metadata"]:
                new_meta[field] = old["metadata"][field]
        self._validate(request.resource, new)
        spec_old = {k: v for k, v in old.items() if k not in ("metadata", "status")}
        spec_new = {k: v for k, v in new.items() if k not in ("metadata", "status")}
        generation = int(old["metadata"].get("generation", 1))
        new_meta["generation"] = generation + 1 if spec_old != spec_new else generation
        new_meta["resourceVersion"] = self._next_rv()
        self.objects[key].create(new)  # a new version in kmock's history
        if new_meta.get("deletionTimestamp") and not new_meta.get("finalizers"):
            await self._remove(key)
        else:
            await self._broadcast(request.resource, "MODIFIED", new)
        return copy.deepcopy(new)

    async def _delete(self, request: rendering.Request) -> dict[str, Any]:
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        if not self._live(key):
            raise _error(404, "NotFound", f'{request.resource.plural} "{request.name}" not found')
        obj = self.objects[key]
        meta = obj.raw.get("metadata", {})
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                new = copy.deepcopy(obj.raw)
                new["metadata"]["deletionTimestamp"] = _now()
                new["metadata"]["resourceVersion"] = self._next_rv()
                obj.create(new)
                await self._broadcast(request.resource, "MODIFIED", new)
            return copy.deepcopy(obj.raw)
        last = copy.deepcopy(obj.raw)
        await self._remove(key)
        return last

    # ----------------------------------------------------------------------- reads

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        payload = await super()._serve_list(request)
        assert isinstance(payload, dict)
        selector = request.params.get("labelSelector")
        if selector:
            payload["items"] = [
                item for item in payload["items"]
                if label_selector_matches(selector, item.get("metadata", {}).get("labels") or {})
            ]
        info = self._info(request.resource) if request.resource is not None else None
        assert request.resource is not None
        group, version = request.resource.group, request.resource.version
        payload["apiVersion"] = f"{group}/{version}" if group else str(version)
        payload["kind"] = f"{info.kind}List" if info is not None and info.kind else "List"
        payload["metadata"] = {"resourceVersion": str(self._last_rv)}
        return payload

    # ----------------------------------------------------------------------- test conveniences

    def live_objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Snapshots of the live objects of one resource (call on the emulator's loop)."""
        res = references.resource(resource)
        return [copy.deepcopy(obj.raw) for (r, ns, _), obj in list(self.objects.items())
                if r == res and not obj.deleted and (namespace is None or ns == namespace)]


def dumps(obj: Any) -> str:
    """Compact JSON for request bodies."""
    return json.dumps(obj, separators=(",", ":"))

