"""Held-out evaluation: a disjoint document-level split, loss/perplexity in the loop, the report,
and the ledger left untouched."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dptrain.api import DPTrainingJob
from dptrain.trainer import ByteTokenizer, load_dataset, prepare_dataset, train
from dptrain.trainer._data import held_out
from dptrain.trainer._evaluation import (
    PRIVACY_NOTE,
    EvaluationSettings,
    data_source,
    evaluation_source,
)
from dptrain.trainer._model import sequence_loss
from dptrain.trainer._report import write_report

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def _job(spec_data, evaluation):
    return DPTrainingJob.model_validate({
        "metadata": {"name": "evaluated"},
        "spec": {"privacy": {"epsilon": 5.0, "delta": 1e-6}, "data": spec_data,
                 "model": {"preset": "tiny"},
                 "training": {"batchSize": 8, "iterations": 4, "noiseMultiplier": 1.0},
                 "evaluation": evaluation}})


def _documents(tokens, tokenizer):
    """The documents of a packed stream of rows: the texts between BOS and EOS."""
    stream = [int(t) for t in np.asarray(tokens).ravel() if int(t) != tokenizer.pad_id]
    docs, current = [], None
    for t in stream:
        if t == tokenizer.bos_id:
            current = []
        elif t == tokenizer.eos_id:
            docs.append(tokenizer.decode(current))
            current = None
        else:
            current.append(t)
    return docs


def test_holdout_split_is_by_document_before_packing_and_disjoint(tmp_path):
    texts = [f"doc {i:03d} " + " ".join(WORDS[(i * 3 + j) % 8] for j in range(5))
             for i in range(200)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    job = _job({"path": "docs.jsonl", "sequenceLength": 16}, {"holdoutFraction": 0.25})
    tokenizer = ByteTokenizer()
    train_set = prepare_dataset(data_source(job, tmp_path), tokenizer, sequence_length=16,
                                out_dir=tmp_path / "train", progress=False)
    held_set = prepare_dataset(evaluation_source(job, tmp_path), tokenizer, sequence_length=16,
                               out_dir=tmp_path / "held", progress=False)
    trained = _documents(train_set.sequences, tokenizer)
    held = _documents(held_set.sequences, tokenizer)
    # Every document is on exactly one side, whole: the packed training rows hold the training
    # documents' tokens and nothing of a held-out document.
    assert sorted(trained + held) == sorted(texts)
    assert not set(trained) & set(held)
    # A quarter held out, within 4 binomial standard deviations (200 documents).
    assert abs(len(held) - 50) <= 4 * math.sqrt(200 * 0.25 * 0.75)
    # The split is a function of the text: preparing again gives the same sides, and the
    # training source's checksum differs from the whole corpus' (prepared data is not reused).
    assert data_source(job, tmp_path).checksum() == data_source(job, tmp_path).checksum()
    whole = _job({"path": "docs.jsonl", "sequenceLength": 16}, None)
    assert data_source(whole, tmp_path).checksum() != data_source(job, tmp_path).checksum()
    assert train_set.manifest.source["split"] == "train"


def _eval_settings(tmp_path, micro_dataset, interval=4, max_rows=40):
    # The last rows of the micro corpus as a separate evaluation set.
    rows = np.asarray(micro_dataset.sequences[-max_rows:])
    tokenizer = ByteTokenizer()
    texts = [tokenizer.decode([t for t in row if t > 2]) for row in rows]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    from dptrain.trainer import source_from_spec
    source = source_from_spec(path=str(path), builtin=None, fmt="jsonl", text_field="text")
    prepared = prepare_dataset(source, tokenizer, sequence_length=16,
                               out_dir=tmp_path / "eval-data", progress=False)
    return EvaluationSettings(data_dir=prepared.directory, interval_steps=interval,
                              max_rows=max_rows)


def _flat(checkpoint_dir):
    from dptrain.trainer import Checkpointer
    checkpointer = Checkpointer(checkpoint_dir)
    try:
        restored = checkpointer.restore_raw(checkpointer.latest_step())
    finally:
        checkpointer.close()
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(restored)])


def test_evaluation_reports_loss_and_never_changes_the_ledger(micro_config, micro_dataset,
                                                              tmp_path):
    # One secret key for both runs (as a pod's mounted key), so their draws can be compared.
    key = tmp_path / "job.key"
    key.write_bytes(bytes(range(32)))
    plain = micro_config(checkpoint_dir=tmp_path / "a" / "ckpt", output_dir=tmp_path / "a",
                         key_file=key, create_key=False)
    settings = _eval_settings(tmp_path, micro_dataset)
    evaluated = micro_config(checkpoint_dir=tmp_path / "b" / "ckpt", output_dir=tmp_path / "b",
                             key_file=key, create_key=False, evaluation=settings)
    from dptrain.trainer._reporters import FileReporter
    base = train(plain, reporters=[FileReporter(tmp_path / "a")])
    result = train(evaluated, reporters=[FileReporter(tmp_path / "b")])

    # The ledger, the batches, the noise and the model are the same with and without evaluation.
    ledger_a = json.loads((tmp_path / "a" / "ckpt" / "ledger.json").read_text())
    ledger_b = json.loads((tmp_path / "b" / "ckpt" / "ledger.json").read_text())
    assert ledger_a["steps_charged"] == ledger_b["steps_charged"] == 12
    assert result.steps_charged == base.steps_charged == 12
    assert result.epsilon_spent == base.epsilon_spent
    assert [h["loss"] for h in result.history] == [h["loss"] for h in base.history]
    np.testing.assert_array_equal(_flat(tmp_path / "a" / "ckpt"), _flat(tmp_path / "b" / "ckpt"))

    # Every 4 steps and at the end (12 is both).
    assert [e["step"] for e in result.evaluations] == [4, 8, 12]
    last = result.evaluations[-1]
    assert last["perplexity"] == pytest.approx(math.exp(last["loss"]), rel=1e-12)
    assert last["rows"] == 40 and last["source"] == "separate"

    # The loss is the token-weighted mean next-token loss of the final model on those rows,
    # recomputed here from the per-row means of sequence_loss.
    from dptrain.trainer._export import load_checkpoint_model
    model, _ = load_checkpoint_model(evaluated.checkpoint_dir)
    rows = jnp.asarray(np.asarray(load_dataset(settings.data_dir).sequences[:40], np.int32))
    means = jax.vmap(lambda r: sequence_loss(model, r, 0))(rows)
    counts = jnp.sum(rows[:, 1:] != 0, axis=1)
    expected = float(jnp.sum(means * counts) / jnp.sum(counts))
    assert last["tokens"] == int(jnp.sum(counts))
    assert last["loss"] == pytest.approx(expected, rel=1e-5)

    # The report, the plot and the progress file carry it, with the privacy note.
    report = write_report(result, tmp_path / "b")
    assert report["evaluation"]["loss"] == last["loss"]
    assert report["evaluation"]["privacy"] == PRIVACY_NOTE
    assert "not covered" in PRIVACY_NOTE
    assert (tmp_path / "b" / "evaluation.png").read_bytes()[:4] == b"\x89PNG"
    progress = json.loads((tmp_path / "b" / "progress.json").read_text())
    assert progress["evaluation"]["step"] == 12
    assert progress["evaluation"]["loss"] == pytest.approx(last["loss"])
    assert "evaluation" not in json.loads((tmp_path / "a" / "progress.json").read_text())


def test_dptrain_run_instruction_data_with_holdout_evaluation_and_export(tmp_path, capsys):
    """`dptrain run --export`: instruction rows, a held-out split of examples, evaluation at
    the interval and the end, the report, and the export — through the real CLI."""
    import yaml

    from dptrain.cli import main

    rng = np.random.default_rng(0)
    examples = [{"question": f"{a} plus {b}?", "answer": f"{a + b}"}
                for a, b in rng.integers(0, 50, size=(200, 2))]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    job = {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob",
           "metadata": {"name": "sft"},
           "spec": {"privacy": {"epsilon": 8.0, "delta": 1e-3, "accountant": "rdp"},
                    "data": {"path": "sft.jsonl", "format": "instruction",
                             "promptField": "question", "responseField": "answer",
                             "sequenceLength": 16},
                    "model": {"preset": "tiny"},
                    "training": {"batchSize": 8, "iterations": 3, "noiseMultiplier": 1.0,
                                 "learningRate": 0.003},
                    "evaluation": {"holdoutFraction": 0.2, "intervalSteps": 2, "maxRows": 16},
                    "checkpoint": {"intervalSteps": 3}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out = tmp_path / "run"
    code = main(["run", str(tmp_path / "job.yaml"), "--output", str(out), "--export",
                 "huggingface", "--json", "--no-progress"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["end_state"] == "Succeeded"
    train_rows = load_dataset(out / "data").num_sequences
    held_rows = load_dataset(out / "eval-data").num_sequences
    assert train_rows + held_rows == 200  # one row per example, each on one side
    assert result["plan"]["datasetSize"] == train_rows
    evaluation = result["evaluation"]
    assert [e["step"] for e in evaluation["history"]] == [2, 3]
    assert evaluation["source"] == "holdout" and evaluation["rows"] == 16
    assert "not covered" in evaluation["privacy"]
    assert math.isfinite(evaluation["loss"]) and evaluation["loss"] > 0
    export = pathlib.Path(result["artifacts"]["export"])
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    assert "ε" in (export / "README.md").read_text()
    progress = json.loads((out / "progress.json").read_text())
    assert progress["artifacts"]["export"] == str(export)
    assert progress["evaluation"]["source"] == "holdout"


def test_data_preparation_pod_prepares_the_training_side_only(tmp_path, monkeypatch):
    """The operator's prepare pod and the trainer agree on N and the checksum of a split."""
    import yaml

    from dptrain.trainer import PrepareRequest, prepare_data

    texts = [f"document {i} " + WORDS[i % 8] * 3 for i in range(60)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    manifest = {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob",
                "metadata": {"name": "split"},
                "spec": {"privacy": {"epsilon": 5.0, "delta": 1e-6},
                         "data": {"path": "docs.jsonl", "sequenceLength": 16},
                         "model": {"preset": "tiny"},
                         "training": {"batchSize": 8, "iterations": 4},
                         "evaluation": {"holdoutFraction": 0.3}}}
    (tmp_path / "config.json").write_text(yaml.safe_dump(manifest))
    monkeypatch.chdir(tmp_path)
    summary = prepare_data(PrepareRequest(output=tmp_path / "prepared",
                                          config=tmp_path / "config.json", progress=False))
    job = DPTrainingJob.model_validate(manifest)
    assert summary["source_checksum"] == data_source(job, tmp_path).checksum()
    held = sum(held_out(t, 0.3) for t in texts)
    assert summary["num_documents"] == 60 - held and 0 < held < 60
