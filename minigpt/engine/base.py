"""The Engine interface: what the training loop needs from DeepSpeed or from a plain device.

The loop calls, per micro-batch, `loss = objective(engine, batch)`, `engine.backward(loss)`,
`engine.step()`; `step()` returns a `StepResult` at the end of each accumulation window (the
optimizer step happened) and None otherwise. Accumulation, loss scaling, clipping, the optimizer and
the learning-rate schedule all live inside the engine; the loop never asks which engine it has.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class StepResult:
    """What one optimizer step reports."""

    grad_norm: float
    """Global L2 norm of the gradients before clipping (inf/nan when they overflowed)."""
    lr: float
    """Learning rate the step used."""
    skipped: bool = False
    """True when the update was not applied (non-finite gradients / fp16 overflow)."""


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine decay to `min_lr_ratio` at max_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm scales and other vectors are not decayed)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


class Engine(ABC):
    """Common interface of `PlainEngine` and `DeepSpeedEngine`."""

    module: nn.Module
    """The unwrapped model (no `module.` / `_orig_mod.` prefixes): what checkpoints and eval use."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    micro_batch_size: int
    grad_accum_steps: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the model for training (autocast / DeepSpeed hooks applied)."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward(*args, **kwargs)

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss` (the mean over one micro-batch); scaling by 1/accum is inside."""

    @abstractmethod
    def step(self) -> StepResult | None:
        """Advance one micro-step; at an accumulation boundary clip, update, schedule, and report."""

    @abstractmethod
    def save(self, directory: Path, client_state: dict) -> None:
        """Write this engine's native checkpoint (all ranks call it) into `directory`."""

    @abstractmethod
    def load(self, directory: Path) -> dict:
        """Restore weights, optimizer, scheduler and scaler from `directory`; return the client state."""

    @abstractmethod
    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights of the unwrapped model on the main rank (gathered under ZeRO-3); None elsewhere.

        Every rank must call it (gathering is collective)."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """Learning rate of the next optimizer step."""

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    # Collectives: trivial on one process, all-reduce across data-parallel ranks otherwise.
    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            values = values.clone()
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        return values

    def any_rank(self, flag: bool) -> bool:
        """True when `flag` is set on any rank (used to agree on stopping at a step boundary)."""
        return bool(self.all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item() > 0)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()
