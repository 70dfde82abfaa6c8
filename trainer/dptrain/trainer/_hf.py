"""Hugging Face checkpoints of the Gemma 2 family in and out of dptrain's decoder.

A checkpoint directory holds ``config.json`` and ``*.safetensors`` (one file, or shards listed by
``model.safetensors.index.json``). It is read with the ``safetensors`` library into numpy (no
torch, no network) and mapped onto :class:`~dptrain.trainer._model.Decoder`:

=====================================================  =======================================
Hugging Face (``model.`` prefix; linear ``[out, in]``)  dptrain
=====================================================  =======================================
``embed_tokens.weight`` (tied ``lm_head``)             ``embedding`` ``[vocab, d]``
``layers.i.self_attn.{q,k,v}_proj.weight``             ``blocks.attn.w{q,k,v}[i]`` ``[d, h, hd]``
``layers.i.self_attn.o_proj.weight``                   ``blocks.attn.wo[i]`` ``[heads, hd, d]``
``layers.i.mlp.{gate,up,down}_proj.weight``            ``blocks.mlp.w_{gate,up,down}[i]``
``layers.i.input_layernorm.weight``                    ``blocks.attn_norm.scale[i]``
``layers.i.pre_feedforward_layernorm.weight``          ``blocks.mlp_norm.scale[i]``
``layers.i.post_{attention,feedforward}_layernorm``    ``blocks.{attn,mlp}_post_norm.scale[i]``
``norm.weight``                                        ``final_norm.scale``
=====================================================  =======================================

Both RMSNorm conventions are ``x / rms(x) · (1 + w)``, so scales map unchanged. Supported model
types: ``vaultgemma`` (no post-norms) and ``gemma2`` (post-norms). A configuration the decoder
cannot represent exactly is rejected with :class:`UnsupportedConfigError`, which names the key.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from dptrain.planner import ModelShape
from dptrain.trainer._model import Architecture, Decoder, build_model

SUPPORTED_TYPES = ("vaultgemma", "gemma2")
_ARCHITECTURES = {"vaultgemma": "VaultGemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}
_LAYER_TYPES = ("sliding_attention", "full_attention")


class PretrainedError(ValueError):
    """A pretrained checkpoint cannot be read or mapped."""


class UnsupportedConfigError(PretrainedError):
    """``config.json`` asks for something dptrain's decoder cannot represent exactly.

    Attributes:
        key: the offending configuration key.
    """

    def __init__(self, key: str, value: Any, rule: str) -> None:
        super().__init__(f"config.json: {key} = {value!r} is not supported: {rule}")
        self.key = key


def read_config(directory: str | pathlib.Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory.

    Raises:
        PretrainedError: missing or unreadable.
    """
    path = pathlib.Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise PretrainedError(f"{path}: no config.json (not a Hugging Face checkpoint)") from None
    except (OSError, ValueError) as error:
        raise PretrainedError(f"{path}: unreadable: {error}") from None
    if not isinstance(config, dict):
        raise PretrainedError(f"{path}: must hold a JSON object")
    return config


def _positive_int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UnsupportedConfigError(key, value, "must be a positive integer")
    return value


def _optional_float(config: Mapping[str, Any], key: str) -> float | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise UnsupportedConfigError(key, value, "must be a positive number or null")
    return float(value)


def _rope_theta(config: Mapping[str, Any]) -> float:
    rope = config.get("rope_parameters")
    if rope is None:  # older configs: rope_theta / rope_scaling at the top level
        if config.get("rope_scaling") is not None:
            raise UnsupportedConfigError("rope_scaling", config["rope_scaling"],
                                         "only unscaled (default) RoPE is implemented")
        return float(config.get("rope_theta", 10_000.0))
    if not isinstance(rope, dict):
        raise UnsupportedConfigError("rope_parameters", rope, "must be an object")
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedConfigError("rope_parameters.rope_type", rope.get("rope_type"),
                                     "only the default RoPE is implemented")
    theta = rope.get("rope_theta", 10_000.0)
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise UnsupportedConfigError("rope_parameters.rope_theta", theta, "must be positive")
    return float(theta)


