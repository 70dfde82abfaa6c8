"""The DP loss estimate and non-finite rows (dptrain.trainer._dpsgd guarantees 1, 2, 6)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dptrain.trainer import DpSgdConfig, build_model, make_dp_step, make_mesh, model_loss_fn
from dptrain.trainer._dpsgd import global_norms, local_clipped_sum
from dptrain.trainer._mesh import replicate, shard_batch

ROWS, LENGTH, POISON = 8, 16, 2


@pytest.fixture(scope="module")
def setup(micro_shape):
    model = build_model(micro_shape, key=jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_array)
    tokens = np.random.default_rng(0).integers(3, 259, size=(ROWS, LENGTH)).astype(np.int32)
    return params, static, tokens, make_mesh(jax.devices()[:1])


def _poisoned_loss(static, value):
    """The model's loss, times ``value`` (NaN or inf) for rows starting with POISON."""
    base = model_loss_fn(static)

    def loss(params, tokens):
        return base(params, tokens) * jnp.where(tokens[0] == POISON, value, 1.0)
    return loss


def _run(step, setup, tokens, mask, sigma=0.0, key=7):
    params, _, _, mesh = setup
    p, s = replicate(mesh, params), replicate(mesh, optax.sgd(1.0).init(params))
    t, m = shard_batch(mesh, tokens, mask)
    root = np.asarray(jax.random.key_data(jax.random.key(key)))
    new, _, metrics = step(p, s, t, m, root, np.int32(0), np.float32(sigma))
    flat = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b)) for a, b in
                           zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(params),
                               strict=True)])
    return flat, metrics


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_row_with_a_non_finite_gradient_contributes_exactly_zero(setup, value):
    _, static, tokens, mesh = setup
    step = make_dp_step(_poisoned_loss(static, value), optax.sgd(1.0),
                        DpSgdConfig(clip_norm=1.0, expected_batch_size=ROWS), mesh)
    poisoned = tokens.copy()
    poisoned[0, 0] = POISON
    ones = np.ones(ROWS, bool)
    without = ones.copy()
    without[0] = False
    with_row, metrics = _run(step, setup, poisoned, ones)
    without_row, _ = _run(step, setup, poisoned, without)
    assert np.all(np.isfinite(with_row)) and np.isfinite(float(metrics.dp_loss))
    assert np.array_equal(with_row, without_row)  # bit-for-bit: the row added exact zeros
    assert np.max(np.abs(with_row)) > 1e-4  # the other rows still train


@pytest.fixture(scope="module")
def dp_step(setup):
    _, static, _, mesh = setup
    config = DpSgdConfig(clip_norm=1.0, expected_batch_size=ROWS, loss_bound=8.0,
                         loss_share=0.25)
    return config, make_dp_step(model_loss_fn(static), optax.sgd(1.0), config, mesh)


def test_without_noise_the_dp_loss_is_the_mean_clipped_loss(setup, dp_step):
    config, step = dp_step
    tokens = setup[2]
    _, metrics = _run(step, setup, tokens, np.ones(ROWS, bool))
    assert 3.0 < float(metrics.loss) < config.loss_bound  # nothing clipped at this bound
    assert float(metrics.dp_loss) == pytest.approx(float(metrics.loss), rel=1e-5)
    # Divided by the expected batch (8), not the realised one (4).
    half = np.array([True] * 4 + [False] * 4)
    _, metrics = _run(step, setup, tokens, half)
    assert float(metrics.dp_loss) == pytest.approx(float(metrics.loss) / 2, rel=1e-5)


def test_losses_above_the_public_bound_are_clipped_to_it(setup):
    _, static, tokens, mesh = setup
    config = DpSgdConfig(clip_norm=1.0, expected_batch_size=ROWS, loss_bound=1.0)
    step = make_dp_step(model_loss_fn(static), optax.sgd(1.0), config, mesh)
    _, metrics = _run(step, setup, tokens, np.ones(ROWS, bool))
    assert float(metrics.loss) > 3.0
    assert float(metrics.dp_loss) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("loss_bound", [1.0, 8.0])
def test_each_example_moves_gradient_and_loss_coordinate_by_at_most_c(setup, loss_bound):
    params, static, tokens, _ = setup
    loss_fn = model_loss_fn(static)
    norms = np.asarray(global_norms(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(
        params, tokens)))
    clip = float(np.median(norms))  # half the gradients are clipped
    config = DpSgdConfig(clip_norm=clip, expected_batch_size=ROWS, loss_bound=loss_bound)
    one_row = jax.jit(lambda p, t, m: local_clipped_sum(loss_fn, p, t, m, config=config)[:2])
    for i in range(ROWS):
        mask = np.zeros(ROWS, bool)
        mask[i] = True
        grad_sum, coordinate = one_row(params, jnp.asarray(tokens), jnp.asarray(mask))
        grad_norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g)))
                                      for g in jax.tree_util.tree_leaves(grad_sum))))
        joint = math.hypot(grad_norm, float(coordinate))
        assert joint <= clip * (1 + 1e-5)
        assert grad_norm <= config.gradient_clip_norm * (1 + 1e-5)
        assert 0 < float(coordinate) <= config.loss_share * clip * (1 + 1e-6)
    # The bound is tight: a clipped gradient and a clipped loss reach exactly C together.
    assert config.gradient_clip_norm**2 + (config.loss_share * clip) ** 2 == pytest.approx(
        clip**2)


def test_the_loss_coordinate_gets_the_same_gaussian_noise(setup, dp_step):
    """dp_loss − clean = N(0, (σC)²)/(α·B): the loss is covered by the step's own noise."""
    config, step = dp_step
    tokens, ones, sigma = setup[2], np.ones(ROWS, bool), 0.5
    _, clean = _run(step, setup, tokens, ones)
    noise = np.array([float(_run(step, setup, tokens, ones, sigma=sigma, key=k)[1].dp_loss)
                      for k in range(300)]) - float(clean.dp_loss)
    std = sigma * config.clip_norm / (config.loss_scale * config.expected_batch_size)

    def z(scale):
        return (np.mean(noise**2) / scale**2 - 1) / math.sqrt(2 / noise.size)
    assert abs(np.mean(noise)) < 5 * std / math.sqrt(noise.size)
    assert abs(z(std)) < 5
    assert abs(z(std * 1.5)) > 5 and abs(z(std / 1.5)) > 5  # power: a wrong scale is rejected
