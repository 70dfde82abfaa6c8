"""The memorization audit: statistics, and the contrast it exists for (DP vs a σ = 0 twin)."""

import math

import numpy as np
import pytest

from dptrain.trainer import clopper_pearson, edit_distance


def test_clopper_pearson_matches_closed_forms():
    low, high = clopper_pearson(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-9)
    low, high = clopper_pearson(10, 10)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 10), rel=1e-9)
    low, high = clopper_pearson(5, 10)
    assert low == pytest.approx(0.18709, abs=1e-4) and high == pytest.approx(0.81291, abs=1e-4)


def test_edit_distance():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance([1, 2, 3], [4, 5, 6]) == 3
    assert edit_distance([], [1, 2]) == 2


@pytest.mark.slow
def test_non_private_twin_memorizes_canaries_and_the_dp_model_does_not(tmp_path):
    import equinox as eqx
    import jax

    from dptrain.planner import BYTE_VOCAB_SIZE, ModelShape
    from dptrain.trainer import (
        ByteTokenizer,
        DpSgdConfig,
        PoissonSampler,
        build_model,
        make_canaries,
        make_dp_step,
        make_mesh,
        make_optimizer,
        memorization,
        model_loss_fn,
        prepare_dataset,
        source_from_spec,
    )
    from dptrain.trainer._mesh import replicate, shard_batch

    tokenizer = ByteTokenizer()
    (tmp_path / "filler.jsonl").write_text(
        "".join('{"text": "the library documents every module and function"}\n'
                for _ in range(40)))
    canaries = make_canaries(tokenizer, count=4, length=100, seed=1)
    source = source_from_spec(path=str(tmp_path / "filler.jsonl"), builtin=None, fmt="jsonl",
                              text_field="text")
    dataset = prepare_dataset(source, tokenizer, sequence_length=100, out_dir=tmp_path / "d",
                              canaries=canaries, canary_repeats=32, progress=False)
    # One layer of width 64 memorizes 4 random 100-token canaries in 100 non-private steps.
    shape = ModelShape(name="audit", vocab_size=BYTE_VOCAB_SIZE, d_model=64, n_layers=1,
                       n_heads=2, n_kv_heads=1, head_dim=16, d_ff=128, max_seq_len=100)
    mesh = make_mesh(jax.devices()[:1])
    steps, expected = 100, 16
    optimizer = make_optimizer("adamw", learning_rate=1e-2, total_steps=steps, warmup_steps=5)
    params0, static = eqx.partition(build_model(shape, key=jax.random.key(0)), eqx.is_array)
    step = make_dp_step(model_loss_fn(static), optimizer,
                        DpSgdConfig(clip_norm=1.0, expected_batch_size=expected), mesh)
    sampler = PoissonSampler(dataset_size=dataset.num_sequences, expected_batch_size=expected,
                             physical_batch_size=24, key=bytes(32))
    root = np.asarray(jax.random.key_data(jax.random.key(0)))

    def trained(sigma):
        params = replicate(mesh, params0)
        state = replicate(mesh, optimizer.init(params0))
        for t in range(steps):
            batch = sampler.sample(t)
            tokens, mask = shard_batch(mesh, dataset.gather(batch.indices, 0), batch.mask)
            params, state, _ = step(params, state, tokens, mask, root, np.int32(t),
                                    np.float32(sigma))
        return eqx.combine(params, static)

    prompts = np.asarray(canaries, dtype=np.int32)
    twin = memorization(trained(0.0), prompts, batch_size=4)
    private = memorization(trained(4.0), prompts, batch_size=4)
    assert twin.approximate.rate >= 0.75, twin
    assert private.approximate.rate == 0.0 and private.exact.rate == 0.0, private
    assert math.isclose(private.exact.high, 1 - 0.025 ** (1 / 4))
