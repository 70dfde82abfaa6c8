"""A pretrained checkpoint's shape as ``status.pretrained``, and back as a :class:`ModelShape`.

The operator cannot read a checkpoint (it lies on a volume only pods mount): the
data-preparation pod reads its ``config.json`` (``dptrain.trainer._hf.describe_checkpoint``) and
reports :func:`pretrained_status`; the operator plans with :func:`pretrained_shape` of it, the
same fixed shape ``dptrain plan`` / ``dptrain run`` read locally. The round trip is exact: the
two functions are inverses on every field that fixes the shape.
"""

from __future__ import annotations

from dptrain.api import PretrainedModelStatus
from dptrain.planner._presets import ModelShape

FIXED_BY_PRETRAINED = "spec.model.pretrained"
_POST_NORM_TYPES = frozenset({"gemma2"})  # families whose blocks carry post-norms


def pretrained_status(shape: ModelShape, *, model_type: str, path: str,
                      config_checksum: str) -> PretrainedModelStatus:
    """``status.pretrained`` for a checkpoint of ``shape`` (from its ``config.json``)."""
    return PretrainedModelStatus(
        model_type=model_type, preset=shape.name, layers=shape.n_layers, width=shape.d_model,
        heads=shape.n_heads, kv_heads=shape.n_kv_heads, head_dim=shape.head_dim,
        mlp_width=shape.d_ff, vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_seq_len, parameters=shape.param_count, path=path,
        config_checksum=config_checksum)


def pretrained_shape(status: PretrainedModelStatus) -> ModelShape:
    """The fixed model shape ``status`` reports (the planner's ``model=``).

    Raises:
        ValueError: the fields do not make a shape, or its parameter count disagrees with the
            reported one (a report from another version, or a tampered one).
    """
    shape = ModelShape(
        name=status.preset, vocab_size=status.vocab_size, d_model=status.width,
        n_layers=status.layers, n_heads=status.heads, n_kv_heads=status.kv_heads,
        head_dim=status.head_dim, d_ff=status.mlp_width,
        max_seq_len=status.max_position_embeddings,
        post_norms=status.model_type in _POST_NORM_TYPES)
    if shape.param_count != status.parameters:
        raise ValueError(f"status.pretrained.parameters: {status.parameters} disagrees with the "
                         f"reported shape ({shape.param_count} parameters)")
    return shape
