"""LoRA: ghost clipping on adapters equals vmap(grad); only adapters train; merge is exact."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dptrain.planner import ModelShape
from dptrain.trainer import make_mesh
from dptrain.trainer._dpsgd import (
    DpSgdConfig,
    global_norms,
    local_clipped_sum,
    make_dp_step,
    model_loss_fn,
)
from dptrain.trainer._ghost import ghost_norms
from dptrain.trainer._lora import (
    AdaptersUnchangedError,
    LoraConfig,
    add_adapters,
    check_moved,
    merge,
    split,
)
from dptrain.trainer._model import Architecture, build_model

ROWS, LENGTH = 5, 13
SHAPE = ModelShape(name="lora-tiny", vocab_size=40, d_model=32, n_layers=2, n_heads=4,
                   n_kv_heads=2, head_dim=8, d_ff=48, max_seq_len=LENGTH - 1)
# Gemma 2's features, so the adapters' output gradients pass through every non-linearity.
GEMMA2 = Architecture(attn_softcap=1.0, final_softcap=2.0, query_scale=0.2, post_norms=True,
                      sliding_window=5, sliding_layers=(True, False), norm_eps=1e-5)


def _model(targets=("q", "k", "v", "o", "gate", "up", "down"), *, random_b=True, seed=0):
    base = build_model(SHAPE, key=jax.random.key(seed), arch=GEMMA2)
    model = add_adapters(base, LoraConfig(rank=3, alpha=6.0, targets=targets),
                         key=jax.random.key(seed + 1))
    if random_b:  # B = 0 would make every A-gradient zero: exercise both matrices
        rng = np.random.default_rng(seed)
        model = eqx.tree_at(lambda m: m.lora.b, model, {
            t: jnp.asarray(rng.normal(0, 0.3, b.shape), jnp.float32)
            for t, b in model.lora.b.items()})
    return base, model


def _tokens(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 12, size=(ROWS, LENGTH)).astype(np.int32)
    tokens[1, 7:] = 0  # trailing padding targets
    tokens[2, :] = 0  # an all-padding row
    return jnp.asarray(tokens)


ALL = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.mark.slow  # compiles the ghost and vmap(grad) paths: ~30 s on 2 shared cores
def test_ghost_equals_per_example_on_adapters():
    targets = ALL
    _, model = _model(targets)
    params, frozen, static = split(model)
    loss = model_loss_fn(static).with_frozen(frozen)
    tokens = _tokens()
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, tokens[:, :])
    # The reference gradient covers the adapters only.
    trained = jax.tree_util.tree_leaves(grads)
    assert len(trained) == 2 * len(targets)
    expected_norms = global_norms(grads)
    squared, _, _ = jax.jit(lambda p, t: ghost_norms(loss.static, p, t))(params, tokens)
    np.testing.assert_allclose(np.sqrt(np.asarray(squared)), np.asarray(expected_norms),
                               rtol=1e-5, atol=1e-7)
    norms = np.asarray(expected_norms)
    assert norms[2] == 0.0 and np.min(norms[[0, 1, 3]]) > 0
    # Clipped sums: clip at the median norm so some rows are clipped and some not.
    clip = float(np.median(np.asarray(expected_norms)[[0, 1, 3, 4]]))
    mask = jnp.array([True, True, True, True, False])
    sums = {}
    for mode in ("ghost", "per-example"):
        config = DpSgdConfig(clip_norm=clip / (1 - 0.25**2) ** 0.5, loss_share=0.25,
                             expected_batch_size=ROWS, clipping=mode)
        sums[mode] = jax.jit(lambda p, t, m, c=config: local_clipped_sum(
            loss, p, t, m, config=c))(params, tokens, mask)
    for a, e in zip(jax.tree_util.tree_leaves(sums["ghost"][0]),
                    jax.tree_util.tree_leaves(sums["per-example"][0]), strict=True):
        scale = float(jnp.max(jnp.abs(e)))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0, atol=1e-5 * scale)
    for a, e in zip(sums["ghost"][1:], sums["per-example"][1:], strict=True):
        np.testing.assert_allclose(float(a), float(e), rtol=1e-5)


@pytest.mark.slow  # one DP step compiled per case: ~25 s on 2 shared cores
@pytest.mark.parametrize(("clipping", "targets"), [("ghost", ALL), ("per-example", ("v", "down"))])
def test_dp_step_trains_adapters_only(clipping, targets):
    _, model = _model(targets, random_b=False)
    params, frozen, static = split(model)
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    adapters_before = jax.tree_util.tree_map(jnp.copy, params.lora)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    # Optimizer state only for the adapters: Adam's two moments of each adapter array.
    adapter_size = sum(x.size for x in jax.tree_util.tree_leaves(params))
    state_size = sum(x.size for x in jax.tree_util.tree_leaves(opt_state)
                     if getattr(x, "ndim", 0) > 0)
    assert state_size == 2 * adapter_size
    mesh = make_mesh()
    step = make_dp_step(model_loss_fn(static), optimizer,
                        DpSgdConfig(clip_norm=1.0, expected_batch_size=4.0, clipping=clipping),
                        mesh)
    key = jax.random.key_data(jax.random.key(7))
    tokens, mask = _tokens(), jnp.array([True, True, True, True, False])
    for i in range(3):
        params, opt_state, _ = step(params, opt_state, tokens, mask, key, np.int32(i),
                                    np.float32(0.5), frozen)
    for a, b in zip(jax.tree_util.tree_leaves(frozen_before), jax.tree_util.tree_leaves(frozen),
                    strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # bit-identical base
    check_moved(adapters_before, params.lora, step=3)  # raises if any B stayed put
    with pytest.raises(AdaptersUnchangedError, match="did not change"):
        check_moved(adapters_before, adapters_before, step=3)


def test_merge_equals_unmerged_and_zero_b_is_the_base():
    base, model = _model(random_b=False)
    tokens = _tokens()[0, :-1]
    # B = 0: the adapted model is the base exactly, and merging changes nothing.
    assert np.array_equal(np.asarray(model(tokens)), np.asarray(base(tokens)))
    _, model = _model(random_b=True)
    merged = merge(model)
    assert merged.lora is None
    np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(model(tokens)),
                               rtol=0, atol=1e-4)
    assert not np.allclose(np.asarray(merged(tokens)), np.asarray(base(tokens)), atol=1e-3)


def test_lora_config_rejects_bad_targets():
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=("q", "q"))
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)


@pytest.mark.slow  # compiles the batched (fp32, bf16), vmap and ghost paths: ~40 s on 2 cores
def test_batched_path_with_adapters_and_prompt_masks_equals_the_vmapped_model():
    """The batched path (ghost clipping's and the non-private step's) carries the adapters' delta
    on every target and reads instruction-masked tokens as the per-example model does."""
    from dptrain.trainer._ghost import cast_floating
    from dptrain.trainer._model import input_ids, mask_target

    base, model = _model(("q", "o", "up", "down"))
    tokens = np.array(_tokens(3))
    tokens[0, :4] = mask_target(tokens[0, :4])  # an instruction's prompt: no loss as targets
    tokens = jnp.asarray(tokens)
    inputs = input_ids(tokens[:, :-1])
    per_example = np.asarray(jax.jit(jax.vmap(model))(inputs))
    jax.config.update("jax_numpy_rank_promotion", "raise")  # the batched path broadcasts nothing
    try:
        batched = np.asarray(jax.jit(lambda t: model.forward(t)[0])(inputs))
        half = cast_floating(model, jnp.bfloat16)
        batched_bf16 = np.asarray(jax.jit(lambda t: half.forward(t)[0])(inputs), np.float32)
    finally:
        jax.config.update("jax_numpy_rank_promotion", "allow")
    scale = float(np.max(np.abs(per_example)))
    np.testing.assert_allclose(batched, per_example, rtol=0, atol=1e-5 * scale)
    # The adapters change the logits (so the comparison above covers their delta).
    unadapted = np.asarray(jax.jit(jax.vmap(base))(inputs))
    assert float(np.max(np.abs(unadapted - per_example))) > 1e-2 * scale
    # bf16 on the batched path: the float32 model's logits to bfloat16's precision.
    np.testing.assert_allclose(batched_bf16, per_example, rtol=0, atol=3e-2 * scale)

    params, frozen, static = split(model)
    loss = model_loss_fn(static).with_frozen(frozen)
    expected = global_norms(jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, tokens))
    squared, losses, tape = jax.jit(lambda p, t: ghost_norms(loss.static, p, t))(params, tokens)
    assert set(tape.book) == {f"{m}/{t}" for m in "ab" for t in ("q", "o", "up", "down")}
    np.testing.assert_allclose(np.sqrt(np.asarray(squared)), np.asarray(expected), rtol=1e-5,
                               atol=1e-7)
    assert float(squared[2]) == 0.0 and float(losses[2]) == 0.0  # the all-padding row
    np.testing.assert_allclose(np.asarray(losses),
                               np.asarray(jax.vmap(loss, in_axes=(None, 0))(params, tokens)),
                               rtol=1e-6)
