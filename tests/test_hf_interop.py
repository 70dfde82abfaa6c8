"""Hugging Face checkpoints in: dptrain's decoder equals transformers' VaultGemma and Gemma 2."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dptrain.trainer._hf import (
    PretrainedError,
    UnsupportedConfigError,
    hf_tensors,
    load_pretrained,
    read_tensors,
)
from dptrain.trainer._model import sequence_loss

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from hf_checkpoints import make_checkpoint

# Prompts of several lengths: shorter and longer than the sliding window (5), with repeats.
PROMPTS = [[1, 72, 101, 108, 108, 111], [1, 5, 9, 200, 7, 7, 7, 31, 44, 12, 90, 3, 250, 11],
           [*range(3, 40, 2), 1, 2, 3, 4, 5, 6, 7, 8, 9]]
LOGIT_TOLERANCE = 1e-4  # absolute, in logits (fp32)


@pytest.fixture(scope="module", params=["vaultgemma", "gemma2"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    torch_model = make_checkpoint(directory, request.param)
    return request.param, directory, torch_model


def _torch_logits(torch_model, tokens):
    with torch.no_grad():
        return torch_model(torch.tensor([tokens])).logits[0].numpy()


def test_logits_equal_transformers_on_several_prompts(checkpoint):
    model_type, directory, torch_model = checkpoint
    model, config = load_pretrained(directory)
    assert config["model_type"] == model_type
    assert (model.blocks.attn_post_norm is not None) == (model_type == "gemma2")
    forward = jax.jit(model.__call__)
    for tokens in PROMPTS:
        expected = _torch_logits(torch_model, tokens)
        got = np.asarray(forward(jnp.asarray(tokens, jnp.int32)))
        assert got.shape == expected.shape
        assert np.max(np.abs(got - expected)) < LOGIT_TOLERANCE
        # The final soft-cap bends: logits reach well into tanh's curve (cap 3).
        assert np.max(np.abs(expected)) > 1.5


def test_step_zero_loss_equals_transformers_loss(checkpoint):
    _, directory, torch_model = checkpoint
    model, _ = load_pretrained(directory)
    loss = jax.jit(sequence_loss)
    for tokens in PROMPTS:  # no padding id (0) among the targets: every token counts
        with torch.no_grad():
            expected = float(torch_model(torch.tensor([tokens]),
                                         labels=torch.tensor([tokens])).loss)
        got = float(loss(model, jnp.asarray(tokens, jnp.int32)))
        assert got == pytest.approx(expected, abs=1e-5)  # nats


def test_export_tensors_are_the_imported_ones(checkpoint):
    _, directory, _ = checkpoint
    model, _ = load_pretrained(directory)
    original = read_tensors(directory)
    exported = hf_tensors(model)
    assert set(exported) == set(original) - {"lm_head.weight"}
    for name, value in exported.items():
        np.testing.assert_array_equal(value, original[name])


def test_sharded_and_bf16_checkpoints_load(tmp_path):
    whole, sharded, half = tmp_path / "whole", tmp_path / "sharded", tmp_path / "bf16"
    make_checkpoint(whole, "gemma2", seed=1)
    make_checkpoint(sharded, "gemma2", seed=1, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    make_checkpoint(half, "gemma2", seed=1, dtype=torch.bfloat16)
    reference = jax.tree_util.tree_leaves(load_pretrained(whole)[0])
    for leaf, ref in zip(jax.tree_util.tree_leaves(load_pretrained(sharded)[0]), reference,
                         strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))
    for leaf, ref in zip(jax.tree_util.tree_leaves(load_pretrained(half)[0]), reference,
                         strict=True):
        # bfloat16 keeps 8 significant bits: relative error ≤ 2^-8.
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), rtol=2**-8, atol=0)
        assert leaf.dtype == jnp.float32


@pytest.mark.parametrize(("key", "value"), [
    ("model_type", "llama"), ("attention_bias", True), ("tie_word_embeddings", False),
    ("hidden_activation", "silu"), ("num_key_value_heads", 3),
    ("layer_types", ["sliding_attention"]),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
])
def test_configs_dptrain_cannot_represent_are_rejected_naming_the_key(checkpoint, tmp_path,
                                                                      key, value):
    _, directory, _ = checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfigError) as caught:
        load_pretrained(copy)
    assert caught.value.key.split(".")[0] == key
    assert key in str(caught.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(PretrainedError, match=r"config\.json"):
        load_pretrained(tmp_path)
