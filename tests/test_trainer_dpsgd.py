"""Reduction and statistical tests of the DP-SGD step (dptrain.trainer._dpsgd guarantees)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dptrain.trainer import (
    DpSgdConfig,
    add_noise,
    build_model,
    clip_and_sum,
    make_dp_step,
    make_mesh,
    make_plain_step,
    model_loss_fn,
)
from dptrain.trainer._dpsgd import global_norms
from dptrain.trainer._mesh import replicate, shard_batch

ROWS, LENGTH = 8, 16
NO_CLIP = 1e9  # C/max(‖g‖, C) is exactly 1 for every realistic gradient
# Updates are read as new − old float32 parameters of magnitude ≲ 1: a few ulps of absolute error.
ATOL = 1e-6


@pytest.fixture(scope="module")
def setup(micro_shape):
    jax.config.update("jax_numpy_rank_promotion", "raise")
    model = build_model(micro_shape, key=jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_array)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, size=(ROWS, LENGTH)).astype(np.int32)
    yield params, static, tokens, make_mesh(jax.devices()[:1])
    jax.config.update("jax_numpy_rank_promotion", "allow")


@pytest.fixture(scope="module")
def sgd_step(setup):
    """One compiled DP step with SGD(lr=1) and no clipping: the update is -(noisy sum)/B."""
    _params, static, _, mesh = setup
    config = DpSgdConfig(clip_norm=NO_CLIP, expected_batch_size=ROWS)
    return make_dp_step(model_loss_fn(static), optax.sgd(1.0), config, mesh)


@pytest.fixture(scope="module")
def per_example(setup):
    params, static, tokens, _ = setup
    return jax.jit(jax.vmap(jax.grad(model_loss_fn(static)), in_axes=(None, 0)))(params, tokens)


def run(step, setup, tokens, mask, sigma=0.0, optimizer=None, step_index=0):
    params, _, _, mesh = setup
    optimizer = optimizer or optax.sgd(1.0)
    p = replicate(mesh, params)
    state = replicate(mesh, optimizer.init(params))
    t, m = shard_batch(mesh, tokens, mask)
    root = np.asarray(jax.random.key_data(jax.random.key(7)))
    new, _, metrics = step(p, state, t, m, root, np.int32(step_index), np.float32(sigma))
    update = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), new, params)
    return update, metrics


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def test_no_clipping_no_noise_equals_sgd_on_the_mean_gradient(setup, sgd_step):
    params, static, tokens, _mesh = setup
    update, _ = run(sgd_step, setup, tokens, np.ones(ROWS, bool))
    loss = model_loss_fn(static)
    mean_grad = jax.jit(jax.grad(
        lambda p: jnp.mean(jax.vmap(loss, in_axes=(None, 0))(p, tokens))))(params)
    expected = -flat(mean_grad)
    assert np.max(np.abs(expected)) > 1000 * ATOL
    np.testing.assert_allclose(flat(update), expected, rtol=0, atol=ATOL)


def test_plain_step_matches_dp_step_without_clipping_or_noise(setup, sgd_step):
    _params, static, tokens, mesh = setup
    plain = make_plain_step(model_loss_fn(static), optax.sgd(1.0), mesh)
    dp_update, _ = run(sgd_step, setup, tokens, np.ones(ROWS, bool))
    plain_update, _ = run(plain, setup, tokens, np.ones(ROWS, bool))
    np.testing.assert_allclose(flat(dp_update), flat(plain_update), rtol=0, atol=ATOL)


def test_clipped_per_example_gradients_have_norm_at_most_c(per_example):
    grads = per_example
    norms = np.asarray(global_norms(grads))
    clip = float(np.median(norms))  # half the examples are clipped
    for i in range(ROWS):
        one = jax.tree_util.tree_map(lambda g, i=i: g[i:i + 1], grads)
        summed, _ = clip_and_sum(one, jnp.ones(1, bool), clip)
        norm = float(np.linalg.norm(flat(summed)))
        assert norm <= clip * (1 + 1e-5)
        if norms[i] <= clip:  # small gradients pass unchanged
            np.testing.assert_allclose(flat(summed), flat(one), rtol=1e-6, atol=1e-9)
        else:  # large ones are scaled to exactly C
            assert norm == pytest.approx(clip, rel=1e-5)


def test_padding_rows_change_nothing(setup, sgd_step):
    _, _, tokens, _ = setup
    mask = np.array([True] * 5 + [False] * 3)
    garbage = tokens.copy()
    garbage[5:] = np.random.default_rng(1).integers(3, 259, size=(3, LENGTH))
    a, metrics = run(sgd_step, setup, tokens, mask)
    b, _ = run(sgd_step, setup, garbage, mask)
    assert np.array_equal(flat(a), flat(b))  # bit-for-bit: padding adds exact zeros
    assert float(metrics.real_rows) == 5


def test_noisy_sum_is_divided_by_the_expected_batch_size(setup, sgd_step, per_example):
    mask = np.array([True] * 4 + [False] * 4)  # realised batch 4, expected batch 8
    update, _ = run(sgd_step, setup, setup[2], mask)
    summed = sum(flat(jax.tree_util.tree_map(lambda g, i=i: g[i], per_example))
                 for i in range(4))
    np.testing.assert_allclose(flat(update), -summed / ROWS, rtol=0, atol=ATOL)
    # ... and not by the realised size, which would double the update.
    assert np.max(np.abs(flat(update) + summed / 4)) > 100 * ATOL


def test_microbatch_size_does_not_change_the_step(setup, sgd_step):
    _params, static, tokens, mesh = setup
    step = make_dp_step(model_loss_fn(static), optax.sgd(1.0),
                        DpSgdConfig(clip_norm=NO_CLIP, expected_batch_size=ROWS,
                                    microbatch_size=2), mesh)
    whole, _ = run(sgd_step, setup, tokens, np.ones(ROWS, bool))
    micro, _ = run(step, setup, tokens, np.ones(ROWS, bool))
    np.testing.assert_allclose(flat(micro), flat(whole), rtol=0, atol=ATOL)


def _variance_z(samples: np.ndarray, std: float) -> float:
    """z-score of the sample variance against std² (Var of s² is 2σ⁴/n for Gaussian data)."""
    n = samples.size
    return (np.mean(samples**2) / std**2 - 1.0) / math.sqrt(2.0 / n)


def test_add_noise_has_the_requested_scale_and_a_wrong_scale_is_rejected():
    std = 0.37
    zeros = {"a": jnp.zeros((300, 200)), "b": jnp.zeros((40_000,))}
    noisy = flat(add_noise(zeros, jax.random.key(3), std))
    assert abs(np.mean(noisy)) < 5 * std / math.sqrt(noisy.size)
    assert abs(_variance_z(noisy, std)) < 5
    # Power check: the same statistic rejects a scale only 5% off (z ≈ 0.1/0.0045 ≈ 22).
    assert abs(_variance_z(noisy, std * 1.05)) > 5
    assert abs(_variance_z(noisy, std / 1.05)) > 5


def test_dp_step_noise_is_sigma_c_over_expected_batch(setup, sgd_step):
    """The privatised update minus the noiseless one is N(0, (σC/B)²) per coordinate."""
    tokens = setup[2]
    mask = np.array([True] * 4 + [False] * 4)
    sigma = 2e-9  # with C = 1e9: σC = 2
    clean, _ = run(sgd_step, setup, tokens, mask, sigma=0.0)
    noisy, _ = run(sgd_step, setup, tokens, mask, sigma=sigma)
    noise = flat(noisy) - flat(clean)
    expected_std = sigma * NO_CLIP / ROWS
    assert noise.size > 5000
    assert abs(np.mean(noise)) < 5 * expected_std / math.sqrt(noise.size)
    assert abs(_variance_z(noise, expected_std)) < 5
    # Power: dividing by the realised batch (4), or a scale 10% off, is rejected.
    assert abs(_variance_z(noise, sigma * NO_CLIP / 4)) > 5
    assert abs(_variance_z(noise, expected_std * 1.1)) > 5


def test_noise_is_a_function_of_the_step(setup, sgd_step):
    tokens = setup[2]
    ones = np.ones(ROWS, bool)
    a, _ = run(sgd_step, setup, tokens, ones, sigma=1e-9, step_index=3)
    b, _ = run(sgd_step, setup, tokens, ones, sigma=1e-9, step_index=3)
    c, _ = run(sgd_step, setup, tokens, ones, sigma=1e-9, step_index=4)
    assert np.array_equal(flat(a), flat(b))
    assert not np.allclose(flat(a), flat(c))
