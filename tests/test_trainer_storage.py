"""Data and checkpoints on object storage, against a local S3 server (moto in server mode).

``dptrain run`` reads its documents from ``s3://`` and writes orbax checkpoints and the ledger
to ``s3://``; a second run on a fresh machine (a new output directory with only the job's key)
restores the latest committed checkpoint from S3 (an uncommitted one is skipped) and continues
the ledger from S3's record.
The dataset checksum (part of the mechanism fingerprint) is computed over the objects' bytes.
``file://`` goes through the same fsspec code path; ``gs://`` is parsed and validated the same
way (no local GCS server here).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import random
import re
import shutil

import numpy as np
import pytest
import yaml

from dptrain.api import InvalidJobError, parse_job, parse_object_uri
from dptrain.cli import main
from dptrain.trainer import Checkpointer
from dptrain.trainer._checkpoint import COMMIT_MARKER
from dptrain.trainer._data import DataError, source_from_spec
from dptrain.trainer._ledger import LEDGER_FILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CPU = ROOT / "manifests" / "samples" / "tiny-cpu.yaml"
BUCKET = "dptrain-test"  # conftest.S3_TEST_BUCKET
WORDS = ("the", "of", "privacy", "model", "gradient", "noise", "clip", "batch", "step", "train",
         "data", "sequence", "token")


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The S3 credentials and endpoint in this process's environment (fresh s3fs instances)."""
    import s3fs

    client, env = s3_server
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield client, env
    s3fs.S3FileSystem.clear_instance_cache()


def _corpus(client, prefix: str, parts: int = 2, records: int = 60) -> dict[str, bytes]:
    rng = random.Random(0)
    objects = {}
    for part in range(parts):
        lines = [json.dumps({"text": " ".join(rng.choice(WORDS)
                                              for _ in range(rng.randint(20, 60)))})
                 for _ in range(records)]
        objects[f"part-{part}.jsonl"] = "\n".join(lines).encode()
    for name, body in objects.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=body)
    return objects


def _keys(client, prefix: str) -> list[str]:
    found = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix) + 1:] for o in found)


