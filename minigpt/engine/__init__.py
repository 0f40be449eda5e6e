"""Training engines behind one interface: `create_engine` picks DeepSpeed or the plain device path.

DeepSpeed is chosen when a distributed launcher started the process (deepspeed, torchrun or srun) or
when `--ds-config` is given; the plain engine otherwise. deepspeed is imported only on that path, so
the plain engine works without it installed.
"""

from __future__ import annotations

import logging
import os
import socket

import torch
from torch import nn

from minigpt.config import ConfigError, EngineSection, OptimSection, TrainConfig
from minigpt.engine.base import Engine, StepResult, build_optimizer, build_scheduler, warmup_cosine
from minigpt.engine.device import detect_device, resolve_precision
from minigpt.i18n import _
from minigpt.runtime import Runtime


class _AcceleratorAnnouncement(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU" that every rank's `import deepspeed` logs: the
    launcher has said it already, and MiniGPT's own device line says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Setting accelerator to", "Setting ds_accelerator to"))


# Installed before anything imports deepspeed: DeepSpeed's logger keeps filters its set-up finds.
logging.getLogger("DeepSpeed").addFilter(_AcceleratorAnnouncement())

__all__ = ["Engine", "StepResult", "build_optimizer", "build_scheduler", "create_engine", "create_runtime",
           "detect_device", "launched_distributed", "rank_placement", "resolve_precision", "validate_engine_config",
           "warmup_cosine"]


def launched_distributed() -> bool:
    """True when a launcher set the rank environment; maps srun's SLURM_* variables onto RANK & co.

    Under srun (one task per rank) MASTER_ADDR and MASTER_PORT must be set by the batch script."""
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return True
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "SLURM_STEP_ID" in os.environ:
        if int(os.environ["SLURM_NTASKS"]) <= 1:
            return False
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise ConfigError(_("started by srun with {tasks} tasks but {missing} not set; export MASTER_ADDR (first "
                                "node of the allocation) and MASTER_PORT in the batch script").format(
                tasks=os.environ["SLURM_NTASKS"], missing=missing))
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        return True
    return False


def rank_placement(engine: Engine) -> str:
    """One line per rank saying where it runs, so a multi-node log shows how ranks were placed."""
    local = getattr(engine, "num_local_experts", 0)
    experts = _(", experts {first}-{last} of each MoE layer (expert-parallel size {ep_size})").format(
        first=engine.ep_rank * local, last=engine.ep_rank * local + local - 1, ep_size=engine.ep_size) if local else ""
    return _("[minigpt] rank {rank}/{world_size} on host {host} (local rank {local_rank}, master "
             "{master}){experts}").format(
        rank=engine.rank, world_size=engine.world_size, host=socket.gethostname(),
        local_rank=os.environ.get("LOCAL_RANK", "0"),
        master=f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}", experts=experts)


def create_runtime(engine: EngineSection, optim: OptimSection | None = None) -> Runtime:
    """The runtime of this process, made before anything else: distributed (process group started)
    under a launcher or with --ds-config, one plain process otherwise. The DeepSpeed configuration (from
    `engine` and the batch of `optim`) is built here, once, so a bad one fails by name before any rendezvous;
    the engine takes it from `runtime.deepspeed_plan`."""
    if not (launched_distributed() or engine.ds_config):
        return Runtime(device=detect_device(engine.device))
    from deepspeed.accelerator import get_accelerator

    from minigpt.engine.ds_config import plan_deepspeed

    detect_device(engine.device)  # says which device, and why, once (the main rank)
    plan = plan_deepspeed(engine, optim or OptimSection(), int(os.environ.get("WORLD_SIZE", "1")),
                          get_accelerator().device_name())
    from minigpt.engine.deepspeed import distributed_runtime

    runtime = distributed_runtime(engine.dist_timeout)
    runtime.deepspeed_plan = plan
    return runtime


def create_engine(model: nn.Module, cfg: TrainConfig, runtime: Runtime | None = None) -> Engine:
    """DeepSpeedEngine in a distributed runtime (a launcher or --ds-config); PlainEngine otherwise.

    `runtime` (from `minigpt.runtime.create_runtime`, made before the data) is created here when not given."""
    runtime = runtime or create_runtime(cfg.engine, cfg.optim)
    if runtime.distributed:
        from minigpt.engine.deepspeed import DeepSpeedEngine

        engine = DeepSpeedEngine(model, cfg, runtime.deepspeed_plan, runtime)
        print(rank_placement(engine), flush=True)
        return engine
    from minigpt.engine.plain import PlainEngine

    return PlainEngine(model, cfg, runtime.device, runtime)


def validate_engine_config(cfg: TrainConfig, world_size: int, device: torch.device | None = None) -> str:
    """Check engine settings without building anything (for --dry-run); return a one-line plan. `device`:
    the device already detected (default: detected here)."""
    if launched_distributed() or cfg.engine.ds_config:
        from minigpt.config import get_config
        from minigpt.engine.ds_config import plan_deepspeed, resolve_ep_size

        device = device or detect_device(cfg.engine.device)
        plan = plan_deepspeed(cfg.engine, cfg.optim, world_size, "cuda" if device.type == "cuda" else "cpu")
        # the engine checks --init-from's experts
        experts = get_config(cfg.model.preset).num_experts if not cfg.model.init_from else 0
        ep = _(", experts over {ranks} expert-parallel rank(s)").format(
            ranks=resolve_ep_size(cfg.engine.ep_size, world_size, experts, plan.zero_stage)) if experts else ""
        return _("DeepSpeed ZeRO-{stage} ({config}), {world_size} rank(s), {precision} on "
                 "{accelerator}{experts}").format(
            stage=plan.zero_stage, config=cfg.engine.ds_config or _("default config"), world_size=world_size,
            precision=plan.precision, accelerator=plan.accelerator, experts=ep)
    device = device or detect_device(cfg.engine.device)
    compiled = {"on": _(", compiled"), "auto": _(", compile auto")}.get(cfg.engine.compile, "")
    return _("plain on {device}, {precision}{compiled}").format(
        device=device, precision=resolve_precision(cfg.engine.precision, device), compiled=compiled)
