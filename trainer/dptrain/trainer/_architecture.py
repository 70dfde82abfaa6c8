"""The decoder's architecture switches beyond its shape, and the pieces they select.

:class:`Architecture` is static (hashable) configuration: the default is dptrain's from-scratch
decoder; pretrained Gemma-2-family checkpoints set soft-caps, the query scale, post-norms,
sliding-window layers, the RoPE base and the RMSNorm epsilon (see ``_hf.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_BASE = 10_000.0
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The architecture switches beyond :class:`ModelShape` (static; hashable).

    Attributes:
        attn_softcap: attention logits become ``cap·tanh(s/cap)`` before masking (None: off).
        final_softcap: output logits become ``cap·tanh(z/cap)`` (None: off).
        query_scale: factor on the queries (None: ``head_dim ** -0.5``); Gemma 2 uses
            ``query_pre_attn_scalar ** -0.5``.
        post_norms: Gemma 2's RMSNorm on the attention and MLP outputs before the residual add.
        sliding_window: window ``W`` of the sliding layers: position ``l`` sees ``m`` when
            ``l - W < m <= l``.
        sliding_layers: one flag per layer (empty: no sliding layers).
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
    """

    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_scale: float | None = None
    post_norms: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    rope_theta: float = ROPE_BASE
    norm_eps: float = NORM_EPS

    def windows(self, n_layers: int, length: int) -> np.ndarray:
        """Each layer's attention window (``length`` or more: full causal attention)."""
        full = max(length, 1)
        if not self.sliding_layers or self.sliding_window is None:
            return np.full((n_layers,), full, np.int32)
        if len(self.sliding_layers) != n_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for "
                             f"{n_layers} layers")
        return np.asarray([min(self.sliding_window, full) if sliding else full
                           for sliding in self.sliding_layers], np.int32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for checkpoint metadata)."""
        out = dataclasses.asdict(self)
        out["sliding_layers"] = list(self.sliding_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "sliding_layers": tuple(data.get("sliding_layers", ()))})


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap·tanh(x/cap)`` (identity when ``cap`` is None)."""
    if cap is None:
        return x
    c = jnp.asarray(np.float32(cap), x.dtype)  # the compute dtype (float32 or bfloat16)
    return jnp.tanh(x / c) * c


def visibility(query_pos: Any, key_pos: Any, window: jax.Array | int | None) -> jax.Array:
    """``[L, M]``: key ``m`` is visible from query ``l`` when ``l - window < m <= l``."""
    q = jnp.asarray(query_pos)[:, None]
    k = jnp.asarray(key_pos)[None, :]
    causal = k <= q
    return causal if window is None else causal & (k > q - window)