def shape_and_arch(config: Mapping[str, Any]) -> tuple[ModelShape, Architecture]:
    """The dptrain model shape and architecture switches for a Hugging Face ``config``.

    Raises:
        UnsupportedConfigError: a key whose value the decoder cannot represent (named).
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedConfigError("model_type", model_type,
                                     f"supported model types are {', '.join(SUPPORTED_TYPES)}")
    activation = config.get("hidden_activation") or config.get("hidden_act")
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedConfigError("hidden_activation", activation,
                                     "the MLP is GeGLU with tanh-approximated GELU "
                                     "(gelu_pytorch_tanh)")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if config.get(key):
            raise UnsupportedConfigError(key, config[key], "the decoder is causal, without biases")
    if config.get("tie_word_embeddings", True) is not True:
        raise UnsupportedConfigError("tie_word_embeddings", config["tie_word_embeddings"],
                                     "the output projection is tied to the embedding")
    if config.get("attention_dropout") not in (None, 0, 0.0):
        raise UnsupportedConfigError("attention_dropout", config["attention_dropout"],
                                     "dptrain trains without dropout")
    d_model = _positive_int(config, "hidden_size")
    n_heads = _positive_int(config, "num_attention_heads")
    n_kv = config.get("num_key_value_heads", n_heads)
    if not isinstance(n_kv, int) or n_kv < 1 or n_heads % n_kv:
        raise UnsupportedConfigError("num_key_value_heads", n_kv,
                                     f"must divide num_attention_heads ({n_heads})")
    head_dim = config.get("head_dim") or d_model // n_heads
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise UnsupportedConfigError("head_dim", head_dim, "must be an even positive integer")
    n_layers = _positive_int(config, "num_hidden_layers")
    shape = ModelShape(
        name=f"hf-{model_type}", vocab_size=_positive_int(config, "vocab_size"), d_model=d_model,
        n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        d_ff=_positive_int(config, "intermediate_size"),
        max_seq_len=_positive_int(config, "max_position_embeddings"))
    layer_types = config.get("layer_types")
    if layer_types is None:  # the families' default: alternate sliding and full, sliding first
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                       for i in range(n_layers)]
    if (not isinstance(layer_types, list) or len(layer_types) != n_layers
            or any(t not in _LAYER_TYPES for t in layer_types)):
        raise UnsupportedConfigError("layer_types", layer_types,
                                     f"must list {n_layers} of {', '.join(_LAYER_TYPES)}")
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    window = config.get("sliding_window")
    if any(sliding) and (not isinstance(window, int) or window < 1):
        raise UnsupportedConfigError("sliding_window", window,
                                     "sliding layers need a positive integer window")
    scalar = config.get("query_pre_attn_scalar", head_dim)
    if not isinstance(scalar, (int, float)) or not scalar > 0:
        raise UnsupportedConfigError("query_pre_attn_scalar", scalar, "must be positive")
    eps = config.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise UnsupportedConfigError("rms_norm_eps", eps, "must be positive")
    arch = Architecture(
        attn_softcap=_optional_float(config, "attn_logit_softcapping"),
        final_softcap=_optional_float(config, "final_logit_softcapping"),
        query_scale=float(scalar) ** -0.5, post_norms=model_type == "gemma2",
        sliding_window=window if any(sliding) else None,
        sliding_layers=sliding if any(sliding) else (), rope_theta=_rope_theta(config),
        norm_eps=float(eps))
    return shape, arch


# ------------------------------------------------------------------------------------ tensors


def _shard_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise PretrainedError(f"{index}: unreadable shard index: {error}") from None
        names = sorted(set(weight_map.values()))
        files = [directory / name for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise PretrainedError(f"{index}: shards missing: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise PretrainedError(f"{directory}: no *.safetensors files")
    return files


def _read_bf16(path: pathlib.Path, name: str, info: Mapping[str, Any],
               header_size: int) -> np.ndarray:
    """One BF16 tensor as float32 (numpy has no bfloat16; the bits are the high half)."""
    start, end = info["data_offsets"]
    with path.open("rb") as handle:
        handle.seek(8 + header_size + start)
        raw = np.frombuffer(handle.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def read_tensors(directory: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, as float32 numpy arrays.

    Raises:
        PretrainedError: missing or unreadable files.
    """
    directory = pathlib.Path(directory)
    tensors: dict[str, np.ndarray] = {}
    for path in _shard_files(directory):
        try:
            with path.open("rb") as handle:
                (header_size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_size))
            with safe_open(str(path), framework="numpy") as reader:
                for name in reader.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    info = header[name]
                    if info["dtype"] == "BF16":
                        tensors[name] = _read_bf16(path, name, info, header_size)
                    else:
                        tensors[name] = np.asarray(reader.get_tensor(name), dtype=np.float32)
        except (OSError, ValueError, KeyError, struct.error) as error:
            raise PretrainedError(f"{path}: unreadable safetensors file: {error}") from None
    return tensors


