"""Documents → fixed-length sequences (the privacy unit), stored once as a memory-mapped array.

Documents come from JSONL records, text files (one document per file) or the built-in
``stdlib-docs`` corpus (the docstrings of the Python standard library's top-level modules, read
with :mod:`ast` — no import, no download, deterministic for a given Python). Each document becomes
``[BOS] tokens [EOS]``; documents are concatenated and cut into sequences of ``sequence_length``
tokens, so short documents are packed together and long ones split. The final partial sequence is
padded with the pad id (padded targets carry no loss).

Instruction data (``format: instruction``: JSONL records with a prompt and a response) is never
packed: each example becomes one sequence ``[BOS] prompt response [EOS]``, truncated or padded to
``sequence_length``, so one example is one privacy unit. Prompt tokens are stored marked
(``~id``, ``dptrain.trainer._model.mask_target``): the model reads them, but as targets they
carry no loss; the loss is on the response (and its EOS) only.

A held-out split (``spec.evaluation.holdoutFraction``) is made per document (per example),
before packing: a document is held out when the SHA-256 of its text, read as a number in
[0, 1), is below the fraction. The training and evaluation sources see disjoint documents by
construction (identical documents always fall on the same side), and the split is a public
function of the text alone (no randomness to keep secret).

A prepared dataset is a directory with ``sequences.npy`` (``[N, L]``, opened memory-mapped) and
``manifest.json`` (N, length, tokenizer, source description and checksum). The manifest is written
last, so its presence means the array is complete.
"""

from __future__ import annotations

import ast
import contextlib
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

SourceKind = Literal["jsonl", "text", "builtin", "instruction"]
Split = Literal["all", "train", "holdout"]


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
        prompt_field: instruction records' prompt key.
        response_field: instruction records' response key.
        split: every document (``all``), or the training or held-out side of a split.
        holdout_fraction: the held-out share of documents (with ``split`` ``train``/``holdout``).
        store: the object-storage directory holding ``files`` (``spec.data.uri``), if any.
    """

    kind: SourceKind
    files: tuple[pathlib.Path, ...] | tuple[str, ...]
    name: str
    text_field: str = "text"
    root: pathlib.Path | None = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    split: Split = "all"
    holdout_fraction: float = 0.0
    store: RemoteDir | None = None

    def with_split(self, split: Split, fraction: float) -> DocumentSource:
        """This source restricted to one side of a document-level held-out split."""
        if not 0.0 < fraction < 1.0:
            raise DataError(f"spec.evaluation.holdoutFraction: must be in (0, 1) (got "
                            f"{fraction!r})")
        return dataclasses.replace(self, split=split, holdout_fraction=float(fraction))

    def _settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"kind": self.kind, "name": self.name,
                                    "text_field": self.text_field}
        if self.kind == "instruction":
            settings.update(prompt_field=self.prompt_field, response_field=self.response_field)
        if self.split != "all":
            settings.update(split=self.split, holdout_fraction=self.holdout_fraction)
        return settings

    def checksum(self) -> str:
        """SHA-256 over the kind, the settings, and every file's relative name and bytes.

        Objects in storage are hashed over the bytes read from it (streamed), like files.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(self._settings()).encode())
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
        if self.kind == "instruction":
            info.update(prompt_field=self.prompt_field, response_field=self.response_field,
                        unit="example")
        if self.split != "all":
            info.update(split=self.split, holdout_fraction=self.holdout_fraction)
        if self.kind == "builtin":
            info["python"] = platform.python_version()
        return info

    def documents(self) -> Iterator[str]:
        """Every document's text (this side of the split), in a fixed order."""
        if self.kind == "instruction":
            raise DataError("spec.data.format: instruction data has examples, not documents")
        for text in self._all_documents():
            if self._keeps(text):
                yield text

    def examples(self) -> Iterator[tuple[str, str]]:
        """Every instruction example ``(prompt, response)`` (this side of the split)."""
        if self.kind != "instruction":
            raise DataError(f"spec.data.format: {self.kind} data has documents, not examples")
        for file in self.files:
            with self._text(file) as (handle, where):
                for prompt, response in _instruction_records(handle, where, self.prompt_field,
                                                             self.response_field):
                    if self._keeps(prompt + "\0" + response):
                        yield prompt, response

    def _all_documents(self) -> Iterator[str]:
        for file in self.files:
            if self.kind == "builtin":
                yield from _docstrings(pathlib.Path(file))
                continue
            with self._text(file) as (handle, where):
                if self.kind == "text":
                    yield handle.read()
                else:
                    yield from _jsonl_documents(handle, where, self.text_field)

    @contextlib.contextmanager
    def _text(self, file: pathlib.Path | str) -> Iterator[tuple[io.TextIOWrapper, str]]:
        """A file or object opened as text, with the name errors should give."""
        where = self.store.url(str(file)) if self.store is not None else str(file)
        # Text mode as open() gives it: UTF-8, universal newlines.
        errors = "replace" if self.kind == "text" else "strict"
        with self._open(file, "rb") as raw, io.TextIOWrapper(
                raw, encoding="utf-8", errors=errors) as handle:
            yield handle, where

    def _keeps(self, text: str) -> bool:
        if self.split == "all":
            return True
        return held_out(text, self.holdout_fraction) == (self.split == "holdout")


