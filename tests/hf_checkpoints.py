"""Tiny random VaultGemma / Gemma 2 checkpoints, made offline with transformers (test helper).

The weights are re-drawn at a scale where every feature matters (the families' default init has
zero norm scales and logits too small for the soft-caps to bend), and the configuration uses
small soft-caps, a ``query_pre_attn_scalar`` unlike ``head_dim``, a sliding window shorter than
the prompts, a RoPE base and an epsilon unlike the defaults: a mapping that ignored any of them
would miss the 1e-4 parity by orders of magnitude.
"""

from __future__ import annotations

import pathlib

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, VaultGemmaConfig, VaultGemmaForCausalLM

from dptrain.planner import BYTE_VOCAB_SIZE

FAMILIES = {"vaultgemma": (VaultGemmaConfig, VaultGemmaForCausalLM),
            "gemma2": (Gemma2Config, Gemma2ForCausalLM)}


def tiny_config(model_type: str, **overrides: object):
    config_cls, _ = FAMILIES[model_type]
    settings = dict(vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    query_pre_attn_scalar=24, sliding_window=5, max_position_embeddings=128,
                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0, rms_norm_eps=1e-3,
                    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    settings.update(overrides)
    return config_cls(**settings)


def make_checkpoint(directory: pathlib.Path, model_type: str, *, seed: int = 0,
                    dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                    **overrides: object) -> torch.nn.Module:
    """Write a random checkpoint of ``model_type`` to ``directory``; return the torch model."""
    torch.manual_seed(seed)
    _, model_cls = FAMILIES[model_type]
    model = model_cls(tiny_config(model_type, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = 0.3 if "norm" in name else 0.15
            param.copy_(torch.randn_like(param) * std)
    model = model.to(dtype).eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return model
