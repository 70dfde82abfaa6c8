"""`dptrain export` and `dptrain generate`: take a trained model out, and try it.

Thin: parse arguments, call the trainer's export / generation functions, map their typed errors
to exit codes. The trainer (JAX) is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

from dptrain.cli._output import EXIT_ERROR, EXIT_INVALID, emit, fail


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `export` and `generate`."""
    export = subparsers.add_parser(
        "export", parents=[common], help="export a checkpoint as a Hugging Face model",
        description="Write a Hugging Face model directory (config.json, model.safetensors, "
                    "generation_config.json, the tokenizer files of an imported checkpoint, and "
                    "a README.md model card with the privacy statement: ε, δ, unit, sampling "
                    "rate, σ, steps, accountant, clip norm, dataset checksum) from a dptrain "
                    "checkpoint directory. transformers' AutoModelForCausalLM loads it.")
    export.add_argument("checkpoint", type=pathlib.Path, metavar="CHECKPOINT_DIR",
                        help="the job's checkpoint directory (spec.checkpoint.path)")
    export.add_argument("--format", choices=["huggingface"], default="huggingface",
                        help="output format (default: huggingface)")
    export.add_argument("--output", "-o", type=pathlib.Path, required=True, metavar="OUT",
                        help="directory to write (must be empty or absent)")
    export.add_argument("--step", type=int, default=None,
                        help="checkpoint step to export (default: the latest)")
    export.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output directory")
    export.add_argument("--report", choices=["kubernetes"], default=None,
                        help="also merge-patch status.progress.artifacts of the pod's job "
                             "(the operator's export Job)")
    export.add_argument("--adapter-only", action="store_true",
                        help="LoRA checkpoints: write the adapters alone in PEFT's format "
                             "(adapter_config.json, adapter_model.safetensors) instead of the "
                             "model with the adapters merged (the default)")
    export.set_defaults(handler=_export)

    gen = subparsers.add_parser(
        "generate", parents=[common], help="generate text with a trained or exported model",
        description="Generate a continuation with a key/value cache, greedily (--greedy) or by "
                    "temperature / top-k sampling, from a Hugging Face directory (an export or "
                    "an import) or a dptrain checkpoint directory.")
    gen.add_argument("model", type=pathlib.Path, metavar="CHECKPOINT_OR_EXPORT_DIR",
                     help="a Hugging Face model directory or a dptrain checkpoint directory")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", "-p", metavar="TEXT", help="prompt text (tokenized with the "
                        "model's tokenizer; the beginning-of-sequence token is prepended)")
    prompt.add_argument("--prompt-ids", metavar="IDS",
                        help="prompt as comma-separated token ids, used as given")
    gen.add_argument("--max-new-tokens", "-n", type=int, default=64, metavar="N",
                     help="tokens to generate at most (default 64; stops after end-of-sequence)")
    gen.add_argument("--greedy", action="store_true",
                     help="always take the most likely token (default: sample)")
    gen.add_argument("--temperature", "-t", type=float, default=1.0, metavar="T",
                     help="sampling temperature > 0 (default 1.0)")
    gen.add_argument("--top-k", "-k", type=int, default=0, metavar="K",
                     help="sample among the K most likely tokens only (default 0: all)")
    gen.add_argument("--seed", type=int, default=0,
                     help="sampling seed (sampling is not privacy-relevant; default 0)")
    gen.set_defaults(handler=_generate)


def _export(args: argparse.Namespace) -> int:
    from dptrain.trainer import StatusReportError, export_checkpoint
    from dptrain.trainer._export import ExportError

    try:
        result = export_checkpoint(args.checkpoint, args.output, step=args.step,
                                   overwrite=args.overwrite, adapter_only=args.adapter_only,
                                   report_status=args.report == "kubernetes")
    except ExportError as error:
        fail(str(error), EXIT_INVALID)
    except StatusReportError as error:
        fail(str(error), EXIT_ERROR)
    summary = {"output": str(result.output), "files": result.files, "step": result.step,
               "format": "peft-lora" if args.adapter_only else args.format,
               "privacy": result.privacy}

    def human(r: dict[str, Any]) -> str:
        p = r["privacy"]
        return (f"exported step {r['step']} to {r['output']} ({', '.join(r['files'])})\n"
                f"privacy: ε = {p['epsilon']:.4g}, δ = {p['delta']:.3g} per {p['unit']} "
                f"(q = {p['sampling_rate']:.4g}, σ = {p['noise_multiplier']:.4g}, "
                f"{p['steps']} steps, {p['accountant']})")

    emit(args, summary, human)
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        fail(f"--prompt-ids: must be comma-separated integers, got {text!r}", EXIT_INVALID)


def _generate(args: argparse.Namespace) -> int:
    from dptrain.trainer._generate import GenerationError, generate_text, load_for_generation

    ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
    try:
        loaded = load_for_generation(args.model)
        result = generate_text(loaded, args.prompt, prompt_ids=ids,
                               max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                               temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    except GenerationError as error:
        fail(str(error), EXIT_INVALID)
    summary = {"prompt_ids": result.prompt_ids, "new_ids": result.new_ids, "text": result.text,
               "stopped": result.stopped, "greedy": args.greedy, "source": loaded.source}
    emit(args, summary, lambda r: r["text"] if r["text"] is not None
         else " ".join(str(t) for t in r["new_ids"]))
    return 0
