"""The plain engine: one process on one device (cpu / mps / cuda) with autocast, accumulation and AdamW.

Its checkpoint is one torch file, `engine.pt`, in the engine-neutral layout of `minigpt.engine.portable`
(weights and AdamW moments keyed by parameter name, LR-scheduler position, loss scaler), which
`DeepSpeedEngine.load` reads too.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from minigpt.config import TrainConfig
from minigpt.engine.base import (
    Engine,
    ScheduleClock,
    StepResult,
    build_optimizer,
    build_scheduler,
    check_shapes_fit,
    enable_activation_checkpointing,
)
from minigpt.engine.device import autocast_context, resolve_precision
from minigpt.engine.portable import (
    ENGINE_FILE,
    FORMAT_VERSION,
    fit_scheduler_state,
    load_named_optimizer_state,
    named_optimizer_state,
    read_portable_state,
    sync_group_lrs,
)
from minigpt.i18n import _
from minigpt.runtime import Runtime

log = logging.getLogger(__name__)

class PlainEngine(Engine):
    """Single-device training: autocast, GradScaler for fp16, accumulation, clipping, AdamW, warmup+cosine."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, runtime: Runtime | None = None):
        self.runtime = runtime or Runtime(device=device)
        self.device = device
        self.precision = resolve_precision(cfg.engine.precision, device)
        self.grad_clip = cfg.optim.grad_clip
        self.module = model.to(device)
        if cfg.engine.activation_checkpointing:
            enable_activation_checkpointing(self.module, functools.partial(torch.utils.checkpoint.checkpoint,
                                                                           use_reentrant=False))
        # The compiled wrapper only runs forward; checkpoints and eval use the unwrapped module.
        self._compiled: nn.Module | None = None
        self._forward_module = self.module
        self.set_compiled(cfg.engine.compile == "on")
        self.optimizer = build_optimizer(self.module, cfg.optim)
        self.schedule_clock = ScheduleClock()
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.schedule_clock)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

    def set_compiled(self, compiled: bool) -> None:
        """Run training forwards through torch.compile's wrapper (made once, compiled at its first call) or
        the eager module; the weights are the same either way."""
        if compiled and self._compiled is None:
            self._compiled = torch.compile(self.module)
        self._forward_module = self._compiled if compiled else self.module

    @property
    def compiled(self) -> bool:
        return self._forward_module is not self.module

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with autocast_context(self.device, self.precision):
            return self._forward_module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, micro_batches: int = 1, last: bool = True) -> None:
        self.scaler.scale(loss / micro_batches).backward()

    def step(self) -> StepResult:
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        lr = self.lr
        skipped = not torch.isfinite(torch.tensor(grad_norm)).item()
        if skipped:
            log.warning(_("non-finite gradient norm ({norm}): update skipped, weights unchanged").format(
                norm=grad_norm))
        else:
            # Gradients are already unscaled and finite here, so the scaler applies the update.
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not skipped:
            self.scheduler.step()
        return StepResult(grad_norm=grad_norm, lr=lr, skipped=bool(skipped))

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, directory: Path) -> None:
        state = {
            "format_version": FORMAT_VERSION, "engine": "plain", "world_size": 1, "precision": self.precision,
            "model": {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                      for k, v in self.module.state_dict().items()},
            "optimizer": named_optimizer_state(self.optimizer, self.module),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        torch.save(state, Path(directory) / ENGINE_FILE)

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        state = read_portable_state(directory)
        expected = {k: v.shape for k, v in self.module.state_dict().items()}
        check_shapes_fit(expected, state["model"], str(directory))
        self.module.load_state_dict(state["model"])
        if not state["optimizer"]:
            log.warning(_("{source}: checkpoint has no optimizer moments; AdamW restarts from zero moments").format(
                source=directory))
        load_named_optimizer_state(self.optimizer, self.module, state["optimizer"], str(directory))
        self.scheduler.load_state_dict(fit_scheduler_state(state["scheduler"], len(self.optimizer.param_groups)))
        sync_group_lrs(self.optimizer, self.scheduler)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self._micro_step = 0

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                for k, v in self.module.state_dict().items()}
