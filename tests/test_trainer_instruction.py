"""Instruction data: one example per row, the loss on response tokens only, exact zeros for
padding rows and prompt targets in both clipping paths."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dptrain.trainer import ByteTokenizer, build_model, model_loss_fn, prepare_dataset
from dptrain.trainer._data import DataError, source_from_spec
from dptrain.trainer._dpsgd import DpSgdConfig, local_clipped_sum
from dptrain.trainer._model import input_ids, sequence_loss

SHORT = [("2+2?", "4."), ("Hi", "hello"), ("Say", "ok ok"), ("A prompt as long as a row", "x")]
EXAMPLES = [("What is two plus two?", "Four."),
            ("Name a colour.", "Blue, or perhaps green."),
            ("Say hi", "hi"),
            ("A very long prompt that does not fit " * 3, "truncated away"),
            ("Empty answer", "")]


def _prepare(tmp_path, examples=EXAMPLES, length=32, **fields):
    prompt, response = fields.get("prompt", "prompt"), fields.get("response", "response")
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({prompt: p, response: r}) + "\n" for p, r in examples))
    source = source_from_spec(path=str(path), builtin=None, fmt="instruction", text_field="text",
                              prompt_field=prompt, response_field=response)
    return prepare_dataset(source, ByteTokenizer(), sequence_length=length,
                           out_dir=tmp_path / "prepared", progress=False)


def test_one_example_per_row_prompt_marked(tmp_path):
    tok = ByteTokenizer()
    data = _prepare(tmp_path, prompt="question", response="answer")
    rows = np.asarray(data.sequences, np.int64)
    # The empty response yields no row; every other example is exactly one row, never packed.
    assert data.num_sequences == 4 and data.manifest.num_documents == 4
    assert data.manifest.source["unit"] == "example"
    for row, (prompt, response) in zip(rows, EXAMPLES[:4], strict=True):
        p, r = tok.encode(prompt), tok.encode(response)
        expected = ([tok.bos_id, *(~np.asarray(p, np.int64)).tolist(), *r, tok.eos_id])[:32]
        expected += [tok.pad_id] * (32 - len(expected))
        assert row.tolist() == expected
    # The 4th example's prompt fills the row: it carries no loss target at all.
    assert np.all(rows[3, 1:] < 0)


def test_missing_field_names_the_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    source = source_from_spec(path=str(path), builtin=None, fmt="instruction", text_field="text")
    with pytest.raises(DataError, match=r"spec.data.responseField: .* 'response'"):
        prepare_dataset(source, ByteTokenizer(), sequence_length=16, out_dir=tmp_path / "p",
                        progress=False)


def test_loss_is_on_response_tokens_only(tmp_path, micro_shape):
    data = _prepare(tmp_path, SHORT, length=16)
    rows = jnp.asarray(np.asarray(data.sequences, np.int32))
    model = build_model(micro_shape, key=jax.random.key(1))

    @jax.jit
    def losses(row):
        # Reference: cross-entropy of the plain ids, averaged over the response (+EOS) targets.
        ids = input_ids(row)
        logits = model(ids[:-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[1:, None], axis=-1)[:, 0]
        response = (row[1:] >= 0) & (row[1:] != 0)
        expected = jnp.sum(jnp.where(response, nll, 0.0)) / jnp.maximum(jnp.sum(response), 1)
        return sequence_loss(model, row, 0), expected, jnp.sum(response)

    for row in rows[:3]:
        actual, expected, count = losses(row)
        assert float(actual) == pytest.approx(float(expected), rel=1e-6)
        assert 0 < int(count) < 15
    # A row whose prompt fills it has no target: loss 0 (and gradient 0).
    assert np.all(np.asarray(rows[3, 1:]) < 0)
    assert float(losses(rows[3])[0]) == 0.0


def test_ghost_and_per_example_agree_and_padding_rows_add_zero(tmp_path, micro_shape):
    data = _prepare(tmp_path, SHORT, length=16)
    rows = np.asarray(data.sequences, np.int32)
    model = build_model(micro_shape, key=jax.random.key(2))
    params, static = eqx.partition(model, eqx.is_array)
    # Real rows 0..2, the no-target row 3, then two padding rows (mask False): whatever they
    # hold (here garbage ids, then padding), they add exactly nothing.
    garbage = np.random.default_rng(0).integers(3, 200, size=(2, 16)).astype(np.int32)
    with_garbage = jnp.asarray(np.concatenate([rows, garbage]))
    with_padding = jnp.asarray(np.concatenate([rows, np.zeros_like(garbage)]))
    mask = jnp.asarray([True, True, True, True, False, False])
    results = {}
    for clipping in ("ghost", "per-example"):
        config = DpSgdConfig(clip_norm=0.5, expected_batch_size=4, clipping=clipping)
        summed = jax.jit(lambda p, t, m, c=config: local_clipped_sum(
            model_loss_fn(static), p, t, m, config=c))
        results[clipping] = summed(params, with_garbage, mask)
        padded = summed(params, with_padding, mask)
        for a, b in zip(jax.tree_util.tree_leaves(results[clipping]),
                        jax.tree_util.tree_leaves(padded), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(results["ghost"][0]),
                    jax.tree_util.tree_leaves(results["per-example"][0]), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4 * scale)
    # The clipped sum is not trivially zero: the response rows do contribute.
    assert max(float(jnp.max(jnp.abs(x)))
               for x in jax.tree_util.tree_leaves(results["ghost"][0])) > 0
