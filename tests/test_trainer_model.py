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


def _reference_logits(model, tokens):
    """The decoder's logits by a straightforward float64 numpy implementation (loops over heads).

    Written from the architecture's definition, independently of the JAX code's formulation
    (grouped einsums, host RoPE tables, probes, scan), so that speed work cannot change the
    mathematics unnoticed.
    """
    def f64(a):
        return np.asarray(a, np.float64)

    def rms_norm(x, scale):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * (1 + f64(scale))

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    def rope(x):  # x: [L, head_dim]
        half = x.shape[-1] // 2
        freq = 10_000.0 ** (-np.arange(half) / half)
        angle = np.arange(x.shape[0])[:, None] * freq[None, :]
        x1, x2 = x[:, :half], x[:, half:]
        return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                               x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)

    embedding = f64(model.embedding)
    length, d_model = len(tokens), embedding.shape[1]
    x = embedding[np.asarray(tokens)] * np.sqrt(d_model)
    blocks = model.blocks
    for layer in range(blocks.attn.wq.shape[0]):
        wq, wk, wv, wo = (f64(w[layer]) for w in (blocks.attn.wq, blocks.attn.wk, blocks.attn.wv,
                                                   blocks.attn.wo))
        n_heads, head_dim, n_kv = wq.shape[1], wq.shape[2], wk.shape[1]
        h = rms_norm(x, blocks.attn_norm.scale[layer])
        attn = np.zeros_like(x)
        for head in range(n_heads):
            kv = head // (n_heads // n_kv)  # query heads share their group's key/value head
            q, k, v = rope(h @ wq[:, head]), rope(h @ wk[:, kv]), h @ wv[:, kv]
            scores = q @ k.T / np.sqrt(head_dim)
            scores[np.triu_indices(length, 1)] = -np.inf
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            attn += (weights @ v) @ wo[head]
        x = x + attn
        h = rms_norm(x, blocks.mlp_norm.scale[layer])
        gate, up = h @ f64(blocks.mlp.w_gate[layer]), h @ f64(blocks.mlp.w_up[layer])
        x = x + (gelu_tanh(gate) * up) @ f64(blocks.mlp.w_down[layer])
    return rms_norm(x, model.final_norm.scale) @ embedding.T


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_logits_equal_a_straightforward_reference_implementation(micro_shape, n_kv_heads):
    import dataclasses

    import equinox as eqx

    shape = dataclasses.replace(micro_shape, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads)
    model = build_model(shape, key=jax.random.key(5))
    rng = np.random.default_rng(5)
    # Larger embeddings and non-zero norm scales than at initialisation, so logits are O(1).
    model = eqx.tree_at(
        lambda m: (m.embedding, m.blocks.attn_norm.scale, m.blocks.mlp_norm.scale,
                   m.final_norm.scale), model,
        tuple(jnp.asarray(rng.normal(0, s, a.shape), jnp.float32) for s, a in (
            (0.5, model.embedding), (0.3, model.blocks.attn_norm.scale),
            (0.3, model.blocks.mlp_norm.scale), (0.3, model.final_norm.scale))))
    batch = jnp.asarray(rng.integers(3, shape.vocab_size, (3, shape.max_seq_len)), jnp.int32)
    tokens = batch[1]
    logits = np.asarray(jax.jit(lambda t: model(t))(tokens))
    expected = _reference_logits(model, tokens)
    assert float(np.max(np.abs(expected))) > 1.0  # the comparison is not between near-zeros
    tolerance = 1e-5 * np.max(np.abs(expected))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance)
    # The batched path (a [B, L] batch straight through the layers) is the same model.
    batched = np.asarray(jax.jit(lambda t: model.forward(t)[0])(batch))
    np.testing.assert_allclose(batched[1], expected, rtol=0, atol=tolerance)
    np.testing.assert_allclose(batched, np.asarray(jax.jit(jax.vmap(model))(batch)), rtol=0,
                               atol=tolerance)


def test_batched_losses_and_gradients_equal_the_vmapped_model(micro_shape):
    import equinox as eqx

    from dptrain.trainer import model_loss_fn

    params, static = eqx.partition(build_model(micro_shape, key=jax.random.key(2)), eqx.is_array)
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, 40, (3, 9)), jnp.int32)
    tokens = tokens.at[2, 4:].set(0)  # padding targets count zero on both paths
    loss = model_loss_fn(static)
    jax.config.update("jax_numpy_rank_promotion", "raise")  # the batched path broadcasts nothing
    try:
        batched = loss.batched(params, tokens)
    finally:
        jax.config.update("jax_numpy_rank_promotion", "allow")
    np.testing.assert_allclose(np.asarray(batched),
                               np.asarray(jax.vmap(loss, in_axes=(None, 0))(params, tokens)),
                               rtol=1e-6)
    weights = jnp.asarray([1.0, -0.5, 2.0])
    got = jax.grad(lambda p: jnp.sum(weights * loss.batched(p, tokens)))(params)
    want = jax.grad(lambda p: jnp.sum(weights * jax.vmap(loss, in_axes=(None, 0))(p, tokens)))(
        params)
    for a, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0,
                                   atol=1e-5 * float(jnp.max(jnp.abs(e))) + 1e-12)


def test_dense_gradient_equals_the_matmul_gradient():
    from dptrain.trainer._linear import dense

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 3, 4)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)

    def reference(x, w):
        return jnp.einsum("bli,ihk->blhk", x, w)

    def pullback(f):
        out, vjp = jax.vjp(f, x, w)
        return (out, *vjp(cotangent))

    for got, want in zip(pullback(dense), pullback(reference), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # Per example under vmap (the per-example reference path) as well.
    per_example = jax.vmap(jax.grad(lambda w, x: jnp.sum(dense(x, w) ** 2)), in_axes=(None, 0))
    expected = jax.vmap(jax.grad(lambda w, x: jnp.sum(reference(x[None], w) ** 2)),
                        in_axes=(None, 0))
    np.testing.assert_allclose(np.asarray(per_example(w, x)), np.asarray(expected(w, x)),
                               rtol=1e-5, atol=1e-5)
