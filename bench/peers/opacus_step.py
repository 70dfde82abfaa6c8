"""Opacus 1.6 DP step (hooks and ghost clipping) and the plain PyTorch step, one configuration.

Runs in its own virtual environment (torch + opacus only; see ``bench/peers/run.py``). The model
is the same Gemma-style decoder as dptrain's (pre-norm RMSNorm, multi-query attention with RoPE,
GeGLU, embedding scaled by √d) with an untied output head, because Opacus' per-sample hooks do
not support a weight shared by two modules. Prints one JSON object.

    python bench/peers/opacus_step.py --batch 64 --seq-len 129 --steps 30 --warmup 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch convention)
from issue_config import add_model_arguments
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = nn.Linear(d, heads * head_dim, bias=False)
        self.k = nn.Linear(d, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(d, kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape

        def rope(t: torch.Tensor) -> torch.Tensor:
            half = t.shape[-1] // 2
            t1, t2 = t[..., :half], t[..., half:]
            return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

        q = rope(self.q(x).view(b, length, self.heads, self.head_dim)).transpose(1, 2)
        k = rope(self.k(x).view(b, length, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.kv_heads != self.heads)
        return self.o(out.transpose(1, 2).reshape(b, length, -1))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, d_ff: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d, eps=1e-6)
        self.attn = Attention(d, heads, kv_heads, head_dim)
        self.mlp_norm = nn.RMSNorm(d, eps=1e-6)
        self.gate = nn.Linear(d, d_ff, bias=False)
        self.up = nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), sin, cos)
        h = self.mlp_norm(x)
        return x + self.down(F.gelu(self.gate(h), approximate="tanh") * self.up(h))


class Decoder(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, kv_heads: int,
                 head_dim: int, d_ff: int, length: int) -> None:
        super().__init__()
        self.scale = math.sqrt(d)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, kv_heads, head_dim, d_ff)
                                    for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, vocab, bias=False)
        half = head_dim // 2
        inv = 10_000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
        angles = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
        self.register_buffer("sin", torch.sin(angles)[None, :, None, :], persistent=False)
        self.register_buffer("cos", torch.cos(angles)[None, :, None, :], persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * self.scale
        for block in self.blocks:
            x = block(x, self.sin, self.cos)
        return self.head(self.norm(x))


def _time(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["non_private", "hooks", "ghost"])
    args = parser.parse_args()
    torch.manual_seed(0)
    length = args.seq_len - 1
    tokens = torch.randint(3, args.vocab, (args.batch, args.seq_len))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def fresh() -> Decoder:
        torch.manual_seed(0)
        return Decoder(args.vocab, args.d_model, args.layers, args.heads, args.kv_heads,
                       args.d_model // args.heads, args.d_ff, length)

    result: dict = {"stack": "opacus", "versions": {"torch": torch.__version__,
                                                    "opacus": __import__("opacus").__version__},
                    "threads": torch.get_num_threads(), "batch": args.batch}
    if "non_private" in args.modes:
        model = fresh()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def plain() -> None:
            opt.zero_grad(set_to_none=True)
            logits = model(inputs)
            F.cross_entropy(logits.reshape(-1, args.vocab), targets.reshape(-1)).backward()
            opt.step()
        result["non_private"] = args.batch / _time(plain, args.steps, args.warmup)
    if "hooks" in args.modes:
        model = GradSampleModule(fresh(), loss_reduction="sum")
        opt = DPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), noise_multiplier=1.0,
                          max_grad_norm=1.0, expected_batch_size=args.batch,
                          loss_reduction="sum")

        def hooks() -> None:
            opt.zero_grad(set_to_none=True)
            logits = model(inputs)
            # Sum over rows of each row's mean token loss: per-sample gradients are per row.
            nll = F.cross_entropy(logits.reshape(-1, args.vocab), targets.reshape(-1),
                                  reduction="none").view(args.batch, -1)
            nll.mean(dim=1).sum().backward()
            opt.step()
        result["hooks"] = args.batch / _time(hooks, args.steps, args.warmup)
    if "ghost" in args.modes:
        model = GradSampleModuleFastGradientClipping(fresh(), max_grad_norm=1.0,
                                                     use_ghost_clipping=True,
                                                     loss_reduction="mean")
        opt = DPOptimizerFastGradientClipping(
            torch.optim.Adam(model.parameters(), lr=1e-3), noise_multiplier=1.0,
            max_grad_norm=1.0, expected_batch_size=args.batch, loss_reduction="mean")
        criterion = DPLossFastGradientClipping(model, opt, nn.CrossEntropyLoss(),
                                               loss_reduction="mean")

        def ghost() -> None:
            opt.zero_grad(set_to_none=True)
            logits = model(inputs)
            loss = criterion(logits.reshape(-1, args.vocab), targets.reshape(-1),
                             shape=(args.batch, length))
            loss.backward()
            opt.step()
        result["ghost"] = args.batch / _time(ghost, args.steps, args.warmup)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
