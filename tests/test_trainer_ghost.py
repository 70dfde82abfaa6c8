"""Ghost (book-keeping) clipping equals the vmap(grad) reference: norms, clipped sums, fractions."""

import dataclasses
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dptrain.planner import get_preset
from dptrain.trainer import build_model, model_loss_fn
from dptrain.trainer._dpsgd import DpSgdConfig, clip_factor, global_norms, local_clipped_sum
from dptrain.trainer._ghost import ghost_norms, weighted_grad_sum
from dptrain.trainer._model import Architecture

# Each test compiles a decoder's ghost and vmap(grad) paths: 10–45 s on 2 shared cores.
pytestmark = pytest.mark.slow

ROWS = 6
LENGTH = 17  # tokens per row (16 predictions): small, and repeats tokens within a row


def _setup(shape, *, seed=0, arch=None):
    arch = arch or Architecture()
    # Non-zero norm scales, so the scales' gradients and the (1 + scale) gain are exercised.
    model = build_model(shape, key=jax.random.key(seed), arch=arch)
    rng = np.random.default_rng(seed)

    def scales(m):
        norms = [m.blocks.attn_norm, m.blocks.mlp_norm, m.final_norm]
        if arch.post_norms:
            norms += [m.blocks.attn_post_norm, m.blocks.mlp_post_norm]
        return [norm.scale for norm in norms]

    model = eqx.tree_at(scales, model, [jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32)
                                        for s in scales(model)])
    params, static = eqx.partition(model, eqx.is_array)
    # Few distinct tokens: many repeats, so token-equality grouping and the tied cross term matter.
    tokens = rng.integers(3, 12, size=(ROWS, LENGTH)).astype(np.int32)
    tokens[1, 9:] = 0  # a row with trailing padding targets
    tokens[2, :] = 0  # an all-padding row: zero loss, zero gradient
    return params, static, jnp.asarray(tokens)


def _clipped_sum(static, params, tokens, mask, *, gradient_clip, clipping, microbatch=None):
    # DpSgdConfig clips the gradient part to clip_norm·√(1 − β²): pick clip_norm for that.
    config = DpSgdConfig(clip_norm=gradient_clip / (1 - 0.25**2) ** 0.5, loss_share=0.25,
                         expected_batch_size=ROWS, clipping=clipping, microbatch_size=microbatch)
    assert config.gradient_clip_norm == pytest.approx(gradient_clip, rel=1e-12)
    return jax.jit(lambda p, t, m: local_clipped_sum(model_loss_fn(static), p, t, m,
                                                     config=config))(params, tokens, mask)


def _reference(params, static, tokens):
    grads = jax.vmap(jax.grad(model_loss_fn(static)), in_axes=(None, 0))(params, tokens)
    return grads, global_norms(grads)


def _assert_trees_close(actual, expected, rel):
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected),
                    strict=True):
        scale = float(jnp.max(jnp.abs(e)))
        assert a.shape == e.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0, atol=rel * scale + 1e-12)


def _narrow(name, head_dim=4):
    """A preset's structure (layers, heads, key/value heads, MLP ratio, vocabulary) at a width
    that compiles in seconds: ``head_dim`` shrunk, ``d_model`` and ``d_ff`` in proportion."""
    preset = get_preset(name)
    factor = preset.head_dim // head_dim
    return dataclasses.replace(preset, name=f"{name}-narrow", head_dim=head_dim,
                               d_model=preset.d_model // factor, d_ff=preset.d_ff // factor,
                               max_seq_len=LENGTH - 1)


def _shapes():
    # Every preset's structure, narrow: each linear map's per-example gradient is no larger than
    # its tape there, so ghost clipping keeps it (the book-kept branch).
    narrow = [_narrow(name) for name in ("tiny", "small", "base")]
    cases = [pytest.param((s, Architecture(), "book"), id=s.name) for s in narrow]
    # ``tiny`` at full width: every map (and the tied embedding) by ghost norms (the Gram branch).
    tiny = dataclasses.replace(get_preset("tiny"), max_seq_len=LENGTH - 1)
    cases.append(pytest.param((tiny, Architecture(), "gram"), id="tiny"))
    # A grouped-query variant mixing both branches (attention maps kept, MLP and embedding Gram),
    # so the ghost path does not rely on one key/value head.
    gqa = dataclasses.replace(tiny, name="gqa", d_model=32, n_heads=4, n_kv_heads=2, head_dim=8)
    cases.append(pytest.param((gqa, Architecture(), "mixed"), id="gqa"))
    # Gemma 2's features (post-norm scales, soft-caps small enough to bend, a sliding window
    # shorter than the row, a query_pre_attn_scalar): a new parameter kind and new non-linearities.
    gemma2 = Architecture(attn_softcap=1.0, final_softcap=2.0, query_scale=0.2, post_norms=True,
                          sliding_window=5, sliding_layers=(True, False), norm_eps=1e-5)
    gemma2_tiny = dataclasses.replace(gqa, name="gemma2-tiny", n_layers=2)
    return [*cases, pytest.param((gemma2_tiny, gemma2, "mixed"), id="gemma2-tiny")]