def _run(job: dict, root: pathlib.Path, out: pathlib.Path, capsys) -> dict:
    """``dptrain run --json`` in this process (the second run reuses the compiled step)."""
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    capsys.readouterr()
    assert main(["run", str(path), "--output", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _steps(out: pathlib.Path) -> list[tuple[int, int]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["steps_charged"]) for r in map(json.loads, lines)]


@pytest.mark.slow
def test_run_reads_s3_data_checkpoints_to_s3_and_a_fresh_machine_resumes(s3_env, tmp_path,
                                                                         capsys):
    client, _ = s3_env
    _corpus(client, "run/corpus")
    job = yaml.safe_load(TINY_CPU.read_text())
    job["spec"]["data"] = {"uri": f"s3://{BUCKET}/run/corpus", "tokenizer": "byte",
                           "sequenceLength": 32}
    # RDP: the PLD curve alone would take longer than the training (nothing here is about it).
    job["spec"]["privacy"].update(delta=1e-5, accountant="rdp")
    job["spec"]["training"].update(batchSize=8, iterations=4, warmupSteps=1)
    job["spec"]["checkpoint"] = {"uri": f"s3://{BUCKET}/run/ckpt", "intervalSteps": 2, "keep": 2}

    first = _run(job, tmp_path, tmp_path / "first", capsys)
    assert first["end_state"] == "Succeeded" and first["steps_charged"] == 4
    assert first["checkpoint_uri"] == f"s3://{BUCKET}/run/ckpt"
    assert _steps(tmp_path / "first") == [(1, 1), (2, 2), (3, 3), (4, 4)]
    keys = _keys(client, "run/ckpt")
    assert {k for k in keys if k.endswith(COMMIT_MARKER)} == {f"2/{COMMIT_MARKER}",
                                                              f"4/{COMMIT_MARKER}"}
    assert any(k.startswith("4/params/") for k in keys)
    ledger = json.loads(client.get_object(Bucket=BUCKET, Key=f"run/ckpt/{LEDGER_FILE}")
                        ["Body"].read())
    assert ledger["steps_charged"] == 4
    # As after a crash while step 4 was uploading, once step 5 was reserved: S3's ledger is
    # ahead of the last committed checkpoint (2), and step 4 has no commit marker.
    ledger["steps_charged"] = 5
    client.put_object(Bucket=BUCKET, Key=f"run/ckpt/{LEDGER_FILE}",
                      Body=json.dumps(ledger).encode())
    client.delete_object(Bucket=BUCKET, Key=f"run/ckpt/4/{COMMIT_MARKER}")

    # A fresh machine: only the job's key comes along; no local checkpoint, ledger or progress.
    second_out = tmp_path / "second"
    second_out.mkdir()
    shutil.copy(tmp_path / "first" / "job.key", second_out / "job.key")
    second = _run(job, tmp_path, second_out, capsys)
    # Restored at step 2 from S3 (steps 3 and 4 ran again), charged from S3's ledger (5) on:
    # the repeated steps are charged again, never undercounted. The history up to the restored
    # step comes from S3 too.
    assert _steps(second_out) == [(1, 1), (2, 2), (3, 6), (4, 7)]
    assert second["steps"] == 4 and second["steps_charged"] == 7
    keys = _keys(client, "run/ckpt")
    assert {k for k in keys if k.endswith(COMMIT_MARKER)} == {f"2/{COMMIT_MARKER}",
                                                              f"4/{COMMIT_MARKER}"}
    assert json.loads(client.get_object(Bucket=BUCKET, Key=f"run/ckpt/{LEDGER_FILE}")
                      ["Body"].read())["steps_charged"] == 7
    assert {"metrics.jsonl", "report.json", "loss.png", "epsilon.png"} <= set(keys)
    report = json.loads(client.get_object(Bucket=BUCKET, Key="run/ckpt/report.json")["Body"]
                        .read())
    assert report["steps_charged"] == 7 and report["key_fingerprint"] == second["key_fingerprint"]


def test_the_dataset_checksum_is_over_the_objects_bytes(s3_env):
    client, _ = s3_env
    objects = _corpus(client, "sum/corpus", records=5)
    uri = f"s3://{BUCKET}/sum/corpus"

    def checksum() -> str:
        return source_from_spec(path=None, builtin=None, fmt="jsonl", text_field="text",
                                uri=uri).checksum()

    expected = hashlib.sha256(json.dumps({"kind": "jsonl", "name": uri,
                                          "text_field": "text"}).encode())
    for name in sorted(objects):
        expected.update(name.encode() + b"\0" + hashlib.sha256(objects[name]).digest())
    before = checksum()
    assert before == expected.hexdigest()
    changed = bytearray(objects["part-1.jsonl"])
    changed[-3] ^= 1  # one bit of one object
    client.put_object(Bucket=BUCKET, Key="sum/corpus/part-1.jsonl", Body=bytes(changed))
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    assert checksum() != before


def test_missing_objects_and_buckets_are_errors_naming_the_field(s3_env):
    for uri in (f"s3://{BUCKET}/no/such/prefix", "s3://no-such-bucket-here/docs"):
        with pytest.raises(DataError, match=r"^spec\.data\.uri: .*no-such|^spec\.data\.uri: "):
            source_from_spec(path=None, builtin=None, fmt="jsonl", text_field="text", uri=uri)


def test_file_uris_take_the_same_path_for_data_and_checkpoints(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    (corpus / "b.txt").write_text("ignored: not jsonl")
    source = source_from_spec(path=None, builtin=None, fmt="jsonl", text_field="text",
                              uri=f"file://{corpus}")
    assert list(source.documents()) == ["hello", "world"]

    remote = f"file://{tmp_path / 'remote'}"
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    saver = Checkpointer(tmp_path / "stage-a", keep=1, remote=remote)
    saver.save(3, params, {"m": np.zeros(2, np.float32)}, {"note": "x"})
    saver.save(5, {"w": params["w"] + 1}, {"m": np.ones(2, np.float32)}, {"note": "y"})
    saver.close()
    assert sorted(p.name for p in (tmp_path / "remote").iterdir()) == ["5"]  # keep 1
    reader = Checkpointer(tmp_path / "stage-b", keep=1, remote=remote)  # a fresh machine
    try:
        assert reader.latest_step() == 5 and reader.read_meta()["note"] == "y"
        restored = reader.restore(params, {"m": np.zeros(2, np.float32)})
        np.testing.assert_array_equal(restored.params["w"], params["w"] + 1)
    finally:
        reader.close()


def test_an_uncommitted_remote_step_is_never_restored(tmp_path):
    remote = tmp_path / "remote"
    saver = Checkpointer(tmp_path / "a", keep=3, remote=f"file://{remote}")
    saver.save(1, {"w": np.ones(2, np.float32)}, {"m": np.zeros(1, np.float32)}, {})
    saver.save(2, {"w": np.full(2, 2.0, np.float32)}, {"m": np.zeros(1, np.float32)}, {})
    saver.close()
    (remote / "2" / COMMIT_MARKER).unlink()  # as if the upload of step 2 had been cut off
    reader = Checkpointer(tmp_path / "b", keep=3, remote=f"file://{remote}")
    try:
        assert reader.latest_step() == 1
    finally:
        reader.close()


@pytest.mark.parametrize(("uri", "scheme", "bucket", "key"), [
    ("gs://my-bucket/runs/a/", "gs", "my-bucket", "runs/a"),
    ("s3://my.bucket_1/x", "s3", "my.bucket_1", "x"),
    ("gs://bucket-only", "gs", "bucket-only", ""),
    ("file:///data/docs", "file", "", "/data/docs"),
])
def test_uris_parse(uri, scheme, bucket, key):
    location = parse_object_uri(uri)
    assert (location.scheme, location.bucket, location.key) == (scheme, bucket, key)


@pytest.mark.parametrize(("field", "uri", "words"), [
    ("data", "http://example.com/docs", "unknown scheme"),
    ("data", "gs:///docs", "no bucket"),
    ("checkpoint", "s3://UPPER/x", "bucket"),
    ("checkpoint", "file://relative/path", "absolute path"),
    ("data", "s3://bucket/a/../b", "'..'"),
    ("checkpoint", "docs/train.jsonl", "no scheme"),
])
def test_bad_uris_are_rejected_naming_the_field(field, uri, words):
    spec = yaml.safe_load(TINY_CPU.read_text())
    if field == "data":
        spec["spec"]["data"] = {"uri": uri}
    else:
        spec["spec"]["checkpoint"] = {"uri": uri}
    with pytest.raises(InvalidJobError) as caught:
        parse_job(spec)
    [error] = caught.value.errors
    assert error.field == f"spec.{field}.uri" and words in error.rule


DOC_BLOCKS = re.findall(r"```yaml dptrainingjob\n(.*?)```",
                        (ROOT / "docs" / "clusters.md").read_text(), flags=re.S)


def test_the_docs_examples_are_valid_secrets_and_jobs():
    import jsonschema
    import kubernetes_validate

    from dptrain.api import validate_job
    from dptrain.api._crd import validating_schema

    schema = jsonschema.Draft4Validator(validating_schema())
    kinds = []
    for block in DOC_BLOCKS:
        for document in yaml.safe_load_all(block):
            kinds.append(document["kind"])
            if document["kind"] == "Secret":
                kubernetes_validate.validate(document, "1.32", strict=True)
                continue
            assert not list(schema.iter_errors(document))
            job = parse_job(document)
            validate_job(job)
            assert job.spec.data.uri is not None and job.spec.checkpoint.uri is not None
    assert kinds.count("DPTrainingJob") == 3 and kinds.count("Secret") == 1


def test_prepare_data_and_format_prepared_read_from_a_uri(tmp_path, capsys):
    """What the data-preparation pod runs (``--config``), then ``format: prepared`` from a URI."""
    corpus = tmp_path / "bucket" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "a.jsonl").write_text("\n".join(json.dumps({"text": f"document {i} " * 9})
                                              for i in range(40)))
    job = yaml.safe_load(TINY_CPU.read_text())
    job["spec"]["data"] = {"uri": f"file://{corpus}", "sequenceLength": 16}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(job))
    prepared = tmp_path / "bucket" / "prepared"
    assert main(["prepare-data", "--config", str(config), "--output", str(prepared),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    source = source_from_spec(path=None, builtin=None, fmt="jsonl", text_field="text",
                              uri=f"file://{corpus}")
    assert summary["source_checksum"] == source.checksum()
    assert summary["num_sequences"] == len(np.load(prepared / "sequences.npy"))

    from dptrain.trainer._entry import dataset_for

    job["spec"]["data"] = {"uri": f"file://{prepared}", "format": "prepared",
                           "sequenceLength": 16}
    local = tmp_path / "local"
    dataset = dataset_for(parse_job(job), base_dir=tmp_path, prepared_dir=local, progress=False)
    assert dataset.directory == local and dataset.num_sequences == summary["num_sequences"]
    np.testing.assert_array_equal(dataset.sequences, np.load(prepared / "sequences.npy"))


def test_a_job_with_a_checkpoint_uri_is_planned_on_one_host():
    from dptrain.planner import InfeasibleBudgetError, make_plan

    job = yaml.safe_load(TINY_CPU.read_text())
    job["spec"]["compute"] = {"accelerator": "tpu-v5e", "tpuTopology": "4x4"}
    job["spec"]["data"]["numSequences"] = 10**5
    job["spec"]["privacy"]["delta"] = 1e-7
    assert make_plan(parse_job(job).spec, dataset_size=10**5).to_status().hosts == 4
    job["spec"]["checkpoint"] = {"uri": "gs://ckpt-bucket/big"}
    with pytest.raises(InfeasibleBudgetError, match=r"^spec\.checkpoint\.uri: .*single-host"):
        make_plan(parse_job(job).spec, dataset_size=10**5)
    job["spec"]["compute"] = {"accelerator": "tpu-v5e", "maxHosts": 16}
    assert make_plan(parse_job(job).spec, dataset_size=10**5).to_status().hosts == 1


def test_unusable_storage_is_a_one_line_error_not_bad_input(tmp_path, capsys):
    """Storage that cannot be used (here a 'directory' under a regular file) ends the run with
    EXIT_ERROR (retried by the operator) and one line naming the field, not a traceback."""
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 8})
                                                   for i in range(80)))
    (tmp_path / "plain-file").write_text("not a directory")
    job = yaml.safe_load(TINY_CPU.read_text())
    job["spec"]["data"] = {"path": "docs.jsonl", "sequenceLength": 16}
    job["spec"]["privacy"].update(delta=1e-5, accountant="rdp")
    job["spec"]["training"].update(batchSize=8, iterations=2, warmupSteps=0)
    job["spec"]["checkpoint"] = {"uri": f"file://{tmp_path / 'plain-file' / 'ckpt'}"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    capsys.readouterr()
    assert main(["run", str(path), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert "dptrain run: error: spec.checkpoint.uri: cannot read file://" in err, err


URI_CASES = ["s3://bucket/key", "gs://my-bucket", "gs://my.bucket_1/a/b/", "file:///data/x",
             "http://example.com/x", "s3:///key", "s3://Bucket/x", "s3://ab/x", "file://rel/x",
             "s3://bucket/a/../b", "s3://bucket/..", "gs://-bucket/x", "s3://bucket/a\nb",
             "docs/train.jsonl", "file:///", "gs://" + "b" * 222 + "/x", "gs://" + "b" * 223]


def _cel_accepts(uri: str) -> bool:
    """The CRD's CEL rule for uri fields, evaluated with Python's re (the regexes are RE2)."""
    from dptrain.api._storage import URI_CEL

    regexes = [re.sub(r"\\\\", r"\\", r) for r in re.findall(r"self\.matches\('(.*?)'\)",
                                                              URI_CEL)]
    assert len(regexes) == 2
    matches = any(re.search(r, uri) for r in regexes)
    return matches and "/../" not in uri and not uri.endswith("/..")


@pytest.mark.parametrize("uri", URI_CASES)
def test_the_crd_rule_and_the_parser_agree(uri):
    try:
        parse_object_uri(uri)
        parsed = True
    except ValueError:
        parsed = False
    assert _cel_accepts(uri) == parsed
