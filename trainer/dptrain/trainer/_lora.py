"""LoRA: low-rank adapters on the decoder's linear maps, trained alone with DP-SGD.

A target's linear map ``y = x W`` becomes ``y = x W + (alpha/rank)·(x A) B`` (Hu et al. 2021),
``A`` ``[fan_in, rank]`` drawn at random, ``B`` ``[rank, fan_out]`` zero, so that training
starts exactly at the base model. The adapters live in ``Decoder.lora`` (stacked on the layer
axis like the blocks); :func:`split` cuts a model into the trainable adapters, the frozen base
arrays and the static rest, so that the DP step differentiates, clips, noises and optimises the
adapters only (the base is an argument of the step, never updated: bit-identical after training).

Export either merges the adapters into the weights (:func:`merge`, ``W + scale·A B`` in float32)
or writes them alone in PEFT's adapter format (:func:`peft_tensors`, :func:`peft_config`).

Formal guarantees:
    1. The trainable part of a model with adapters is exactly its adapters: the gradient, its
       per-example norm, clipping and noise (and the optimizer state) cover ``A`` and ``B`` of
       every target and nothing else, so the DP-SGD mechanism (sensitivity ``C``, noise ``σC``
       on every trained coordinate) is the same as for full fine-tuning, on fewer coordinates.
    2. ``combine(*split(model)) == model`` and :func:`merge` of adapters whose ``B`` is zero
       equals the base model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dptrain.trainer._model import Adapters, Decoder, host_rng

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Hugging Face module of each target inside ``model.layers.{i}`` (Gemma 2 / VaultGemma).
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
_WEIGHTS = {"q": ("attn", "wq"), "k": ("attn", "wk"), "v": ("attn", "wv"), "o": ("attn", "wo"),
            "gate": ("mlp", "w_gate"), "up": ("mlp", "w_up"), "down": ("mlp", "w_down")}


class AdaptersUnchangedError(RuntimeError):
    """Training did not move the adapters (the run would silently return the base model)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, scale numerator and targets of the adapters (``spec.training.lora``)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"spec.training.lora.rank must be ≥ 1 (got {self.rank})")
        if not self.alpha > 0:
            raise ValueError(f"spec.training.lora.alpha must be > 0 (got {self.alpha})")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"spec.training.lora.targets must be distinct names among "
                             f"{', '.join(TARGETS)} (got {list(self.targets)})")

    @property
    def scale(self) -> float:
        """``alpha / rank``, PEFT's scaling."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """JSON form (checkpoint metadata)."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(rank=int(data["rank"]), alpha=float(data["alpha"]),
                   targets=tuple(data["targets"]))


def _weight(model: Decoder, target: str) -> jax.Array:
    module, name = _WEIGHTS[target]
    return getattr(getattr(model.blocks, module), name)


def fan_in_out(model: Decoder, target: str) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a target's linear map (heads × head_dim flattened)."""
    w = _weight(model, target)
    if target == "o":  # [n, heads, head_dim, d]
        return w.shape[1] * w.shape[2], w.shape[3]
    return w.shape[1], math.prod(w.shape[2:])


def add_adapters(model: Decoder, config: LoraConfig, *, key: jax.Array) -> Decoder:
    """``model`` with fresh adapters: ``A ~ N(0, 1/fan_in)``, ``B = 0`` (the base's function)."""
    if model.lora is not None:
        raise ValueError("the model already has adapters")
    rng = host_rng(key)
    n_layers = model.n_layers
    a: dict[str, jax.Array] = {}
    b: dict[str, jax.Array] = {}
    for target in config.targets:
        fan_in, fan_out = fan_in_out(model, target)
        values = rng.standard_normal((n_layers, fan_in, config.rank), dtype=np.float32)
        a[target] = jnp.asarray(values / np.float32(math.sqrt(fan_in)))
        b[target] = jnp.zeros((n_layers, config.rank, fan_out), jnp.float32)
    adapters = Adapters(a=a, b=b, scale=config.scale)
    return eqx.tree_at(lambda m: m.lora, model, adapters, is_leaf=lambda x: x is None)


def adapter_filter(model: Decoder) -> Any:
    """A filter spec selecting the adapters' arrays of ``model`` (all arrays without adapters)."""
    if model.lora is None:
        return jax.tree_util.tree_map(eqx.is_array, model)
    spec = jax.tree_util.tree_map(lambda _: False, model)
    return eqx.tree_at(lambda m: m.lora, spec,
                       jax.tree_util.tree_map(lambda _: True, model.lora))


def split(model: Decoder) -> tuple[Any, Any, Decoder]:
    """``(trainable, frozen, static)``: adapters (or every array), base arrays (or None), rest.

    ``eqx.combine(trainable, frozen, static)`` is the model.
    """
    if model.lora is None:
        params, static = eqx.partition(model, eqx.is_array)
        return params, None, static
    params, rest = eqx.partition(model, adapter_filter(model))
    frozen, static = eqx.partition(rest, eqx.is_array)
    return params, frozen, static


def delta(adapters: Adapters, target: str) -> jax.Array:
    """``scale·A B`` of a target, ``[n_layers, fan_in, fan_out]`` (float32)."""
    return adapters.scale * jnp.einsum("nir,nro->nio", adapters.a[target].astype(jnp.float32),
                                       adapters.b[target].astype(jnp.float32))


def merge(model: Decoder) -> Decoder:
    """The model with its adapters folded into the weights (``W + scale·A B``), no adapters."""
    adapters = model.lora
    if adapters is None:
        return model
    for target in adapters.a:
        w = _weight(model, target)
        update = delta(adapters, target).reshape(w.shape).astype(w.dtype)
        module, name = _WEIGHTS[target]
        model = eqx.tree_at(lambda m, mod=module, n=name: getattr(getattr(m.blocks, mod), n),
                            model, w + update)
    return eqx.tree_at(lambda m: m.lora, model, None)


def adapters_moved(before: Adapters, after: Adapters) -> list[str]:
    """Targets none of whose ``B`` entries changed (empty: every adapter moved)."""
    return [target for target in before.b
            if bool(jnp.array_equal(before.b[target], after.b[target]))]


def check_moved(before: Adapters, after: Adapters, *, step: int) -> None:
    """Fail loudly when training left some adapter's ``B`` untouched (it would stay zero).

    Raises:
        AdaptersUnchangedError: naming the targets that did not move.
    """
    still = adapters_moved(before, after)
    if still:
        raise AdaptersUnchangedError(
            f"LoRA adapters of targets {still} did not change in {step} step(s): they are not "
            "being trained (spec.training.lora), and the run would return the base model")


def peft_tensors(adapters: Adapters) -> dict[str, np.ndarray]:
    """The adapters under PEFT's key names.

    ``...layers.{i}.{module}.lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]``.
    """
    out: dict[str, np.ndarray] = {}
    for target in adapters.a:
        a = np.asarray(adapters.a[target], np.float32)
        b = np.asarray(adapters.b[target], np.float32)
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[target]}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return out


def peft_config(config: LoraConfig, *, base_model: str | None) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for ``config`` (``LoraConfig`` of a causal LM)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank,
            "lora_alpha": config.alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in config.targets),
            "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
            "init_lora_weights": True, "modules_to_save": None,
            "base_model_name_or_path": base_model}


def config_of(adapters: Adapters, targets: Sequence[str] | None = None) -> LoraConfig:
    """The :class:`LoraConfig` of existing adapters."""
    targets = tuple(targets or adapters.a)
    rank = int(next(iter(adapters.a.values())).shape[-1])
    return LoraConfig(rank=rank, alpha=adapters.scale * rank, targets=targets)
