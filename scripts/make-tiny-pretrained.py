#!/usr/bin/env python3
"""Make a tiny random VaultGemma checkpoint directory with its tokenizer, offline.

It stands in for a downloaded Hugging Face checkpoint in the fine-tuning sample
(manifests/samples/finetune-cpu.yaml): `config.json`, `model.safetensors`,
`generation_config.json` (transformers' `save_pretrained`) and `tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json` (a byte-level BPE trained with the `tokenizers`
library on docstrings of the Python standard library, which ships with Python: public text, no
network). The weights are random (transformers' own initialisation, seeded): the model is tiny
and knows nothing, which is what a CPU sample of DP fine-tuning needs.

Usage:
    python scripts/make-tiny-pretrained.py runs/tiny-vaultgemma [--vocab-size 512] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import itertools
import pathlib
import sys
import sysconfig
from collections.abc import Iterator

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def stdlib_text(max_files: int) -> Iterator[str]:
    """Docstrings of the first ``max_files`` top-level standard-library modules."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in itertools.islice(sorted(root.glob("*.py")), max_files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def make_tokenizer(out: pathlib.Path, vocab_size: int, max_files: int) -> int:
    """Train and save a byte-level BPE; its vocabulary size (specials included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(stdlib_text(max_files), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(out)
    return int(tok.get_vocab_size())


def make_model(out: pathlib.Path, *, vocab_size: int, seed: int, layers: int, width: int,
               max_positions: int) -> int:
    """Save a random VaultGemma of the given size; its parameter count."""
    import torch
    from transformers import VaultGemmaConfig, VaultGemmaForCausalLM

    torch.manual_seed(seed)
    config = VaultGemmaConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1,
        head_dim=width // 4, query_pre_attn_scalar=width // 4,
        max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True)
    model = VaultGemmaForCausalLM(config).eval()
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, write the checkpoint directory; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=pathlib.Path, help="directory to write")
    parser.add_argument("--vocab-size", type=int, default=512,
                        help="BPE vocabulary size, specials included (default 512)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--width", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--max-positions", type=int, default=256,
                        help="max_position_embeddings (default 256)")
    parser.add_argument("--tokenizer-files", type=int, default=80,
                        help="standard-library modules to train the tokenizer on (default 80)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    out: pathlib.Path = args.output
    if out.exists() and any(out.iterdir()):
        print(f"{out}: exists and is not empty", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(out, args.vocab_size, args.tokenizer_files)
    params = make_model(out, vocab_size=vocab, seed=args.seed, layers=args.layers,
                        width=args.width, max_positions=args.max_positions)
    print(f"wrote {out}: VaultGemma, {args.layers} layers, width {args.width}, vocabulary "
          f"{vocab}, {params:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
