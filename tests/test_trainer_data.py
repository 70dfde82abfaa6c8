"""Documents → packed fixed-length sequences, memory-mapped with a manifest."""

import json

import numpy as np
import pytest

from dptrain.trainer import (
    ByteTokenizer,
    DataError,
    load_dataset,
    prepare_dataset,
    prepare_or_reuse,
    source_from_spec,
    stdlib_docs_source,
)
from dptrain.trainer._tokenizer import BOS_ID, EOS_ID, PAD_ID

TOK = ByteTokenizer()


def _jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def test_short_documents_are_packed_and_long_ones_split(tmp_path):
    src = source_from_spec(path=str(_jsonl(tmp_path / "d.jsonl", ["ab", "cdefghijkl"])),
                           builtin=None, fmt="jsonl", text_field="text")
    ds = prepare_dataset(src, TOK, sequence_length=8, out_dir=tmp_path / "out", progress=False)
    stream = [BOS_ID, *TOK.encode("ab"), EOS_ID, BOS_ID, *TOK.encode("cdefghijkl"), EOS_ID]
    assert len(stream) == 16
    assert ds.num_sequences == 2
    assert np.array_equal(np.asarray(ds.sequences).ravel(), stream)
    assert ds.manifest.num_documents == 2 and ds.manifest.num_tokens == 16


def test_the_last_partial_sequence_is_padded(tmp_path):
    src = source_from_spec(path=str(_jsonl(tmp_path / "d.jsonl", ["abc"])), builtin=None,
                           fmt="jsonl", text_field="text")
    ds = prepare_dataset(src, TOK, sequence_length=8, out_dir=tmp_path / "out", progress=False)
    row = np.asarray(ds.sequences[0])
    assert row.tolist() == [BOS_ID, *TOK.encode("abc"), EOS_ID, PAD_ID, PAD_ID, PAD_ID]


def test_manifest_records_size_length_tokenizer_and_checksum(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ["hello world"] * 20)
    src = source_from_spec(path=str(path), builtin=None, fmt="jsonl", text_field="text")
    ds = prepare_dataset(src, TOK, sequence_length=16, out_dir=tmp_path / "out", progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_sequences"] == ds.num_sequences == np.load(
        tmp_path / "out" / "sequences.npy", mmap_mode="r").shape[0]
    assert manifest["sequence_length"] == 16
    assert manifest["tokenizer"]["kind"] == "byte"
    assert manifest["source_checksum"] == src.checksum()
    assert isinstance(load_dataset(tmp_path / "out").sequences, np.memmap)
    # The checksum follows the content.
    _jsonl(path, ["hello world"] * 21)
    assert source_from_spec(path=str(path), builtin=None, fmt="jsonl",
                            text_field="text").checksum() != manifest["source_checksum"]


def test_prepared_data_is_reused_only_for_the_same_source(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ["x" * 50])
    src = source_from_spec(path=str(path), builtin=None, fmt="jsonl", text_field="text")
    first = prepare_or_reuse(src, TOK, sequence_length=16, out_dir=tmp_path / "o", progress=False)
    mtime = (tmp_path / "o" / "sequences.npy").stat().st_mtime_ns
    prepare_or_reuse(src, TOK, sequence_length=16, out_dir=tmp_path / "o", progress=False)
    assert (tmp_path / "o" / "sequences.npy").stat().st_mtime_ns == mtime
    _jsonl(path, ["y" * 80])
    src2 = source_from_spec(path=str(path), builtin=None, fmt="jsonl", text_field="text")
    second = prepare_or_reuse(src2, TOK, sequence_length=16, out_dir=tmp_path / "o",
                              progress=False)
    assert second.num_sequences != first.num_sequences


def test_text_directories_are_one_document_per_file(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("bbb")
    (tmp_path / "docs" / "a.txt").write_text("aa")
    src = source_from_spec(path=str(tmp_path / "docs"), builtin=None, fmt="text",
                           text_field="text")
    assert list(src.documents()) == ["aa", "bbb"]


def test_gather_returns_padding_rows_for_index_minus_one(micro_dataset):
    rows = micro_dataset.gather(np.array([3, -1, 0]), PAD_ID)
    assert rows.dtype == np.int32
    assert np.array_equal(rows[0], micro_dataset.sequences[3])
    assert np.all(rows[1] == PAD_ID)
    assert np.array_equal(rows[2], micro_dataset.sequences[0])


@pytest.mark.parametrize(("content", "field", "match"), [
    ("not json\n", "text", r"spec\.data\.path: .* line 1 is not valid JSON"),
    ('{"body": "x"}\n', "text", r"spec\.data\.textField: .* no string field 'text'"),
])
def test_bad_jsonl_names_the_field_and_line(tmp_path, content, field, match):
    (tmp_path / "d.jsonl").write_text(content)
    src = source_from_spec(path=str(tmp_path / "d.jsonl"), builtin=None, fmt="jsonl",
                           text_field=field)
    with pytest.raises(DataError, match=match):
        prepare_dataset(src, TOK, sequence_length=16, out_dir=tmp_path / "o", progress=False)


def test_missing_and_empty_corpora_are_rejected(tmp_path):
    with pytest.raises(DataError, match=r"spec\.data\.path: no such file"):
        source_from_spec(path=str(tmp_path / "nope"), builtin=None, fmt="jsonl",
                         text_field="text")
    (tmp_path / "empty.jsonl").write_text("\n")
    src = source_from_spec(path=str(tmp_path / "empty.jsonl"), builtin=None, fmt="jsonl",
                           text_field="text")
    with pytest.raises(DataError, match="empty"):
        prepare_dataset(src, TOK, sequence_length=16, out_dir=tmp_path / "o", progress=False)


def test_builtin_corpus_is_found_offline_and_deterministic():
    a, b = stdlib_docs_source(), stdlib_docs_source()
    assert len(a.files) > 50
    assert a.files == b.files and a.checksum() == b.checksum()
    first = next(iter(a.documents()))
    assert isinstance(first, str) and first


def test_byte_tokenizer_round_trips_unicode():
    text = "naïve café — ε ≤ 2"
    assert TOK.decode(TOK.encode(text)) == text
    assert min(TOK.encode(text)) >= 3 and max(TOK.encode(text)) < TOK.vocab_size


def test_sentencepiece_without_the_package_gives_a_clear_error(tmp_path):
    from dptrain.trainer import make_tokenizer
    model = tmp_path / "sp.model"
    model.write_bytes(b"\0")
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="sentencepiece"):
            make_tokenizer("sentencepiece", model)
    with pytest.raises(ValueError, match=r"spec\.data\.tokenizerModel"):
        make_tokenizer("sentencepiece", None)
