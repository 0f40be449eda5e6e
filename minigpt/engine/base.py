"""The Engine interface: what the training loop needs from DeepSpeed or from a plain device.

The loop owns gradient accumulation: per micro-batch it calls `loss = objective(engine, batch)` and
`engine.backward(loss, micro_batches, last)` (how many micro-batches the step averages, and whether
this is the last of them), then `engine.step()` once per optimizer step, which returns a `StepResult`.
Loss scaling, clipping, the optimizer and the learning-rate schedule live inside the engine; the loop
never asks which engine it has.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt.config import ConfigError, OptimSection, ScheduleSection
from minigpt.i18n import _
from minigpt.runtime import Runtime


@dataclass
class StepResult:
    """What one optimizer step reports."""

    grad_norm: float
    """Global L2 norm of the gradients before clipping (inf/nan when they overflowed)."""
    lr: float
    """Learning rate the step used."""
    skipped: bool = False
    """True when the update was not applied (non-finite gradients / fp16 overflow)."""


@dataclass
class ScheduleClock:
    """How much of a wall-clock budget (--max-time) the run has used, as a fraction in [0, 1].

    The loop sets `fraction` after every step from a value all ranks agreed on; the LR schedule reads it
    when the engine next steps its scheduler. `warmup_end` is the fraction at which warmup ended (the
    schedule records it at its first decay step), so the cosine runs over the rest of the budget from the
    peak. Neither is in the engine's checkpoint: the loop saves the time spent and `warmup_end` in its
    trainer state and restores them."""

    fraction: float = 0.0
    warmup_end: float | None = None

    def decay_progress(self) -> float:
        """How far along the budget's decay is, 0 at the end of warmup and 1 when the budget is used."""
        if self.warmup_end is None:
            self.warmup_end = min(1.0, max(0.0, self.fraction))
        if self.warmup_end >= 1.0:
            return 1.0
        return min(1.0, max(0.0, (self.fraction - self.warmup_end) / (1.0 - self.warmup_end)))


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float,
                  clock: ScheduleClock | None = None) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine decay to `min_lr_ratio` at max_steps.

    With a `clock` (a time budget) the decay follows whichever is further along: the steps or the
    budget left after warmup, so a run that stops on time has decayed fully when it stops, and the LR
    does not drop at the end of a warmup that took a large share of the budget."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    by_time = clock.decay_progress() if clock is not None else 0.0
    if max_steps <= warmup_steps:
        by_steps = 0.0
    else:
        by_steps = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    progress = max(by_steps, by_time)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim: OptimSection, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model` with the optimisation section's learning rate, betas and
    weight decay, the decay on matrices only (norm scales and other vectors are not decayed).

    The fused kernel is used on CPU and CUDA: one pass over each tensor instead of a dozen, which
    on CPU makes the optimizer step ~6x faster for these small models (bench/throughput.py)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    # An empty group is left out: DeepSpeed's ZeRO drops it, and a scheduler built over both groups would then
    # have one learning rate too many (LoRA's adapters are all matrices, so they have no undecayed group).
    groups = [group for group in ({"params": decay, "weight_decay": optim.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}) if group["params"]]
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=optim.learning_rate, betas=(optim.beta1, optim.beta2), eps=eps,
                             fused=True if fused else None)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleSection,
                    clock: ScheduleClock | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `warmup_cosine`; the same object drives both engines, so their LR numbers agree.

    A `functools.partial` (not a lambda or dataclass) keeps the schedule's shape out of the scheduler's
    state dict: a resumed run uses the schedule of its own config and only the position is restored.
    `clock` (the engine's `schedule_clock`) is used only when the run has a --max-time budget."""
    shape = functools.partial(warmup_cosine, warmup_steps=schedule.warmup_steps, max_steps=schedule.max_steps,
                              min_lr_ratio=schedule.min_lr_ratio, clock=clock if schedule.max_time else None)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shape)


def enable_activation_checkpointing(model: nn.Module, checkpoint_fn: Callable, *, reentrant: bool = False) -> int:
    """Make every MiniGPT inside `model` (a reward model wraps one) run its blocks through `checkpoint_fn`;
    returns how many it found. `reentrant`: `checkpoint_fn` runs the first forward without a graph
    (DeepSpeed's), which a mixture of experts cannot use."""
    found = 0
    for module in model.modules():
        if not hasattr(module, "checkpoint_fn"):
            continue
        if reentrant and getattr(module.config, "is_moe", False):
            # The router's balance loss is read from the blocks after forward; a reentrant recompute would
            # leave it without gradients.
            raise ConfigError(_("--activation-checkpointing is not supported for mixture-of-experts models on the "
                                "DeepSpeed engine (its reentrant recompute leaves the router's balance loss without "
                                "gradients); use the plain engine, or lower --batch-size and raise --grad-accum"))
        module.checkpoint_fn = checkpoint_fn
        found += 1
    if not found:
        raise ConfigError(_("--activation-checkpointing: the model has no blocks that support it"))
    return found


def check_shapes_fit(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a checkpoint whose tensors do not fit the model: name the tensor and both shapes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ConfigError(_("{source}: checkpoint does not fit the model: missing tensors {missing}, unexpected "
                            "tensors {unexpected} (was it saved from another model config?)").format(
            source=source, missing=missing[:5], unexpected=unexpected[:5]))
    for name, shape in expected.items():
        if tuple(found[name].shape) != tuple(shape):
            raise ConfigError(_("{source}: tensor {name!r} has shape {found} in the checkpoint but {expected} in the "
                                "model (was it saved from another model config?)").format(
                source=source, name=name, found=tuple(found[name].shape), expected=tuple(shape)))


class Engine(ABC):
    """Common interface of `PlainEngine` and `DeepSpeedEngine`."""

    module: nn.Module
    """The unwrapped model (no `module.` / `_orig_mod.` prefixes): what checkpoints and eval use."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    runtime: Runtime
    """This process's rank, world and collectives (`minigpt.runtime`), shared with the loop and the data."""
    schedule_clock: ScheduleClock
    """The share of the --max-time budget used, which the LR schedule follows (set by the loop)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the model for training (autocast / DeepSpeed hooks applied)."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward(*args, **kwargs)

    @abstractmethod
    def backward(self, loss: torch.Tensor, micro_batches: int = 1, last: bool = True) -> None:
        """Accumulate gradients of `loss`, the mean over one of the `micro_batches` micro-batches the next
        optimizer step averages (the 1/micro_batches scaling is inside); `last` marks the final one,
        after which the caller calls `step()`."""

    @abstractmethod
    def step(self) -> StepResult:
        """End the optimizer step the caller's `backward` calls accumulated: clip, update, schedule, report."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write this engine's native state (model, optimizer, LR scheduler, loss scaler) into `directory`.

        Every rank calls it. The caller has created `directory` and renames it atomically afterwards;
        trainer state (step, sampler, RNG) is the caller's business, not the engine's."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restore model, optimizer, scheduler and scaler from a checkpoint `directory` (every rank calls).

        Either engine reads checkpoints of the other (see docs/distributed.md, cross-engine resume)."""

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

    # Collectives come from the runtime: trivial on one process, across data-parallel ranks otherwise.
    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return self.runtime.all_reduce_sum(values)

    def any_rank(self, flag: bool) -> bool:
        """True when `flag` is set on any rank (used to agree on stopping at a step boundary)."""
        return self.runtime.any_rank(flag)

    def barrier(self) -> None:
        self.runtime.barrier()
