"""Other uses of private data are explicit (issue 10, item 7): sweeps and the memorization audit."""

import json

import pytest

from dptrain.cli import main


def test_sweep_refuses_input_not_declared_public(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "private records"}\n' * 50)
    out = tmp_path / "table.csv"
    assert main(["sweep", "--presets", "tiny", "--steps", "2", "--input", str(corpus),
                 "--output", str(out)]) == 3
    err = capsys.readouterr().err
    assert "--public-data" in err and "outside any privacy guarantee" in err
    assert not out.exists()


@pytest.mark.slow
def test_memorization_audit_says_its_figures_are_released_outside_epsilon(tmp_path, capsys):
    import equinox as eqx
    import jax

    from dptrain.planner import BYTE_VOCAB_SIZE, ModelShape
    from dptrain.trainer import (
        ByteTokenizer,
        Checkpointer,
        build_model,
        make_canaries,
        prepare_dataset,
        source_from_spec,
    )
    from dptrain.trainer._checkpoint import shape_to_dict

    tokenizer = ByteTokenizer()
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": f"record {i} " * 30}) + "\n" for i in range(20)))
    source = source_from_spec(path=str(tmp_path / "d.jsonl"), builtin=None, fmt="jsonl",
                              text_field="text")
    dataset = prepare_dataset(source, tokenizer, sequence_length=100, out_dir=tmp_path / "p",
                              canaries=make_canaries(tokenizer, count=2, length=100, seed=1),
                              canary_repeats=7, progress=False)
    shape = ModelShape(name="audit", vocab_size=BYTE_VOCAB_SIZE, d_model=16, n_layers=1,
                       n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32, max_seq_len=100)
    params, _ = eqx.partition(build_model(shape, key=jax.random.key(0)), eqx.is_array)
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(1, params, params, {"model_shape": shape_to_dict(shape),
                                          "dataset": {"dir": str(dataset.directory)}})
    checkpointer.close()
    args = ["audit", "memorization", "--checkpoint", str(tmp_path / "ckpt"), "--samples", "2"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "released outside the job's ε" in result["privacy_note"]
    assert result["canaries"]["repeats"] == 7
    assert "inserted 7×" in result["canaries"]["repetition_note"]
    assert main(args) == 0
    human = capsys.readouterr().out
    assert "released outside the job's ε" in human and "inserted 7×" in human
