"""spec.training.precision: bf16 computes in bfloat16 on float32 masters and trains like fp32."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dptrain.planner import ModelShape
from dptrain.trainer import make_mesh
from dptrain.trainer._dpsgd import DpSgdConfig, make_dp_step, model_loss_fn
from dptrain.trainer._model import build_model

SHAPE = ModelShape(name="bf16-tiny", vocab_size=48, d_model=32, n_layers=2, n_heads=4,
                   n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=24)
ROWS, LENGTH, STEPS = 16, 25, 50


def _batches(seed=0):
    """A learnable stream: each token mostly follows a fixed successor of the previous one."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(SHAPE.vocab_size - 3) + 3
    tokens = np.zeros((STEPS, ROWS, LENGTH), np.int32)
    tokens[:, :, 0] = rng.integers(3, SHAPE.vocab_size, size=(STEPS, ROWS))
    for t in range(1, LENGTH):
        follow = rng.random((STEPS, ROWS)) < 0.8
        noise = rng.integers(3, SHAPE.vocab_size, size=(STEPS, ROWS))
        tokens[:, :, t] = np.where(follow, successor[tokens[:, :, t - 1] - 3], noise)
    return jnp.asarray(tokens)


@pytest.mark.slow  # two gradient compilations: ~25 s on 2 shared cores
def test_bf16_matmuls_run_in_bfloat16_on_float32_masters():
    model = build_model(SHAPE, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    tokens = _batches()[0, 0]
    jaxpr = str(jax.make_jaxpr(model_loss_fn(static, precision="bf16"))(params, tokens))
    dots = re.findall(r"dot_general\[[^\]]*\][^\n]*", jaxpr)
    assert dots and all("bf16" in line for line in jaxpr.splitlines() if "dot_general" in line)
    assert "bf16" not in str(jax.make_jaxpr(model_loss_fn(static))(params, tokens))
    grads = jax.grad(model_loss_fn(static, precision="bf16"))(params, tokens)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(grads)} == {jnp.dtype("float32")}
    with pytest.raises(ValueError, match="precision"):
        model_loss_fn(static, precision="fp8")


@pytest.mark.slow  # two 50-step runs: ~60 s on 2 shared cores
@pytest.mark.parametrize("clipping", ["ghost"])
def test_bf16_training_loss_stays_within_two_percent_of_fp32(clipping):
    mesh, batches = make_mesh(), _batches()
    key = jax.random.key_data(jax.random.key(3))
    mask = jnp.ones((ROWS,), bool)
    curves, masters = {}, {}
    for precision in ("fp32", "bf16"):
        model = build_model(SHAPE, key=jax.random.key(0))
        params, static = eqx.partition(model, eqx.is_array)
        optimizer = optax.adam(1e-2)
        opt_state = optimizer.init(params)
        step = make_dp_step(model_loss_fn(static, precision=precision), optimizer,
                            DpSgdConfig(clip_norm=1.0, expected_batch_size=ROWS,
                                        clipping=clipping), mesh)
        losses = []
        for i in range(STEPS):
            params, opt_state, metrics = step(params, opt_state, batches[i], mask, key,
                                              np.int32(i), np.float32(0.3))
            losses.append(float(metrics.loss))
        curves[precision] = np.asarray(losses)
        masters[precision] = {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)}
    assert masters["bf16"] == {jnp.dtype("float32")}  # float32 master weights
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert fp32[-5:].mean() < 0.9 * fp32[:5].mean(), fp32  # it learned something
    assert not np.array_equal(fp32, bf16)  # the precisions differ...
    # ...but the loss after 50 steps (mean of the last 5, raw) agrees within 2 %.
    assert abs(bf16[-5:].mean() - fp32[-5:].mean()) <= 0.02 * fp32[-5:].mean(), (fp32, bf16)
