"""The baseline trainer's model, re-measured in the same run: a minimal GPT (nanoGPT-style) training step.

Learned position embeddings, LayerNorm, GELU MLP (4x), fused QKV through
`scaled_dot_product_attention`, tied embeddings, torch AdamW, plain fp32 loop: the shape of the
minimal GPT trainer's CPU recipe. Measuring it beside MiniGPT on the same machine in the same run
turns its quoted 12.8k tokens/s into a ratio that the machine's noise mostly cancels out of.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class ReferenceGPT(nn.Module):
    """nanoGPT's architecture at a given size (bias on, dropout off)."""

    def __init__(self, vocab: int = 65, width: int = 128, layers: int = 4, heads: int = 4, context: int = 64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def reference_tokens_per_sec(steps: int = 60, batch_size: int = 12, context: int = 64, vocab: int = 65,
                             width: int = 128, layers: int = 4, heads: int = 4) -> float:
    """Median-step tokens/s of the reference model's fp32 training step (forward, backward, clip, AdamW)."""
    torch.manual_seed(0)
    model = ReferenceGPT(vocab=vocab, width=width, layers=layers, heads=heads, context=context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    batches = torch.randint(0, vocab, (8, batch_size, context + 1))
    times = []
    for i in range(steps + 5):
        start = time.perf_counter()
        batch = batches[i % len(batches)]
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch_size * context / statistics.median(times[5:])
