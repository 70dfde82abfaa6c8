"""Search artefacts for a secret key: its raw bytes, hex (both cases) and base64 (all variants)."""

from __future__ import annotations

import base64
import pathlib
from collections.abc import Iterable


def key_encodings(key: bytes) -> dict[str, bytes]:
    """Every encoding of ``key`` an artefact could hold (and a fingerprint never does)."""
    forms = {
        "raw": key,
        "hex": key.hex().encode(),
        "HEX": key.hex().upper().encode(),
        "base64": base64.b64encode(key),
        "base64url": base64.urlsafe_b64encode(key),
    }
    forms["base64-unpadded"] = forms["base64"].rstrip(b"=")
    forms["base64url-unpadded"] = forms["base64url"].rstrip(b"=")
    return forms


def find_key(key: bytes, files: Iterable[pathlib.Path] = (), texts: dict[str, str] | None = None,
             ) -> list[str]:
    """``"<where>: <encoding>"`` for every occurrence of the key in ``files`` and ``texts``."""
    forms = key_encodings(key)
    hits = []
    blobs = [(str(f), f.read_bytes()) for f in files if f.is_file()]
    blobs += [(name, text.encode()) for name, text in (texts or {}).items()]
    for where, blob in blobs:
        hits += [f"{where}: {name}" for name, form in forms.items() if form in blob]
    return hits


def all_files(*roots: pathlib.Path, exclude: Iterable[pathlib.Path] = ()) -> list[pathlib.Path]:
    """Every regular file under ``roots`` except ``exclude`` (the key file itself)."""
    skip = {p.resolve() for p in exclude}
    return sorted(p for root in roots if root.exists() for p in root.rglob("*")
                  if p.is_file() and p.resolve() not in skip)