def held_out(text: str, fraction: float) -> bool:
    """Whether a document is on the held-out side of a split (see the module docstring)."""
    digest = hashlib.sha256(b"dptrain-holdout\0" + text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(digest.digest()[:8], "big") / 2.0**64 < fraction


def _instruction_records(handle: Iterator[str], path: str, prompt_field: str,
                         response_field: str) -> Iterator[tuple[str, str]]:
    pairs = ((prompt_field, "promptField"), (response_field, "responseField"))
    for prompt, response in _string_fields(handle, path, pairs):  # noqa: UP028 - typed as pairs
        yield prompt, response


def _jsonl_documents(handle: Iterator[str], path: str, text_field: str) -> Iterator[str]:
    for (text,) in _string_fields(handle, path, ((text_field, "textField"),)):
        yield text


def _string_fields(handle: Iterator[str], path: str,
                   fields: tuple[tuple[str, str], ...]) -> Iterator[tuple[str, ...]]:
    """Each JSONL record's string ``fields`` (key, spec field naming it); blank lines skipped."""
    where = "spec.data.uri" if "://" in path else "spec.data.path"
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: {path} line {number} is not valid JSON "
                            f"({error.msg})") from None
        values = []
        for key, name in fields:
            value = record.get(key) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise DataError(f"spec.data.{name}: {path} line {number} has no string "
                                f"field {key!r}")
            values.append(value)
        yield tuple(values)


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
                     base_dir: pathlib.Path | None = None, prompt_field: str = "prompt",
                     response_field: str = "response",
                     uri: str | None = None) -> DocumentSource:
    """The document source a job's ``spec.data`` names.

    Args:
        path: ``spec.data.path`` (relative paths are resolved against ``base_dir``).
        uri: ``spec.data.uri``: an object, or a prefix whose objects are read (``*.jsonl``
            for jsonl, every object for text; names starting with '.' skipped), sorted.
        builtin: ``spec.data.builtin``.
        fmt: ``spec.data.format`` (``jsonl``, ``text`` or ``instruction``; ``prepared`` is
            handled by the caller).
        text_field: ``spec.data.textField``.
        base_dir: directory relative paths are taken from (default: the working directory).
        prompt_field: ``spec.data.promptField`` (instruction).
        response_field: ``spec.data.responseField`` (instruction).

    Raises:
        DataError: missing files, both or neither of path/builtin, an empty directory.
    """
    if sum(x is not None for x in (path, builtin, uri)) > 1:
        raise DataError("spec.data: set exactly one of path, builtin and uri")
    if uri is not None:
        return uri_source(uri, fmt=fmt, text_field=text_field, prompt_field=prompt_field,
                          response_field=response_field)
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
    if fmt not in ("jsonl", "text", "instruction"):
        raise DataError(f"spec.data.format: expected jsonl, text or instruction here "
                        f"(got {fmt!r})")
    if resolved.is_dir():
        pattern = "*" if fmt == "text" else "*.jsonl"
        files = tuple(sorted(p for p in resolved.rglob(pattern)
                             if p.is_file() and not p.name.startswith(".")))
        if not files:
            raise DataError(f"spec.data.path: directory {resolved} holds no "
                            f"{'' if fmt == 'text' else '*.jsonl '}files")
        root = resolved
    else:
        files, root = (resolved,), resolved.parent
    kind: SourceKind = "text" if fmt == "text" else "jsonl" if fmt == "jsonl" else "instruction"
    return DocumentSource(kind=kind, files=files, name=str(resolved), text_field=text_field,
                          root=root, prompt_field=prompt_field, response_field=response_field)


def uri_source(uri: str, *, fmt: str, text_field: str, prompt_field: str = "prompt",
               response_field: str = "response") -> DocumentSource:
    """The documents at ``spec.data.uri`` (see :func:`source_from_spec`).

    Raises:
        DataError: nothing there, no matching objects, a bad URI (names the field).
        StorageError: the storage cannot be reached or refuses the credentials (names the
            field): an error to retry, not bad input.
    """
    if fmt not in ("jsonl", "text", "instruction"):
        raise DataError(f"spec.data.format: expected jsonl, text or instruction here "
                        f"(got {fmt!r})")
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
    kind: SourceKind = "text" if fmt == "text" else "jsonl" if fmt == "jsonl" else "instruction"
    return DocumentSource(kind=kind, files=files, name=uri.rstrip("/"), text_field=text_field,
                          store=store, prompt_field=prompt_field, response_field=response_field)


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


def _examples(examples: Iterator[tuple[str, str]], tokenizer: Tokenizer, length: int,
              sink: Any) -> tuple[int, int, int]:
    """One row per example: ``[BOS] ~prompt response [EOS]`` cut or padded to ``length``."""
    rows: list[list[int]] = []
    num_examples = num_tokens = num_rows = 0

    def flush() -> None:
        nonlocal num_rows
        if rows:
            np.asarray(rows, dtype=np.int64).tofile(sink)
            num_rows += len(rows)
            rows.clear()

    for prompt, response in examples:
        answer = tokenizer.encode(response)
        if not answer:
            continue  # nothing to learn: no row (it would carry no loss)
        num_examples += 1
        # Prompt ids are marked ~id (dptrain.trainer._model.mask_target, without importing JAX
        # here): read as inputs, no loss as targets.
        row = [tokenizer.bos_id, *(~t for t in tokenizer.encode(prompt)),
               *answer, tokenizer.eos_id][:length]
        num_tokens += len(row)
        rows.append(row + [tokenizer.pad_id] * (length - len(row)))
        if len(rows) >= _FLUSH_SEQUENCES:
            flush()
    flush()
    return num_examples, num_tokens, num_rows


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
    instruction = source.kind == "instruction"
    docs = tqdm(source.examples() if instruction else source.documents(),
                desc=f"tokenizing {source.name}", unit="example" if instruction else "doc",
                disable=not progress, leave=False)
    with raw_path.open("wb") as sink:
        if instruction:
            num_docs, num_tokens, num_rows = _examples(iter(docs), tokenizer, sequence_length,
                                                       sink)
        else:
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
    # Marked prompt ids are negative: instruction data is stored signed.
    dtype = (np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max and not instruction
             else np.int32)
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
