"""The baseline trainer's model, re-measured in the same run: a minimal GPT (nanoGPT-style) training step.

Learned position embeddings, LayerNorm, GELU MLP (4x), fused QKV through
`scaled_dot_product_attention`, tied embeddings, torch AdamW, plain fp32 loop: the shape of the
minimal GPT trainer's CPU recipe. Measuring it beside MiniGPT on the same machine in the same run
turns its quoted 12.8k tokens/s into a ratio that the machine's noise mostly cancels out of.
`train_char_level` is the same trainer's character-level recipe, run for a given wall time: the baseline
of the Chinese quality recipe, measured on the same text in the same run.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

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
        # nanoGPT's initialisation: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 * layers).
        for name, parameter in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(parameter)
            elif parameter.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(parameter, mean=0.0, std=std)

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


@dataclass
class CharLevelResult:
    """What the baseline's character-level recipe reached in its wall time."""

    val_bpb: float
    steps: int
    train_seconds: float
    vocab_size: int
    parameters: int


def _char_ids(text: str, vocab: dict[str, int]) -> torch.Tensor:
    unknown = len(vocab)  # characters the training text never had share one id
    return torch.tensor([vocab.get(char, unknown) for char in text], dtype=torch.long)


@torch.no_grad()
def _bits_per_byte(model: ReferenceGPT, ids: torch.Tensor, val_bytes: int, context: int, batch: int = 64) -> float:
    """Bits per byte of the validation text: every character after the first predicted once, in windows
    of `context` characters (the last one shorter)."""
    model.eval()
    windows = [ids[s:s + context + 1] for s in range(0, len(ids) - 1, context)]
    full = [w for w in windows if len(w) == context + 1]
    nll = 0.0
    for first in range(0, len(full), batch):
        chunk = torch.stack(full[first:first + batch])
        nll += F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    for window in windows[len(full):]:
        nll += F.cross_entropy(model(window[:-1].unsqueeze(0))[0], window[1:], reduction="sum").item()
    model.train()
    return nll / math.log(2) / val_bytes


def train_char_level(train_text: str, val_text: str, seconds: float, seed: int = 0, batch_size: int = 12,
                     context: int = 64, width: int = 128, layers: int = 4, heads: int = 4, lr: float = 1e-3,
                     min_lr: float = 1e-4, warmup: int = 100, max_steps: int | None = None) -> CharLevelResult:
    """The minimal GPT trainer's character-level CPU recipe (4 layers, 4 heads, width 128, context 64,
    batch 12, AdamW 1e-3 with warm-up and cosine decay to 1e-4, betas 0.9/0.99, weight decay 0.1, clip 1.0),
    trained for `seconds` of wall time or `max_steps` (the decay follows the share of time used, as it cannot know its step
    count), then scored on the whole validation text (not timed). Characters the training text lacks map
    to one shared id, which favours the baseline slightly: it never has to say which rare character comes."""
    torch.manual_seed(seed)
    vocab = {char: i for i, char in enumerate(sorted(set(train_text)))}
    data = _char_ids(train_text, vocab)
    model = ReferenceGPT(vocab=len(vocab) + 1, width=width, layers=layers, heads=heads, context=context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    started, steps = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - started) < seconds and steps != max_steps:
        share = elapsed / seconds
        rate = lr * (steps + 1) / warmup if steps < warmup else \
            min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * share))
        for group in optimizer.param_groups:
            group["lr"] = rate
        starts = torch.randint(len(data) - context - 1, (batch_size,), generator=generator)
        batch = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1
    train_seconds = time.perf_counter() - started
    bpb = _bits_per_byte(model, _char_ids(val_text, vocab), len(val_text.encode("utf-8")), context)
    return CharLevelResult(bpb, steps, train_seconds, len(vocab) + 1, sum(p.numel() for p in model.parameters()))
