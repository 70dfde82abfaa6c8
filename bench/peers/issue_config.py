"""The configuration issue 15 benchmarks, in one place for every stack's script.

Standard library only: the peers' scripts import it from their own virtual environments, where
dptrain is not installed (``model_shape`` imports dptrain only when a dptrain script calls it).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Batch, row length and model shape: batch 64, 129-token rows, byte vocabulary, width 128,
    2 layers, 4 query heads over 1 key/value head, MLP 512."""
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=129, help="tokens per row (inputs: -1)")
    parser.add_argument("--vocab", type=int, default=259)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--d-ff", type=int, default=512)


def model_shape(args: argparse.Namespace, name: str = "peer") -> Any:
    """dptrain's ``ModelShape`` for the parsed arguments."""
    from dptrain.planner import ModelShape

    return ModelShape(name=name, vocab_size=args.vocab, d_model=args.d_model,
                      n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                      head_dim=args.d_model // args.heads, d_ff=args.d_ff,
                      max_seq_len=args.seq_len - 1)