def _hf_names(n_layers: int, post_norms: bool) -> dict[str, tuple[str, int | None]]:
    """HF tensor name -> (dptrain leaf, layer index or None)."""
    names: dict[str, tuple[str, int | None]] = {
        "model.embed_tokens.weight": ("embedding", None),
        "model.norm.weight": ("final_norm", None)}
    per_layer = {"self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
                 "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
                 "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up",
                 "mlp.down_proj.weight": "w_down", "input_layernorm.weight": "attn_norm",
                 "pre_feedforward_layernorm.weight": "mlp_norm"}
    if post_norms:
        per_layer |= {"post_attention_layernorm.weight": "attn_post_norm",
                      "post_feedforward_layernorm.weight": "mlp_post_norm"}
    for i in range(n_layers):
        for suffix, leaf in per_layer.items():
            names[f"model.layers.{i}.{suffix}"] = (leaf, i)
    return names


def _to_dptrain(leaf: str, w: np.ndarray, shape: ModelShape) -> np.ndarray:
    d, h, g, k = shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim
    expected = {"wq": (h * k, d), "wk": (g * k, d), "wv": (g * k, d), "wo": (d, h * k),
                "w_gate": (shape.d_ff, d), "w_up": (shape.d_ff, d), "w_down": (d, shape.d_ff),
                "embedding": (shape.vocab_size, d)}.get(leaf, (d,))
    if tuple(w.shape) != expected:
        raise PretrainedError(f"tensor for {leaf} has shape {tuple(w.shape)}, config.json "
                              f"implies {expected}")
    if leaf in ("wq", "wk", "wv"):
        return w.T.reshape(d, -1, k)
    if leaf == "wo":
        return w.T.reshape(h, k, d)
    if leaf in ("w_gate", "w_up", "w_down"):
        return w.T
    return w


