"""Object-storage locations (``spec.data.uri``, ``spec.checkpoint.uri``) and their credentials.

A URI is ``s3://BUCKET[/KEY]``, ``gs://BUCKET[/KEY]`` or ``file:///ABSOLUTE/PATH``. Buckets follow
the naming rules both clouds share (3–222 characters of lower-case letters, digits, dots, hyphens
and underscores, starting and ending with a letter or digit; S3 is stricter — 63 characters, no
underscores — and refuses the rest itself); keys never hold ``..`` components, NUL or line
breaks. The trainer reads and writes them through fsspec (``dptrain.trainer._storage``).

Credentials come from the pod's identity (EKS IRSA / Pod Identity, GKE Workload Identity: the
clouds' default credential chains) or from :class:`StorageSecretRef`: a Secret whose keys become
the trainer's environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``, ``AWS_ENDPOINT_URL`` for S3-compatible stores), or — with ``keyFile`` — one key
holding a GCP service-account key file, mounted read-only at :data:`STORAGE_SECRET_DIR` and named by
``GOOGLE_APPLICATION_CREDENTIALS``. The Secret's values never enter the ConfigMap, a status or a
log: the kubelet resolves them into the pod.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, StringConstraints, WithJsonSchema

from dptrain.api._base import _Model

SCHEMES = ("s3", "gs", "file")
REMOTE_SCHEMES = frozenset({"s3", "gs"})
#: Where a ``keyFile`` credential is mounted in trainer pods (beside, not inside, the job's key).
STORAGE_SECRET_DIR = "/var/run/secrets/storage.dptrain.io"
ENV_GOOGLE_CREDENTIALS = "GOOGLE_APPLICATION_CREDENTIALS"

_BUCKET = r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]"
_BUCKET_RE = re.compile(rf"^{_BUCKET}$")
_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)(/.*)?$")
_BAD_CHARS = re.compile(r"[\x00\n\r]")
#: The same rule for the API server (CEL, RE2): scheme, bucket, a key without '..' components.
URI_CEL = (f"(self.matches('^(s3|gs)://{_BUCKET}(/[^\\\\x00\\\\n\\\\r]*)?$') || "
           "self.matches('^file:///[^\\\\x00\\\\n\\\\r]*$')) && "
           "!self.contains('/../') && !self.endsWith('/..')")
URI_RULE = ("must be s3://<bucket>/<key>, gs://<bucket>/<key> or file:///<absolute path>, "
            "without '..' components")
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


@dataclasses.dataclass(frozen=True)
class ObjectLocation:
    """A parsed URI.

    Attributes:
        scheme: ``s3``, ``gs`` or ``file``.
        bucket: the bucket (empty for ``file``).
        key: the object key or key prefix without a leading slash (``file``: the absolute path).
    """

    scheme: Literal["s3", "gs", "file"]
    bucket: str
    key: str

    @property
    def remote(self) -> bool:
        """Whether the location is in object storage (not a local path)."""
        return self.scheme in REMOTE_SCHEMES

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.key}"
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else \
            f"{self.scheme}://{self.bucket}"


def parse_object_uri(uri: str) -> ObjectLocation:
    """Split ``uri`` into scheme, bucket and key.

    Raises:
        ValueError: an unknown scheme, a missing or malformed bucket, a relative ``file`` path,
            a ``..`` component, NUL or a line break (the message states the rule broken).
    """
    match = _URI_RE.match(uri)
    if match is None:
        raise ValueError(f"{URI_RULE} (got {uri!r}: no scheme)")
    scheme, host, rest = match.group(1), match.group(2), match.group(3) or ""
    if scheme not in SCHEMES:
        raise ValueError(f"{URI_RULE} (unknown scheme {scheme + '://'!r}; known: "
                         f"{', '.join(s + '://' for s in SCHEMES)})")
    if _BAD_CHARS.search(uri):
        raise ValueError(f"{URI_RULE} (NUL or line break in {uri!r})")
    if ".." in rest.split("/"):
        raise ValueError(f"{URI_RULE} ('..' component in {uri!r})")
    if scheme == "file":
        if host or not rest:
            raise ValueError(f"{URI_RULE} (a file URI names an absolute path: file:///PATH, "
                             f"got {uri!r})")
        return ObjectLocation("file", "", rest)
    if not host:
        raise ValueError(f"{URI_RULE} (no bucket in {uri!r})")
    if not _BUCKET_RE.match(host):
        raise ValueError(f"{URI_RULE} (bucket {host!r}: 3-222 lower-case letters, digits, "
                         "'.', '-' or '_', starting and ending with a letter or digit)")
    return ObjectLocation(scheme, host, rest.strip("/"))  # type: ignore[arg-type]


def _check_uri(value: str) -> str:
    parse_object_uri(value)
    return value


ObjectUri = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048),
    AfterValidator(_check_uri),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 2048,
                    "x-kubernetes-validations": [{"rule": URI_CEL, "message": URI_RULE}]}),
]


class StorageSecretRef(_Model):
    """A Secret in the job's namespace with object-storage credentials.

    Without ``keyFile`` every key of the Secret becomes an environment variable of the trainer
    and data-preparation containers (``envFrom``): ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, or
    any variable the clouds' default credential chains read. With ``keyFile`` only that key is
    used: a GCP service-account key file, mounted read-only and named by
    ``GOOGLE_APPLICATION_CREDENTIALS``.
    """

    name: Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]
    """The Secret's name."""
    key_file: Annotated[str, StringConstraints(pattern=SECRET_KEY_PATTERN,
                                               max_length=253)] | None = None
    """The Secret key holding a GCP service-account key file (JSON)."""
