"""Documents → fixed-length sequences (the privacy unit), stored once as a memory-mapped array.

Documents come from JSONL records, text files (one document per file) or the built-in
``stdlib-docs`` corpus (the docstrings of the Python standard library's top-level modules, read
with :mod:`ast` — no import, no download, deterministic for a given Python). Each document becomes
``[BOS] tokens [EOS]``; documents are concatenated and cut into sequences of ``sequence_length``
tokens, so short documents are packed together and long ones split. The final partial sequence is
padded with the pad id (padded targets carry no loss).

A prepared dataset is a directory with ``sequences.npy`` (``[N, L]``, opened memory-mapped) and
``manifest.json`` (N, length, tokenizer, source description and checksum). The manifest is written
last, so its presence means the array is complete.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import platform
import posixpath
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from dptrain.trainer._storage import RemoteDir
from dptrain.trainer._tokenizer import Tokenizer, tokenizer_from_description

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ARRAY_NAME = "sequences.npy"
BUILTIN_STDLIB_DOCS = "stdlib-docs"
_FLUSH_SEQUENCES = 4096

SourceKind = Literal["jsonl", "text", "builtin"]


class DataError(ValueError):
    """Unusable data: the message names the field (``spec.data.*``) and the rule."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DocumentSource:
    """Where documents come from; :meth:`checksum` is cheap (file bytes, no parsing).

    Attributes:
        kind: ``jsonl``, ``text`` or ``builtin``.
        files: the source files, in reading order (with ``store``: object names relative to it).
        name: a human-readable name (path, URI or builtin corpus name).
        text_field: JSONL key of the document text.
        root: directory the file names in the checksum are relative to.
        store: the object-storage directory holding ``files`` (``spec.data.uri``), if any.
    """

    kind: SourceKind
    files: tuple[pathlib.Path, ...] | tuple[str, ...]
    name: str
    text_field: str = "text"
    root: pathlib.Path | None = None
    store: RemoteDir | None = None

    def checksum(self) -> str:
        """SHA-256 over the kind, the settings, and every file's relative name and bytes.

        Objects in storage are hashed over the bytes read from it (streamed), like files.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps({"kind": self.kind, "name": self.name,
                                  "text_field": self.text_field}).encode())
        for file in self.files:
            if self.store is not None:
                rel = str(file)
            else:
                path = pathlib.Path(file)
                rel = str(path.relative_to(self.root) if self.root else path)
            digest.update(rel.encode() + b"\0")
            content = hashlib.sha256()
            with self._open(file, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    content.update(chunk)
            digest.update(content.digest())
        return digest.hexdigest()

    def _open(self, file: pathlib.Path | str, mode: str) -> Any:
        if self.store is None:
            return pathlib.Path(file).open(mode)
        try:
            return self.store.open(str(file), mode)
        except FileNotFoundError:
            raise DataError(f"spec.data.uri: {self.store.url(str(file))} disappeared while "
                            "reading") from None

    def describe(self) -> dict[str, Any]:
        """JSON description for the manifest."""
        info: dict[str, Any] = {"kind": self.kind, "name": self.name, "files": len(self.files)}
        if self.kind == "jsonl":
            info["text_field"] = self.text_field
        if self.kind == "builtin":
            info["python"] = platform.python_version()
        return info

    def documents(self) -> Iterator[str]:
        """Every document's text, in a fixed order."""
        for file in self.files:
            if self.kind == "builtin":
                yield from _docstrings(pathlib.Path(file))
                continue
            where = self.store.url(str(file)) if self.store is not None else str(file)
            # Text mode as open() gives it: UTF-8, universal newlines.
            errors = "replace" if self.kind == "text" else "strict"
            with self._open(file, "rb") as raw, io.TextIOWrapper(
                    raw, encoding="utf-8", errors=errors) as handle:
                if self.kind == "text":
                    yield handle.read()
                else:
                    yield from _jsonl_documents(handle, where, self.text_field)


def _jsonl_documents(handle: Iterator[str], path: str, text_field: str) -> Iterator[str]:
    field = "spec.data.uri" if "://" in path else "spec.data.path"
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{field}: {path} line {number} is not valid JSON "
                            f"({error.msg})") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"spec.data.textField: {path} line {number} has no string field "
                            f"{text_field!r}")
        yield text


