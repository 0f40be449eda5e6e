"""The plain engine: one process on one device (cpu / mps / cuda) with autocast, accumulation and AdamW.

Its checkpoint is one torch file, `engine.pt`, in an engine-neutral layout (weights and AdamW moments
keyed by parameter name, LR-scheduler position, loss scaler), which `DeepSpeedEngine.load` reads too.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt.config import ConfigError, TrainConfig
from minigpt.engine.base import Engine, StepResult, build_optimizer, build_scheduler, check_shapes_fit
from minigpt.engine.device import autocast_dtype, resolve_precision
from minigpt.runtime import Runtime
from minigpt.safe_load import safe_torch_load

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.pt"
FORMAT_VERSION = 1
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def parameter_names(module: nn.Module) -> dict[int, str]:
    """id(parameter) → its first name in `module` (tied weights share one entry)."""
    names: dict[int, str] = {}
    for name, param in module.named_parameters():
        names.setdefault(id(param), name)
    return names


def named_optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, dict[str, Any]]:
    """AdamW state keyed by parameter name instead of position, so another engine can place it."""
    names = parameter_names(module)
    return {names[id(param)]: {key: value.detach().cpu().clone() if torch.is_tensor(value) else value
                               for key, value in state.items()}
            for param, state in optimizer.state.items()}


def load_named_optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module,
                               named_state: dict[str, dict[str, Any]], source: str) -> None:
    """Put name-keyed AdamW state back onto the parameters of `optimizer` (shapes checked)."""
    names = parameter_names(module)
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            if name not in named_state:
                continue
            state = named_state[name]
            for key in ADAM_KEYS:
                if key in state and state[key].shape != param.shape:
                    raise ConfigError(f"{source}: optimizer state {key} of {name!r} has shape "
                                      f"{tuple(state[key].shape)}, parameter has {tuple(param.shape)}")
            optimizer.state[param] = {
                key: (value.to(param.device, torch.float32) if key in ADAM_KEYS else
                      value.detach().clone().float() if torch.is_tensor(value) else torch.tensor(float(value)))
                for key, value in state.items()}


def sync_group_lrs(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each group's lr from the restored scheduler position (LambdaLR.load_state_dict does not)."""
    for group, base_lr, schedule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                        strict=True):
        group["lr"] = base_lr * schedule(scheduler.last_epoch)


def read_engine_file(path: Path) -> dict[str, Any]:
    """Load an `engine.pt` and check its format version."""
    state = safe_torch_load(path)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{path}: engine checkpoint format {found!r}, "
                          f"this version reads {FORMAT_VERSION}")
    return state


def read_portable_state(directory: Path) -> dict[str, Any]:
    """The engine-neutral state of any checkpoint directory: `engine.pt`, or converted from DeepSpeed files."""
    if (directory / ENGINE_FILE).is_file():
        return read_engine_file(directory / ENGINE_FILE)
    if any(directory.glob("*model_states.pt")):
        from minigpt.engine.deepspeed import read_deepspeed_checkpoint

        return read_deepspeed_checkpoint(directory)
    raise ConfigError(f"{directory}: no engine state found (neither {ENGINE_FILE} nor DeepSpeed *_model_states.pt)")


class PlainEngine(Engine):
    """Single-device training: autocast, GradScaler for fp16, accumulation, clipping, AdamW, warmup+cosine."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, runtime: Runtime | None = None):
        self.runtime = runtime or Runtime(device=device)
        self.device = device
        self.precision = resolve_precision(cfg.precision, device)
        self.grad_clip = cfg.grad_clip
        self.module = model.to(device)
        # The compiled wrapper only runs forward; checkpoints and eval use the unwrapped module.
        self._forward_module = torch.compile(self.module) if cfg.compile else self.module
        self.optimizer = build_optimizer(self.module, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        dtype = autocast_dtype(self.precision)
        context = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with context:
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
            log.warning("non-finite gradient norm (%s): update skipped, weights unchanged", grad_norm)
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
            log.warning("%s: checkpoint has no optimizer moments; AdamW restarts from zero moments", directory)
        load_named_optimizer_state(self.optimizer, self.module, state["optimizer"], str(directory))
        self.scheduler.load_state_dict(state["scheduler"])
        sync_group_lrs(self.optimizer, self.scheduler)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self._micro_step = 0

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                for k, v in self.module.state_dict().items()}