def _leaf_getters() -> dict[str, Any]:
    return {"embedding": lambda m: m.embedding, "final_norm": lambda m: m.final_norm.scale,
            **{name: (lambda m, n=name: getattr(m.blocks.attn, n)) for name in
               ("wq", "wk", "wv", "wo")},
            **{name: (lambda m, n=name: getattr(m.blocks.mlp, n)) for name in
               ("w_gate", "w_up", "w_down")},
            **{name: (lambda m, n=name: getattr(m.blocks, n).scale) for name in
               ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm")}}


def load_pretrained(directory: str | pathlib.Path) -> tuple[Decoder, dict[str, Any]]:
    """The decoder of a Hugging Face checkpoint directory, and its ``config.json``.

    Raises:
        UnsupportedConfigError: the configuration cannot be represented (names the key).
        PretrainedError: files missing, unreadable, or tensors missing / of the wrong shape.
    """
    directory = pathlib.Path(directory)
    config = read_config(directory)
    shape, arch = shape_and_arch(config)
    tensors = read_tensors(directory)
    if "lm_head.weight" in tensors and not np.array_equal(
            tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
        raise UnsupportedConfigError("tie_word_embeddings", config.get("tie_word_embeddings"),
                                     "lm_head.weight differs from the embedding")
    names = _hf_names(shape.n_layers, arch.post_norms)
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise PretrainedError(f"{directory}: tensors missing: {', '.join(missing[:5])}"
                              + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    unknown = sorted(set(tensors) - set(names) - {"lm_head.weight"})
    if unknown:
        raise PretrainedError(f"{directory}: tensors dptrain would ignore: "
                              f"{', '.join(unknown[:5])}")
    stacked: dict[str, list[np.ndarray | None]] = {}
    single: dict[str, np.ndarray] = {}
    for name, (leaf, layer) in names.items():
        value = _to_dptrain(leaf, tensors[name], shape)
        if layer is None:
            single[leaf] = value
        else:
            stacked.setdefault(leaf, [None] * shape.n_layers)[layer] = value
    arrays = single | {leaf: np.stack(values) for leaf, values in stacked.items()}  # type: ignore[arg-type]
    # The structure and static fields of the decoder; every array is replaced below, so a
    # one-unit-wide stand-in avoids initialising (and holding) a second full-size model.
    stand_in = dataclasses.replace(shape, vocab_size=1, d_model=1, n_layers=1, n_heads=1,
                                   n_kv_heads=1, head_dim=1, d_ff=1)
    template = build_model(stand_in, key=jax.random.key(0), arch=arch)
    getters = _leaf_getters()
    model = eqx.tree_at(lambda m: [getters[leaf](m) for leaf in arrays], template,
                        [jnp.asarray(value, jnp.float32) for value in arrays.values()])
    return model, config


def hf_config(shape: ModelShape, arch: Architecture, *,
              base: Mapping[str, Any] | None = None,
              special_tokens: Mapping[str, int | None] | None = None) -> dict[str, Any]:
    """A ``config.json`` for a dptrain model (``base``: the imported one, kept where it agrees)."""
    model_type = "gemma2" if arch.post_norms else "vaultgemma"
    head_dim = shape.head_dim
    scale = arch.query_scale if arch.query_scale is not None else head_dim ** -0.5
    scalar = scale ** -2.0
    layer_types = ["sliding_attention" if s else "full_attention" for s in arch.sliding_layers] \
        or ["full_attention"] * shape.n_layers
    out: dict[str, Any] = dict(base or {})
    out.update({
        "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": shape.vocab_size, "hidden_size": shape.d_model,
        "intermediate_size": shape.d_ff, "num_hidden_layers": shape.n_layers,
        "num_attention_heads": shape.n_heads, "num_key_value_heads": shape.n_kv_heads,
        "head_dim": head_dim, "max_position_embeddings": shape.max_seq_len,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": arch.norm_eps,
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
        "query_pre_attn_scalar": round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
        "attn_logit_softcapping": arch.attn_softcap,
        "final_logit_softcapping": arch.final_softcap,
        # transformers builds a sliding-window mask even when no layer uses it, and refuses a
        # null window: a window as long as the context changes nothing (every layer is full).
        "sliding_window": (arch.sliding_window if arch.sliding_window is not None
                           else shape.max_seq_len),
        "layer_types": layer_types,
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta},
        "dtype": "float32"})
    out.pop("rope_theta", None)
    out.pop("rope_scaling", None)
    out.pop("torch_dtype", None)
    out.setdefault("use_cache", True)
    if special_tokens:
        out.update({key: value for key, value in special_tokens.items() if value is not None})
    return out


def hf_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """The Hugging Face state dict (float32 numpy) of a dptrain decoder; inverse of loading."""
    shape_d = model.embedding.shape[1]
    getters = _leaf_getters()
    out: dict[str, np.ndarray] = {}
    post_norms = model.blocks.attn_post_norm is not None
    for name, (leaf, layer) in _hf_names(model.n_layers, post_norms).items():
        value = np.asarray(getters[leaf](model), dtype=np.float32)
        if layer is not None:
            value = value[layer]
        if leaf in ("wq", "wk", "wv"):
            value = value.reshape(shape_d, -1).T
        elif leaf == "wo":
            value = value.reshape(-1, shape_d).T
        elif leaf in ("w_gate", "w_up", "w_down"):
            value = value.T
        out[name] = np.ascontiguousarray(value)
    return out


def save_tensors(model: Decoder, path: str | pathlib.Path) -> None:
    """Write ``model``'s Hugging Face state dict to one ``.safetensors`` file."""
    save_file(hf_tensors(model), str(path), metadata={"format": "pt"})
