"""Object storage (``s3://``, ``gs://``, ``file://``) through fsspec: s3fs, gcsfs, the local disk.

The URIs are ``spec.data.uri`` and ``spec.checkpoint.uri`` (parsed and validated by
``dptrain.api.parse_object_uri``). Credentials are the filesystems' own default chains: for S3
botocore's (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, an S3-compatible
endpoint from ``AWS_ENDPOINT_URL``, EKS IRSA and Pod Identity, instance profiles), for GCS
google-auth's (``GOOGLE_APPLICATION_CREDENTIALS``, GKE Workload Identity, the metadata server).
The operator puts a ``secretRef``'s keys into that environment; nothing here reads a secret.

:class:`RemoteDir` is the little dptrain needs of a remote directory: whole-object reads and
writes (one PUT: an object is replaced whole or not at all, which makes a ledger record or a
commit marker atomic), listings, and copying directory trees up and down. Failures raise
:class:`StorageError` naming the spec field and the URI.
"""

from __future__ import annotations

import os
import pathlib
import posixpath
from collections.abc import Iterator
from typing import Any

from dptrain.api import parse_object_uri

_PROTOCOLS = {"s3": "s3", "gs": "gcs", "file": "file"}
_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "file": "fsspec"}


class StorageError(OSError):
    """Object storage failed or is unusable; the message names the field and the URI."""


def filesystem(uri: str, field: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``uri`` and the path inside it (``bucket/key`` or ``/path``).

    Raises:
        StorageError: an invalid URI or a missing filesystem package (names ``field``).
    """
    try:
        location = parse_object_uri(uri)
    except ValueError as error:
        raise StorageError(f"{field}: {error}") from None
    try:
        import fsspec

        # Object stores have no directories; the local disk must make them on write.
        options = {} if location.remote else {"auto_mkdir": True}
        fs = fsspec.filesystem(_PROTOCOLS[location.scheme], **options)
    except ImportError:
        raise StorageError(f"{field}: {location.scheme}:// needs the {_PACKAGES[location.scheme]} "
                           "package (pip install 'dptrain[storage]')") from None
    if location.remote:
        path = f"{location.bucket}/{location.key}" if location.key else location.bucket
    else:
        path = location.key
    return fs, path.rstrip("/") or "/"


class RemoteDir:
    """A directory (key prefix) in object storage, addressed by names relative to it.

    Attributes:
        uri: the directory's URI.
        field: the spec field it comes from (error messages name it).
    """

    def __init__(self, uri: str, *, field: str) -> None:
        self.uri = uri.rstrip("/")
        self.field = field
        self.fs, self.root = filesystem(uri, field)

    def path(self, name: str = "") -> str:
        """The filesystem path of ``name`` (relative to the directory)."""
        return posixpath.join(self.root, name) if name else self.root

    def url(self, name: str = "") -> str:
        """The URI of ``name``."""
        return f"{self.uri}/{name}" if name else self.uri

    def _error(self, action: str, name: str, error: BaseException) -> StorageError:
        return StorageError(f"{self.field}: cannot {action} {self.url(name)}: "
                            f"{type(error).__name__}: {error}")

    def read_bytes(self, name: str) -> bytes | None:
        """The object ``name``'s bytes, or ``None`` when it does not exist."""
        try:
            return bytes(self.fs.cat_file(self.path(name)))
        except FileNotFoundError:
            return None
        except Exception as error:
            raise self._error("read", name, error) from error

    def write_bytes(self, name: str, data: bytes) -> None:
        """Store ``data`` as the object ``name`` in one PUT (all or nothing)."""
        try:
            self.fs.pipe_file(self.path(name), data)
        except Exception as error:
            raise self._error("write", name, error) from error

    def exists(self, name: str) -> bool:
        """Whether the object (or prefix) ``name`` exists."""
        try:
            self.fs.invalidate_cache(self.path(name))
            return bool(self.fs.exists(self.path(name)))
        except Exception as error:
            raise self._error("look up", name, error) from error

    def files(self, name: str = "") -> list[str]:
        """Every object under ``name``, as names relative to the directory, sorted."""
        base = self.path(name)
        try:
            self.fs.invalidate_cache(base)
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        except Exception as error:
            raise self._error("list", name, error) from error
        # s3fs/gcsfs answer bucket/key, the local filesystem absolute paths: both under root.
        root = self.root.rstrip("/") + "/"
        return sorted(p[len(root):] for p in found if p.startswith(root))

    def is_file(self, name: str = "") -> bool:
        """Whether ``name`` is an object (not a prefix)."""
        try:
            self.fs.invalidate_cache(self.path(name))
            return bool(self.fs.isfile(self.path(name)))
        except Exception as error:
            raise self._error("look up", name, error) from error

    def open(self, name: str, mode: str = "rb") -> Any:
        """A streaming file object of the object ``name``."""
        try:
            return self.fs.open(self.path(name), mode)
        except FileNotFoundError:
            raise
        except Exception as error:
            raise self._error("open", name, error) from error

    def upload(self, local: pathlib.Path, name: str) -> None:
        """Copy the tree ``local`` to ``name`` (file by file)."""
        for path in _walk(local):
            rel = path.relative_to(local).as_posix()
            try:
                self.fs.put_file(str(path), self.path(posixpath.join(name, rel)))
            except Exception as error:
                raise self._error("upload to", posixpath.join(name, rel), error) from error

    def publish(self, local: pathlib.Path, names: tuple[str, ...], *, under: str = "") -> None:
        """Copy the files ``names`` of directory ``local`` that exist to ``under/name`` here."""
        for name in names:
            if (local / name).is_file():
                target = posixpath.join(under, name) if under else name
                try:
                    self.fs.put_file(str(local / name), self.path(target))
                except Exception as error:
                    raise self._error("upload to", target, error) from error

    def download(self, name: str, local: pathlib.Path) -> None:
        """Copy the tree under ``name`` into ``local``."""
        prefix = name.rstrip("/") + "/"
        for rel in self.files(name):
            target = local / rel[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(self.path(rel), str(target))
            except Exception as error:
                raise self._error("download", rel, error) from error

    def remove(self, name: str) -> None:
        """Delete the object or tree ``name`` (absent is fine)."""
        try:
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as error:
            raise self._error("delete", name, error) from error


def _walk(root: pathlib.Path) -> Iterator[pathlib.Path]:
    for directory, _, names in os.walk(root):
        for file in sorted(names):
            yield pathlib.Path(directory) / file
