"""The hand-written backward passes of ``_fused.py`` against autodiff of the textbook formulas.

Values and gradients (float64 reference, so the comparison measures the float32 formulation's
error, not the reference's), on the batched and unbatched layouts, grouped-query attention,
soft-capping, sliding windows and a fully masked row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dptrain.trainer import _fused
from dptrain.trainer._architecture import visibility
from dptrain.trainer._fused import attention, causal_attention, cross_entropy, geglu


def _reference_attention(q, k, v, visible, cap):
    """Per-head loops of ``softmax(mask(cap(q kᵀ))) v`` (query head h uses kv head h // r)."""
    n_heads, n_kv = q.shape[-2], k.shape[-2]
    outs = []
    for head in range(n_heads):
        kv = head // (n_heads // n_kv)
        s = jnp.einsum("...ld,...md->...lm", q[..., head, :], k[..., kv, :])
        if cap is not None:
            s = cap * jnp.tanh(s / cap)
        s = jnp.where(visible, s, jnp.finfo(s.dtype).min)
        outs.append(jnp.einsum("...lm,...md->...ld", jax.nn.softmax(s, axis=-1), v[..., kv, :]))
    return jnp.stack(outs, axis=-2)


def _grads(f, args, cotangent):
    out, pullback = jax.vjp(f, *args)
    return (out, *pullback(cotangent))


def _assert_close(got, want, scale=1.0):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        tolerance = 1e-5 * max(float(np.max(np.abs(np.asarray(w, np.float64)))), scale)
        np.testing.assert_allclose(
            np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=0, atol=tolerance
        )


@pytest.mark.parametrize(
    ("lead", "n_heads", "n_kv", "cap", "window"),
    [((2,), 4, 1, None, None), ((2,), 4, 2, 5.0, 3), ((), 2, 2, None, None), ((), 4, 1, 2.0, 2)],
)
def test_attention_and_its_gradients_equal_autodiff_of_the_per_head_formula(
    lead, n_heads, n_kv, cap, window
):
    rng = np.random.default_rng(0)
    length, head_dim = 7, 4

    def normal(*shape):
        return rng.normal(size=shape)

    q, k, v = (
        normal(*lead, length, n_heads, head_dim),
        normal(*lead, length, n_kv, head_dim),
        normal(*lead, length, n_kv, head_dim),
    )
    cotangent = normal(*lead, length, n_heads, head_dim)
    visible = visibility(np.arange(length), np.arange(length), window)
    args32 = tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v))
    got = _grads(
        lambda *a: attention(*a, visible, cap), args32, jnp.asarray(cotangent, jnp.float32)
    )
    with jax.enable_x64(True):
        want = _grads(
            lambda *a: _reference_attention(*a, visible, cap),
            tuple(jnp.asarray(a, jnp.float64) for a in (q, k, v)),
            jnp.asarray(cotangent, jnp.float64),
        )
        want = tuple(np.asarray(w) for w in want)
    _assert_close(got, want)


def test_a_fully_masked_row_gets_uniform_weights_and_zero_score_gradients():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32) for _ in range(3))
    visible = jnp.asarray([[False, False, False], [True, False, False], [True, True, True]])
    args = (q, k[:, :1], v[:, :1])
    cotangent = jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32)
    got = _grads(lambda *a: attention(*a, visible), args, cotangent)
    want = _grads(lambda *a: _reference_attention(*a, visible, None), args, cotangent)
    _assert_close(got, want)
    # Row 0 sees nothing: uniform weights over the keys, and no gradient reaches its query.
    np.testing.assert_allclose(
        np.asarray(got[0][0]), np.asarray(jnp.mean(v[:, 0], axis=0))[None].repeat(2, 0), rtol=1e-6
    )
    assert np.all(np.asarray(got[1][0]) == 0.0)


def test_geglu_and_its_gradients_equal_autodiff_of_gelu_times_up():
    rng = np.random.default_rng(2)
    gate, up, cotangent = (
        jnp.asarray(rng.normal(0, 2, size=(3, 5, 8)), jnp.float32) for _ in range(3)
    )
    got = _grads(geglu, (gate, up), cotangent)
    with jax.enable_x64(True):
        want = _grads(
            lambda g, u: jax.nn.gelu(g, approximate=True) * u,
            (jnp.asarray(gate, jnp.float64), jnp.asarray(up, jnp.float64)),
            jnp.asarray(cotangent, jnp.float64),
        )
        want = tuple(np.asarray(w) for w in want)
    _assert_close(got, want)


def test_cross_entropy_and_its_gradient_equal_autodiff_of_log_softmax():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(0, 4, size=(2, 6, 11)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 11, size=(2, 6)), jnp.int32)
    cotangent = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
    got = _grads(lambda x: cross_entropy(x, ids), (logits,), cotangent)

    def reference(x):
        return -jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), ids[..., None], -1)[..., 0]

    with jax.enable_x64(True):
        want = tuple(
            np.asarray(w)
            for w in _grads(
                reference, (jnp.asarray(logits, jnp.float64),), jnp.asarray(cotangent, jnp.float64)
            )
        )
    _assert_close(got, want)
    # Under vmap (the per-example reference path) as well.
    per_row = jax.vmap(jax.grad(lambda x, i: jnp.sum(cross_entropy(x, i))))(logits, ids)
    np.testing.assert_allclose(
        np.asarray(per_row),
        np.asarray(jax.grad(lambda x: jnp.sum(cross_entropy(x, ids)))(logits)),
        rtol=0,
        atol=1e-6,
    )


@pytest.mark.parametrize(("cap", "window"), [(None, None), (3.0, 3)])
def test_causal_blocks_skip_only_invisible_keys(monkeypatch, cap, window):
    # Blocks of 2 positions on 7: 3 blocks (ends 2, 4, 7), so the skipped corners are exercised.
    monkeypatch.setattr(_fused, "CAUSAL_BLOCK", 2)
    monkeypatch.setattr(_fused, "CAUSAL_BLOCKS", 3)
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(2, 7, 4, 4)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 7, 1, 4)), jnp.float32) for _ in range(2))
    cotangent = jnp.asarray(rng.normal(size=(2, 7, 4, 4)), jnp.float32)
    visible = visibility(np.arange(7), np.arange(7), window)
    got = _grads(lambda *a: causal_attention(*a, visible, cap), (q, k, v), cotangent)
    want = _grads(lambda *a: attention(*a, visible, cap), (q, k, v), cotangent)
    _assert_close(got, want)
