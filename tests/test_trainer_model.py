"""The Gemma-2-style decoder: sizes match the planner's arithmetic; attention is causal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dptrain.planner import get_preset
from dptrain.trainer import build_model, count_params, sequence_loss
from dptrain.trainer._model import greedy_continue


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_parameter_count_matches_the_preset_arithmetic(name):
    shape = get_preset(name)
    assert count_params(build_model(shape, key=jax.random.key(0))) == shape.param_count


def test_initialisation_is_a_function_of_the_key(micro_shape):
    a = build_model(micro_shape, key=jax.random.key(1))
    b = build_model(micro_shape, key=jax.random.key(1))
    c = build_model(micro_shape, key=jax.random.key(2))
    assert np.array_equal(a.embedding, b.embedding)
    assert not np.array_equal(a.embedding, c.embedding)


def test_attention_is_causal_and_initial_loss_is_near_uniform(micro_shape):
    jax.config.update("jax_numpy_rank_promotion", "raise")
    try:
        model = build_model(micro_shape, key=jax.random.key(0))
        tokens = jnp.arange(3, 3 + micro_shape.max_seq_len, dtype=jnp.int32)
        changed = tokens.at[-1].set(200)
        forward = jax.jit(lambda t: model(t))
        a, b = forward(tokens), forward(changed)
        np.testing.assert_array_equal(a[:-1], b[:-1])  # the past cannot see the future
        assert not np.allclose(a[-1], b[-1])
        loss = float(jax.jit(sequence_loss)(model, tokens))
        assert abs(loss - np.log(micro_shape.vocab_size)) < 0.1
    finally:
        jax.config.update("jax_numpy_rank_promotion", "allow")


def test_all_padding_sequence_has_zero_loss_and_zero_gradient(micro_shape):
    model = build_model(micro_shape, key=jax.random.key(0))
    pad = jnp.zeros(micro_shape.max_seq_len, jnp.int32)
    loss, grads = jax.jit(jax.value_and_grad(sequence_loss))(model, pad)
    assert float(loss) == 0.0
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grads))


def test_sequences_longer_than_the_model_allows_are_rejected(micro_shape):
    model = build_model(micro_shape, key=jax.random.key(0))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros(micro_shape.max_seq_len + 1, jnp.int32))


def test_greedy_decoding_returns_the_requested_tokens(micro_shape):
    model = build_model(micro_shape, key=jax.random.key(0))
    out = jax.jit(lambda p: greedy_continue(model, p, 6))(jnp.arange(3, 13, dtype=jnp.int32))
    assert out.shape == (6,) and out.dtype == jnp.int32