def _assert_branches(tape, branch):
    """The tape book-keeps the per-example gradients of the maps the case means to exercise."""
    kept = {name for name in ("wq", "wo", "w_gate", "w_down", "embedding") if name in tape.book}
    expected = {"book": {"wq", "wo", "w_gate", "w_down", "embedding"}, "gram": set(),
                "mixed": {"wq", "wo"}}[branch]
    assert kept == expected


@pytest.mark.parametrize("case", _shapes())
def test_ghost_norms_equal_per_example_gradient_norms(case):
    shape, arch, branch = case
    params, static, tokens = _setup(shape, arch=arch)
    _, expected = _reference(params, static, tokens)
    squared, losses, tape = jax.jit(ghost_norms, static_argnums=0)(static, params, tokens)
    _assert_branches(tape, branch)
    np.testing.assert_allclose(np.sqrt(np.asarray(squared)), np.asarray(expected), rtol=1e-5,
                               atol=1e-7)
    assert float(squared[2]) == 0.0  # the all-padding row
    reference_losses = jax.vmap(model_loss_fn(static), in_axes=(None, 0))(params, tokens)
    np.testing.assert_allclose(np.asarray(losses), np.asarray(reference_losses), rtol=1e-6)


@pytest.mark.parametrize("case", _shapes())
def test_ghost_clipped_sum_equals_per_example_clipping(case):
    shape, arch, _ = case
    params, static, tokens = _setup(shape, arch=arch)
    _, norms = _reference(params, static, tokens)
    # Midway between two norms (no ties at C): some rows are clipped, some are not.
    real = np.sort(np.asarray(norms)[np.asarray(norms) > 0])
    clip = float(real[len(real) // 2 - 1] + real[len(real) // 2]) / 2
    mask = jnp.asarray([True, True, True, True, True, False])
    expected = _clipped_sum(static, params, tokens, mask, gradient_clip=clip,
                            clipping="per-example")
    ghost = _clipped_sum(static, params, tokens, mask, gradient_clip=clip, clipping="ghost")
    _assert_trees_close(ghost[0], expected[0], rel=1e-5)
    # The loss coordinate, raw loss and norm sums, the clipped count.
    for got, want in zip(ghost[1:], expected[1:], strict=True):
        assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert 0 < float(ghost[4]) < 5  # clipping happened, and not to every row


def test_microbatched_ghost_sum_equals_the_whole_batch(micro_shape):
    shape = dataclasses.replace(micro_shape, max_seq_len=LENGTH - 1)
    params, static, tokens = _setup(shape)
    mask = jnp.ones(ROWS, bool)
    whole, split = (_clipped_sum(static, params, tokens, mask, gradient_clip=0.1,
                                 clipping="ghost", microbatch=mb) for mb in (None, 2))
    _assert_trees_close(split[0], whole[0], rel=1e-6)
    assert float(split[3]) == pytest.approx(float(whole[3]), rel=1e-6)  # norm sums


def test_weighted_sum_is_the_gradient_of_the_weighted_loss(micro_shape):
    shape = dataclasses.replace(micro_shape, max_seq_len=LENGTH - 1)
    params, static, tokens = _setup(shape, seed=3)
    weights = jnp.asarray([0.5, -1.0, 2.0, 0.0, 1.5, 0.25])
    loss = model_loss_fn(static)

    def weighted_loss(p):
        return jnp.sum(weights * jax.vmap(loss, in_axes=(None, 0))(p, tokens))

    expected = jax.grad(weighted_loss)(params)
    _, _, tape = ghost_norms(static, params, tokens)
    _assert_trees_close(weighted_grad_sum(params, tape, weights), expected, rel=1e-5)


def test_non_finite_rows_get_weight_zero_and_contribute_exactly_zero(micro_shape):
    shape = dataclasses.replace(micro_shape, max_seq_len=LENGTH - 1)
    params, static, tokens = _setup(shape)
    squared, _, tape = ghost_norms(static, params, tokens)
    squared = squared.at[0].set(jnp.nan).at[1].set(jnp.inf)
    keep = jnp.isfinite(squared)
    weights = clip_factor(jnp.sqrt(squared), 1.0, keep)
    assert float(weights[0]) == 0.0 and float(weights[1]) == 0.0 and float(weights[3]) > 0
    # Poison row 0's tape: a zero weight must select it away, not multiply NaN by zero.
    def poison(path, a):  # row 0 along the batch axis (axis 1 under a layer axis)
        if a.dtype != jnp.float32:
            return a
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        per_layer = any(isinstance(k, jax.tree_util.SequenceKey) for k in path)  # [B, ...]
        layered = "blocks" in keys or (keys[0] == "book" and not per_layer
                                       and keys[1] not in ("final_norm", "embedding"))
        return a.at[:, 0].set(jnp.nan) if layered else a.at[0].set(jnp.nan)

    poisoned = jax.tree_util.tree_map_with_path(poison, tape)
    clean = weighted_grad_sum(params, tape, weights)
    # Eagerly and compiled (the DP step's form: the selection's loop inside one program).
    for dirty in (weighted_grad_sum(params, poisoned, weights),
                  jax.jit(weighted_grad_sum)(params, poisoned, weights)):
        for a, b in zip(jax.tree_util.tree_leaves(dirty), jax.tree_util.tree_leaves(clean),
                        strict=True):
            assert bool(jnp.all(jnp.isfinite(a)))
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_compiled_dp_step_copies_no_kept_gradient(micro_shape):
    """The clipped sum reads the kept gradients where the backward pass left them.

    A ``lax.cond`` whose branch returns the tape unchanged is compiled with a copy of every array
    it returns (130 MB a step at the peers' benchmark shape). The compiled DP step holds no
    ``copy`` shaped like a kept per-example gradient.
    """
    from dptrain.trainer import DpSgdConfig, make_dp_step, make_mesh, make_optimizer
    from dptrain.trainer._mesh import replicate, shard_batch

    length = 11  # predictions per row: unlike every model dimension, so shapes tell arrays apart
    shape = dataclasses.replace(micro_shape, max_seq_len=length)
    params, static, tokens = _setup(shape)
    tokens = np.asarray(tokens[:, : length + 1])
    _, _, tape = ghost_norms(static, params, jnp.asarray(tokens))
    kept = {tuple(a.shape) for a in jax.tree_util.tree_leaves(tape.book)}
    assert all(length not in s for s in kept)
    assert any(len(s) >= 3 and s[-1] > 1 for s in kept)  # per-example gradients are kept
    mesh = make_mesh(jax.devices()[:1])
    sgd = make_optimizer("sgd", learning_rate=1.0, total_steps=10)
    config = DpSgdConfig(clip_norm=1.0, expected_batch_size=ROWS, clipping="ghost")
    step = make_dp_step(model_loss_fn(static), sgd, config, mesh)
    root = np.asarray(jax.random.key_data(jax.random.key(0)))
    hlo = step.lower(replicate(mesh, params), replicate(mesh, sgd.init(params)),
                     *shard_batch(mesh, tokens, np.ones(ROWS, bool)), root, np.int32(0),
                     np.float32(1.0)).compile().as_text()
    copies = {tuple(int(n) for n in dims.split(",") if n)
              for dims in re.findall(r"= f32\[([0-9,]*)\]\S* copy\(", hlo)}
    assert not copies & kept, sorted(copies & kept)


def test_dp_step_with_ghost_clipping_matches_the_per_example_step(micro_shape):
    from dptrain.trainer import DpSgdConfig, make_dp_step, make_mesh, make_optimizer
    from dptrain.trainer._mesh import replicate, shard_batch

    shape = dataclasses.replace(micro_shape, max_seq_len=LENGTH - 1)
    params, static, tokens = _setup(shape)
    mesh = make_mesh(jax.devices()[:1])
    sgd = make_optimizer("sgd", learning_rate=1.0, total_steps=10)
    root = np.asarray(jax.random.key_data(jax.random.key(0)))
    mask = np.array([True, True, True, True, True, False])
    outputs = {}
    for clipping in ("ghost", "per-example"):
        config = DpSgdConfig(clip_norm=0.05, expected_batch_size=ROWS, clipping=clipping)
        step = make_dp_step(model_loss_fn(static), sgd, config, mesh)
        outputs[clipping] = step(replicate(mesh, params), replicate(mesh, sgd.init(params)),
                                 *shard_batch(mesh, np.asarray(tokens), mask), root,
                                 np.int32(0), np.float32(0.0))  # σ = 0: the clipped mean only
    (ghost, _, ghost_metrics), (reference, _, metrics) = outputs["ghost"], outputs["per-example"]
    # Compare the updates (new − old parameters), not the parameters they are small against.
    def update(new):
        return jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), new, params)

    _assert_trees_close(update(ghost), update(reference), rel=1e-4)
    assert float(ghost_metrics.clipped_fraction) == float(metrics.clipped_fraction) > 0
    assert float(ghost_metrics.mean_grad_norm) == pytest.approx(float(metrics.mean_grad_norm),
                                                                 rel=1e-5)


def test_unknown_clipping_mode_is_rejected_naming_the_field():
    from dptrain.trainer import DpSgdConfig

    with pytest.raises(ValueError, match=r"spec\.training\.clipping"):
        DpSgdConfig(clip_norm=1.0, expected_batch_size=4.0, clipping="fast")