def _docstrings(path: pathlib.Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):  # a broken stdlib file is skipped, not fatal
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def stdlib_docs_source() -> DocumentSource:
    """The built-in corpus: docstrings of the standard library's top-level ``*.py`` modules."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = tuple(sorted(root.glob("*.py")))
    if not files:
        raise DataError(f"spec.data.builtin: no standard-library sources found under {root}")
    return DocumentSource(kind="builtin", files=files, name=BUILTIN_STDLIB_DOCS, root=root)


def source_from_spec(*, path: str | None, builtin: str | None, fmt: str, text_field: str,
                     base_dir: pathlib.Path | None = None,
                     uri: str | None = None) -> DocumentSource:
    """The document source a job's ``spec.data`` names.

    Args:
        path: ``spec.data.path`` (relative paths are resolved against ``base_dir``).
        uri: ``spec.data.uri``: an object, or a prefix whose objects are read (``*.jsonl``
            for jsonl, every object for text; names starting with '.' skipped), sorted.
        builtin: ``spec.data.builtin``.
        fmt: ``spec.data.format`` (``jsonl`` or ``text``; ``prepared`` is handled by the caller).
        text_field: ``spec.data.textField``.
        base_dir: directory relative paths are taken from (default: the working directory).

    Raises:
        DataError: missing files, both or neither of path/builtin, an empty directory.
    """
    if sum(x is not None for x in (path, builtin, uri)) > 1:
        raise DataError("spec.data: set exactly one of path, builtin and uri")
    if uri is not None:
        return uri_source(uri, fmt=fmt, text_field=text_field)
    if builtin is not None:
        if builtin != BUILTIN_STDLIB_DOCS:
            raise DataError(f"spec.data.builtin: unknown corpus {builtin!r} "
                            f"(known: {BUILTIN_STDLIB_DOCS})")
        return stdlib_docs_source()
    if path is None:
        raise DataError("spec.data: one of path, builtin and uri is required")
    resolved = pathlib.Path(path)
    if not resolved.is_absolute() and base_dir is not None:
        resolved = base_dir / resolved
    if not resolved.exists():
        raise DataError(f"spec.data.path: no such file or directory: {resolved}")
    if fmt not in ("jsonl", "text"):
        raise DataError(f"spec.data.format: expected jsonl or text here (got {fmt!r})")
    if resolved.is_dir():
        pattern = "*.jsonl" if fmt == "jsonl" else "*"
        files = tuple(sorted(p for p in resolved.rglob(pattern)
                             if p.is_file() and not p.name.startswith(".")))
        if not files:
            raise DataError(f"spec.data.path: directory {resolved} holds no "
                            f"{'*.jsonl ' if fmt == 'jsonl' else ''}files")
        root = resolved
    else:
        files, root = (resolved,), resolved.parent
    kind: SourceKind = "jsonl" if fmt == "jsonl" else "text"
    return DocumentSource(kind=kind, files=files, name=str(resolved), text_field=text_field,
                          root=root)


def uri_source(uri: str, *, fmt: str, text_field: str) -> DocumentSource:
    """The documents at ``spec.data.uri`` (see :func:`source_from_spec`).

    Raises:
        DataError: nothing there, no matching objects, a bad URI (names the field).
        StorageError: the storage cannot be reached or refuses the credentials (names the
            field): an error to retry, not bad input.
    """
    if fmt not in ("jsonl", "text"):
        raise DataError(f"spec.data.format: expected jsonl or text here (got {fmt!r})")
    store = RemoteDir(uri, field="spec.data.uri")
    if store.is_file():
        parent, _, name = uri.rstrip("/").rpartition("/")
        files: tuple[str, ...] = (name,)
        store = RemoteDir(parent, field="spec.data.uri")
    else:
        names = store.files()
        files = tuple(n for n in names
                      if not posixpath.basename(n).startswith(".")
                      and (fmt == "text" or n.endswith(".jsonl")))
        if not names:
            raise DataError(f"spec.data.uri: no such object or prefix: {uri}")
        if not files:
            raise DataError(f"spec.data.uri: {uri} holds no "
                            f"{'*.jsonl ' if fmt == 'jsonl' else ''}objects")
    kind: SourceKind = "jsonl" if fmt == "jsonl" else "text"
    return DocumentSource(kind=kind, files=files, name=uri.rstrip("/"), text_field=text_field,
                          store=store)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetManifest:
    """What a prepared dataset holds.

    Attributes:
        num_sequences: N, the number of privacy units.
        sequence_length: tokens per sequence.
        dtype: numpy dtype name of the stored ids.
        tokenizer: the tokenizer's description.
        source: the document source's description.
        source_checksum: :meth:`DocumentSource.checksum` of the source it was built from.
        num_documents: documents read.
        num_tokens: tokens stored, padding excluded.
        canaries: token sequences inserted as extra sequences (memorization audits), if any.
        canary_repeats: how many copies of each canary were inserted.
    """

    num_sequences: int
    sequence_length: int
    dtype: str
    tokenizer: dict[str, Any]
    source: dict[str, Any]
    source_checksum: str
    num_documents: int
    num_tokens: int
    canaries: tuple[tuple[int, ...], ...] = ()
    canary_repeats: int = 0
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = dataclasses.asdict(self)
        out["canaries"] = [list(c) for c in self.canaries]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetManifest:
        """Inverse of :meth:`to_dict`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["canaries"] = tuple(tuple(int(t) for t in c) for c in data.get("canaries", ()))
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset opened for reading.

    Attributes:
        directory: where it lies.
        manifest: its manifest.
        sequences: ``[N, L]`` memory-mapped token ids.
    """

    directory: pathlib.Path
    manifest: DatasetManifest
    sequences: np.ndarray

    @property
    def num_sequences(self) -> int:
        """N."""
        return self.manifest.num_sequences

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the sequences were made with."""
        return tokenizer_from_description(self.manifest.tokenizer)

    def gather(self, indices: np.ndarray, pad_id: int) -> np.ndarray:
        """Rows ``indices`` as int32; an index of -1 (padding) gives a row of ``pad_id``."""
        safe = np.where(indices >= 0, indices, 0)
        rows = np.asarray(self.sequences[np.sort(safe)], dtype=np.int32)
        # Memory-mapped reads are fastest in file order; undo the sort afterwards.
        rows = rows[np.argsort(np.argsort(safe, kind="stable"), kind="stable")]
        rows[indices < 0] = pad_id
        return rows


