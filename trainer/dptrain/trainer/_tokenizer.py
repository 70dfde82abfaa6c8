"""Tokenizers: byte-level by default, SentencePiece when a model file is given.

The byte tokenizer needs no vocabulary file, so a job can run offline on any text. Its ids follow
ByT5: ``0`` is padding (so a zero-filled array is all padding), ``1`` begins and ``2`` ends a
document, and byte ``b`` is ``b + 3``. Its vocabulary size is
:data:`dptrain.planner.BYTE_VOCAB_SIZE`.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from dptrain.planner import BYTE_VOCAB_SIZE

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
_BYTE_OFFSET = 3


class Tokenizer(Protocol):
    """What the data pipeline and the memorization audit need of a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids (rows of the embedding table)."""
        ...

    @property
    def pad_id(self) -> int:
        """Id that marks padding; targets equal to it carry no loss."""
        ...

    @property
    def bos_id(self) -> int:
        """Id placed before every document."""
        ...

    @property
    def eos_id(self) -> int:
        """Id placed after every document."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (without BOS/EOS)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens dropped."""
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON description stored in the data manifest (kind, vocabulary, model checksum)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes shifted by three: no vocabulary file, never an unknown token."""

    vocab_size = BYTE_VOCAB_SIZE
    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: one per UTF-8 byte."""
        return [b + _BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special ids are dropped and invalid UTF-8 is replaced."""
        data = bytes(int(i) - _BYTE_OFFSET for i in ids
                     if _BYTE_OFFSET <= int(i) < _BYTE_OFFSET + 256)
        return data.decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        """Manifest entry of the byte tokenizer."""
        return {"kind": "byte", "vocab_size": self.vocab_size, "pad_id": PAD_ID,
                "bos_id": BOS_ID, "eos_id": EOS_ID}


class SentencePieceTokenizer:
    """A SentencePiece model file (optional dependency ``sentencepiece``).

    Padding is SentencePiece's pad id when the model defines one, else an extra id appended after
    the model's vocabulary (so that padding can never be confused with a real token).
    """

    def __init__(self, model_path: str | pathlib.Path) -> None:
        path = pathlib.Path(model_path)
        if not path.is_file():
            raise ValueError(f"spec.data.tokenizerModel: file not found: {path}")
        try:
            import sentencepiece  # optional dependency
        except ImportError:
            raise ValueError(
                "spec.data.tokenizer: 'sentencepiece' needs the Python package sentencepiece "
                "(pip install sentencepiece), which is not installed; use tokenizer: byte "
                "instead") from None
        self._path = path
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        base = int(self._sp.get_piece_size())
        pad = int(self._sp.pad_id())
        self._pad = pad if pad >= 0 else base
        self._vocab = base if pad >= 0 else base + 1
        self._bos = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else self._pad
        self._eos = int(self._sp.eos_id()) if self._sp.eos_id() >= 0 else self._pad

    @property
    def vocab_size(self) -> int:
        """Model vocabulary (plus the appended pad id, if any)."""
        return self._vocab

    @property
    def pad_id(self) -> int:
        """Padding id."""
        return self._pad

    @property
    def bos_id(self) -> int:
        """Begin-of-document id."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """End-of-document id."""
        return self._eos

    def encode(self, text: str) -> list[int]:
        """SentencePiece ids of ``text``."""
        return [int(i) for i in self._sp.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (padding dropped)."""
        return str(self._sp.decode([int(i) for i in ids if int(i) != self._pad
                                    and int(i) < self._sp.get_piece_size()]))

    def describe(self) -> dict[str, Any]:
        """Manifest entry: the model file and its checksum."""
        digest = hashlib.sha256(self._path.read_bytes()).hexdigest()
        return {"kind": "sentencepiece", "vocab_size": self._vocab, "pad_id": self._pad,
                "bos_id": self._bos, "eos_id": self._eos, "model": str(self._path),
                "model_sha256": digest}


class HuggingFaceTokenizer:
    """A Hugging Face ``tokenizer.json`` read with the ``tokenizers`` library (no transformers).

    Special tokens come from ``tokenizer_config.json`` beside it when present (``pad_token``,
    ``bos_token``, ``eos_token``), else from the usual names (``<pad>``, ``<bos>``/``<s>``,
    ``<eos>``/``</s>``). A tokenizer without a padding token gets an extra id appended after its
    vocabulary, so that padding can never be confused with a real token.
    """

    _NAMES: ClassVar[dict[str, tuple[str, ...]]] = {
        "pad": ("<pad>", "[PAD]", "<|pad|>"), "bos": ("<bos>", "<s>", "<|begin_of_text|>"),
        "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>")}

    def __init__(self, path: str | pathlib.Path) -> None:
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"spec.data.tokenizerModel: file not found: {path}")
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise ValueError("spec.data.tokenizer: 'huggingface' needs the Python package "
                             "tokenizers, which is not installed") from None
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception on bad files
            raise ValueError(f"spec.data.tokenizerModel: {path}: not a tokenizer.json "
                             f"({error})") from None
        self._path = path
        config: dict[str, Any] = {}
        config_file = path.parent / "tokenizer_config.json"
        if config_file.is_file():
            try:
                loaded = json.loads(config_file.read_text())
                config = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                config = {}
        base = int(self._tok.get_vocab_size(with_added_tokens=True))
        ids = {role: self._special(config.get(f"{role}_token"), names)
               for role, names in self._NAMES.items()}
        self._pad = ids["pad"] if ids["pad"] is not None else base
        self._vocab = base if ids["pad"] is not None else base + 1
        self._bos = ids["bos"] if ids["bos"] is not None else self._pad
        self._eos = ids["eos"] if ids["eos"] is not None else self._pad
        self._base = base

    def _special(self, configured: Any, names: Sequence[str]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for name in ([configured] if isinstance(configured, str) else []) + list(names):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        return None

    @property
    def vocab_size(self) -> int:
        """Vocabulary with added tokens (plus the appended pad id, if any)."""
        return self._vocab

    @property
    def pad_id(self) -> int:
        """Padding id."""
        return self._pad

    @property
    def bos_id(self) -> int:
        """Begin-of-document id."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """End-of-document id."""
        return self._eos

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added: documents are framed by the packer)."""
        return [int(i) for i in self._tok.encode(text, add_special_tokens=False).ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (padding and special tokens dropped)."""
        return str(self._tok.decode([int(i) for i in ids if int(i) != self._pad
                                     and int(i) < self._base], skip_special_tokens=True))

    def describe(self) -> dict[str, Any]:
        """Manifest entry: the tokenizer file and its checksum."""
        digest = hashlib.sha256(self._path.read_bytes()).hexdigest()
        return {"kind": "huggingface", "vocab_size": self._vocab, "pad_id": self._pad,
                "bos_id": self._bos, "eos_id": self._eos, "model": str(self._path),
                "model_sha256": digest}


def make_tokenizer(kind: str, model_path: str | pathlib.Path | None = None) -> Tokenizer:
    """The tokenizer a job's ``spec.data`` asks for.

    Raises:
        ValueError: naming ``spec.data.tokenizer``/``tokenizerModel`` when the request is unusable.
    """
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        if model_path is None:
            raise ValueError("spec.data.tokenizerModel: required when tokenizer is sentencepiece")
        return SentencePieceTokenizer(model_path)
    if kind == "huggingface":
        if model_path is None:
            raise ValueError("spec.data.tokenizerModel: required when tokenizer is huggingface "
                             "(a tokenizer.json, or its directory), unless model.pretrained "
                             "names a checkpoint that has one")
        return HuggingFaceTokenizer(model_path)
    raise ValueError(f"spec.data.tokenizer: must be 'byte', 'sentencepiece' or 'huggingface' "
                     f"(got {kind!r})")


def tokenizer_from_description(description: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer recorded in a data manifest."""
    return make_tokenizer(str(description.get("kind")), description.get("model"))
