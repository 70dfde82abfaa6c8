"""Model shapes of the Gemma-2-style decoder family, and their size arithmetic.

The planner reasons about model size; the trainer builds models from these shapes. Keeping the
shapes here (pure Python, no JAX) lets the operator size pods without importing the trainer.

The architecture is VaultGemma's: pre-norm RMSNorm (no post-norms), multi-query attention with
RoPE, GeGLU MLP, tied input/output embeddings, full attention in every layer.
"""

from __future__ import annotations

import dataclasses
import math
import re

BYTE_VOCAB_SIZE = 256 + 3  # bytes + <pad>, <bos>, <eos>


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The hyper-parameters that fix a decoder's shape.

    Attributes:
        name: preset name (or ``custom-<params>`` for a shape made by :func:`scaled_shape`).
        vocab_size: embedding rows (tied with the output projection).
        d_model: residual stream width.
        n_layers: decoder blocks.
        n_heads: query heads.
        n_kv_heads: key/value heads (1 = multi-query attention, as in VaultGemma).
        head_dim: width of one attention head.
        d_ff: hidden width of *one* GeGLU branch (gate and up each have this width).
        max_seq_len: longest sequence the RoPE tables are built for.
        post_norms: Gemma 2's RMSNorms on the attention and MLP outputs (two more scales per
            block). Counted here so that ``param_count`` is exact for such checkpoints; the
            decoder builds them from ``Architecture.post_norms``, which is set with it.
    """

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int = 1
    head_dim: int
    d_ff: int
    max_seq_len: int
    post_norms: bool = False

    def __post_init__(self) -> None:
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                      "d_ff", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{field} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                f"({self.n_kv_heads})")

    def with_vocab(self, vocab_size: int) -> ModelShape:
        """The same shape with another vocabulary (e.g. a SentencePiece model's)."""
        return dataclasses.replace(self, vocab_size=vocab_size)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder block."""
        attention = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.d_model * self.d_ff
        norms = (4 if self.post_norms else 2) * self.d_model
        return attention + mlp + norms

    @property
    def embedding_params(self) -> int:
        """Parameters of the (tied) embedding table."""
        return self.vocab_size * self.d_model

    @property
    def param_count(self) -> int:
        """All trainable parameters: embedding, blocks and the final norm."""
        return self.embedding_params + self.n_layers * self.layer_params + self.d_model

    @property
    def non_embedding_params(self) -> int:
        """Parameters outside the embedding table (the M of most scaling laws)."""
        return self.param_count - self.embedding_params

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·M for the matmuls plus attention scores.

        Forward is 2 FLOPs per multiply-add; backward twice the forward. The attention term is
        ``6 · 2 · n_layers · seq_len · n_heads · head_dim`` (QKᵀ and AV, causal mask ignored, as in
        the Chinchilla accounting). Tied output projection counts once as a matmul.
        """
        matmul = 6.0 * self.param_count
        attention = 12.0 * self.n_layers * seq_len * self.n_heads * self.head_dim
        return matmul + attention


def _shape(name: str, d_model: int, n_layers: int, n_heads: int, head_dim: int, d_ff: int,
           max_seq_len: int = 1024, vocab_size: int = BYTE_VOCAB_SIZE) -> ModelShape:
    return ModelShape(name=name, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                      n_heads=n_heads, n_kv_heads=1, head_dim=head_dim, d_ff=d_ff,
                      max_seq_len=max_seq_len)


# Named presets, smallest first. `tiny` trains on 2 CPU cores in minutes; `vaultgemma-1b` is
# VaultGemma's shape: 26 layers, d_model 1152, 4 MQA heads of 256, d_ff 13,824 counted over both
# GeGLU branches (2 × 6,912), Gemma's 256K vocabulary, 1024 tokens: ≈1.0B parameters.
PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        _shape("tiny", d_model=64, n_layers=2, n_heads=2, head_dim=32, d_ff=128, max_seq_len=128),
        _shape("small", d_model=128, n_layers=4, n_heads=4, head_dim=32, d_ff=256,
               max_seq_len=256),
        _shape("base", d_model=256, n_layers=6, n_heads=4, head_dim=64, d_ff=768),
        _shape("medium", d_model=512, n_layers=8, n_heads=8, head_dim=64, d_ff=1536),
        _shape("large", d_model=768, n_layers=12, n_heads=12, head_dim=64, d_ff=2048),
        _shape("xl", d_model=1024, n_layers=16, n_heads=8, head_dim=128, d_ff=4096),
        _shape("vaultgemma-1b", d_model=1152, n_layers=26, n_heads=4, head_dim=256, d_ff=6912,
               vocab_size=256_128),
    )
}


def get_preset(name: str) -> ModelShape:
    """Look up a named preset, or a member of the scaled family (``scaled-L<layers>``).

    Raises:
        KeyError: with the list of known presets, if ``name`` is not one.
    """
    try:
        return PRESETS[name]
    except KeyError:
        pass
    match = _SCALED_NAME.fullmatch(name)
    if match and 1 <= int(match.group(1)) <= MAX_SCALED_LAYERS:
        return family_shape(int(match.group(1)))
    known = ", ".join(PRESETS)
    raise KeyError(f"model.preset: unknown preset {name!r}; known presets: {known}, or "
                   f"scaled-L1 … scaled-L{MAX_SCALED_LAYERS}") from None


MAX_SCALED_LAYERS = 64
_SCALED_NAME = re.compile(r"scaled-L([0-9]{1,3})")


def family_shape(n_layers: int, *, vocab_size: int = BYTE_VOCAB_SIZE,
                 max_seq_len: int = 4096) -> ModelShape:
    """The scaled family's member with ``n_layers`` blocks (named ``scaled-L<n_layers>``).

    Depth and width grow together (d_model = 64·n_layers, head_dim 64, d_ff = 3·d_model per
    GeGLU branch), the usual recipe for a scaling-law model ladder; the name alone rebuilds it.
    """
    if not 1 <= n_layers <= MAX_SCALED_LAYERS:
        raise ValueError(f"n_layers must be in [1, {MAX_SCALED_LAYERS}], got {n_layers!r}")
    d_model = 64 * n_layers
    return ModelShape(name=f"scaled-L{n_layers}", vocab_size=vocab_size, d_model=d_model,
                      n_layers=n_layers, n_heads=d_model // 64, n_kv_heads=1, head_dim=64,
                      d_ff=3 * d_model, max_seq_len=max_seq_len)


def scaled_shape(target_params: float, *, vocab_size: int = BYTE_VOCAB_SIZE,
                 max_seq_len: int = 4096) -> ModelShape:
    """The family member (:func:`family_shape`) with the nearest non-embedding parameter count.

    Nearest in log space; the name (``scaled-L<n>``) rebuilds the shape via :func:`get_preset`.
    """
    if not math.isfinite(target_params) or target_params <= 0:
        raise ValueError(f"target_params must be a positive finite number, got {target_params!r}")
    shapes = [family_shape(n, vocab_size=vocab_size, max_seq_len=max_seq_len)
              for n in range(1, MAX_SCALED_LAYERS + 1)]
    return min(shapes, key=lambda s: abs(math.log(s.non_embedding_params / target_params)))