def _pack(documents: Iterator[str], tokenizer: Tokenizer, length: int,
          sink: Any) -> tuple[int, int, int]:
    """Pack/split documents into rows of ``length`` written to ``sink``; returns counts."""
    buffer: list[int] = []
    rows: list[list[int]] = []
    num_docs = num_tokens = num_rows = 0

    def flush() -> None:
        nonlocal num_rows
        if rows:
            np.asarray(rows, dtype=np.int64).tofile(sink)
            num_rows += len(rows)
            rows.clear()

    for text in documents:
        ids = tokenizer.encode(text)
        if not ids:
            continue
        num_docs += 1
        buffer.extend([tokenizer.bos_id, *ids, tokenizer.eos_id])
        num_tokens += len(ids) + 2
        while len(buffer) >= length:
            rows.append(buffer[:length])
            del buffer[:length]
            if len(rows) >= _FLUSH_SEQUENCES:
                flush()
    if buffer:
        rows.append(buffer + [tokenizer.pad_id] * (length - len(buffer)))
    flush()
    return num_docs, num_tokens, num_rows


def prepare_dataset(source: DocumentSource, tokenizer: Tokenizer, *, sequence_length: int,
                    out_dir: str | os.PathLike[str],
                    canaries: Sequence[Sequence[int]] = (), canary_repeats: int = 0,
                    progress: bool = True) -> PreparedDataset:
    """Tokenize, pack and store ``source`` under ``out_dir``; returns the opened dataset.

    Canaries (token sequences of at most ``sequence_length``) are appended as standalone,
    padded sequences, each ``canary_repeats`` times.

    Raises:
        DataError: the corpus yields no tokens, or a canary is longer than a sequence.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until the manifest is rewritten
    raw_path = out / "sequences.raw.tmp"
    checksum = source.checksum()
    docs = tqdm(source.documents(), desc=f"tokenizing {source.name}", unit="doc",
                disable=not progress, leave=False)
    with raw_path.open("wb") as sink:
        num_docs, num_tokens, num_rows = _pack(iter(docs), tokenizer, sequence_length, sink)
        for canary in canaries:
            if len(canary) > sequence_length:
                raise DataError(f"canary of {len(canary)} tokens is longer than "
                                f"spec.data.sequenceLength {sequence_length}")
            row = list(canary) + [tokenizer.pad_id] * (sequence_length - len(canary))
            np.asarray([row] * canary_repeats, dtype=np.int64).reshape(
                -1, sequence_length).tofile(sink)
            num_rows += canary_repeats
            num_tokens += len(canary) * canary_repeats
    if num_rows == 0:
        raw_path.unlink()
        raise DataError(f"spec.data: the corpus {source.name} is empty (no tokens)")
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32
    raw = np.memmap(raw_path, dtype=np.int64, mode="r", shape=(num_rows, sequence_length))
    array = np.lib.format.open_memmap(out / ARRAY_NAME, mode="w+", dtype=dtype,
                                      shape=(num_rows, sequence_length))
    for start in range(0, num_rows, _FLUSH_SEQUENCES):
        array[start:start + _FLUSH_SEQUENCES] = raw[start:start + _FLUSH_SEQUENCES]
    array.flush()
    del array, raw
    raw_path.unlink()
    manifest = DatasetManifest(
        num_sequences=num_rows, sequence_length=sequence_length, dtype=np.dtype(dtype).name,
        tokenizer=tokenizer.describe(), source=source.describe(), source_checksum=checksum,
        num_documents=num_docs, num_tokens=num_tokens,
        canaries=tuple(tuple(int(t) for t in c) for c in canaries),
        canary_repeats=canary_repeats if canaries else 0)
    _write_json_atomic(out / MANIFEST_NAME, manifest.to_dict())
    return load_dataset(out)


def load_dataset(directory: str | os.PathLike[str]) -> PreparedDataset:
    """Open a prepared dataset (memory-mapped).

    Raises:
        DataError: no manifest, or the array does not match it.
    """
    path = pathlib.Path(directory)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataError(f"spec.data.path: {path} is not a prepared dataset (no {MANIFEST_NAME})")
    manifest = DatasetManifest.from_dict(json.loads(manifest_path.read_text()))
    sequences = np.load(path / ARRAY_NAME, mmap_mode="r")
    expected = (manifest.num_sequences, manifest.sequence_length)
    if sequences.shape != expected:
        raise DataError(f"spec.data.path: {path / ARRAY_NAME} has shape {sequences.shape}, "
                        f"manifest says {expected}")
    return PreparedDataset(directory=path, manifest=manifest, sequences=sequences)


def fetch_prepared(uri: str, out_dir: str | os.PathLike[str]) -> PreparedDataset:
    """Download the prepared dataset at ``uri`` (``format: prepared``) into ``out_dir``, open it.

    A copy already there with the same manifest is reused; the manifest is written last, so a
    partial download is never opened as complete.

    Raises:
        DataError: no prepared dataset at ``uri`` (names ``spec.data.uri``).
        StorageError: the storage cannot be reached or refuses the credentials.
    """
    out = pathlib.Path(out_dir)
    try:
        store = RemoteDir(uri, field="spec.data.uri")
        manifest = store.read_bytes(MANIFEST_NAME)
        if manifest is None:
            raise DataError(f"spec.data.uri: {uri} is not a prepared dataset (no {MANIFEST_NAME})")
        local = out / MANIFEST_NAME
        if not (local.is_file() and local.read_bytes() == manifest
                and (out / ARRAY_NAME).is_file()):
            out.mkdir(parents=True, exist_ok=True)
            local.unlink(missing_ok=True)
            store.fs.get_file(store.path(ARRAY_NAME), str(out / ARRAY_NAME))
            tmp = out / f".{MANIFEST_NAME}.tmp"
            tmp.write_bytes(manifest)
            os.replace(tmp, local)
    except FileNotFoundError:
        raise DataError(f"spec.data.uri: {uri} has no {ARRAY_NAME}") from None
    return load_dataset(out)


def prepare_or_reuse(source: DocumentSource, tokenizer: Tokenizer, *, sequence_length: int,
                     out_dir: str | os.PathLike[str], progress: bool = True) -> PreparedDataset:
    """Reuse ``out_dir`` if it was prepared from the same source, tokenizer and length."""
    out = pathlib.Path(out_dir)
    if (out / MANIFEST_NAME).is_file():
        try:
            existing = load_dataset(out)
        except (DataError, ValueError, OSError):
            existing = None
        if (existing is not None
                and existing.manifest.source_checksum == source.checksum()
                and existing.manifest.sequence_length == sequence_length
                and existing.manifest.tokenizer == tokenizer.describe()
                and not existing.manifest.canaries):
            return existing
    return prepare_dataset(source, tokenizer, sequence_length=sequence_length, out_dir=out,
                           progress=progress)


def _write_json_atomic(path: pathlib.Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
