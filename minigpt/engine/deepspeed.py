"""The DeepSpeed engine: ZeRO 0-3, optional CPU offload, bf16/fp16, accumulation and clipping.

Optimizer and LR schedule are client objects (torch AdamW from `build_optimizer`, LambdaLR over
`warmup_cosine`) so the numbers equal the plain engine's; with optimizer offload DeepSpeed requires
its own `DeepSpeedCPUAdam` (a JIT-built C++ op), given the same parameter groups and hyper-parameters.

Checkpoints are DeepSpeed's native files plus `engine_meta.json`. Cross-engine resume goes through the
engine-neutral state of `minigpt.engine.portable` (weights and AdamW moments by parameter name, scheduler
position): its `read_deepspeed_checkpoint` rebuilds it from ZeRO files on one process; `DeepSpeedEngine.load` places a
plain `engine.pt` into the ZeRO partitions with DeepSpeed's tensor-fragment API.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param, safe_set_full_optimizer_state
from torch import nn

from minigpt.config import ConfigError, OptimSection, TrainConfig
from minigpt.engine.base import (
    Engine,
    ScheduleClock,
    StepResult,
    build_optimizer,
    build_scheduler,
    check_shapes_fit,
    enable_activation_checkpointing,
)
from minigpt.engine.device import is_first_rank
from minigpt.engine.ds_config import DeepSpeedPlan, offloads_optimizer, plan_deepspeed, resolve_ep_size
from minigpt.engine.moe import use_deepspeed_moe
from minigpt.engine.portable import (
    ADAM_KEYS,
    ENGINE_FILE,
    FORMAT_VERSION,
    META_FILE,
    fit_scheduler_state,
    is_expert_name,
    load_named_optimizer_state,
    parameter_names,
    plain_name,
    read_deepspeed_checkpoint,
    read_engine_file,
    read_engine_meta,
    sync_group_lrs,
)
from minigpt.i18n import _
from minigpt.runtime import Runtime
from minigpt.safe_load import safe_torch_load, weights_only_loads

log = logging.getLogger(__name__)
# DeepSpeed's ZeRO calls a torch collective that torch has deprecated; the warning is for DeepSpeed, not
# for our users, and each rank repeats it.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)


def init_distributed(timeout_s: int = 600) -> torch.device:
    """Start the process group once (gloo on DeepSpeed's CPU accelerator) and return this rank's device.

    Every collective fails after `timeout_s` instead of waiting for a lost rank forever."""
    accelerator = get_accelerator()
    if "WORLD_SIZE" not in os.environ:
        # --ds-config without a launcher: a world of one, so DeepSpeed does not go looking for MPI.
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": "29500"}.items():
            os.environ.setdefault(name, value)
    if not torch.distributed.is_initialized():
        backend = "gloo" if accelerator.device_name() == "cpu" else None
        timeout = datetime.timedelta(seconds=timeout_s)
        # Groups made later (DeepSpeed's data-parallel clone of the world) take torch's module defaults
        # (30 min gloo, 10 min NCCL), not the world's timeout: set those defaults too.
        c10d = torch.distributed.distributed_c10d
        c10d.default_pg_timeout = timeout
        if getattr(c10d, "default_pg_nccl_timeout", None) is not None:
            c10d.default_pg_nccl_timeout = timeout
        # DeepSpeed prints "... op built successfully" from every rank: rank 0's says it once.
        with contextlib.nullcontext() if is_first_rank() else contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
        unlink_shared_memory_segment()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    accelerator.set_device(local_rank)
    return torch.device(accelerator.device_name(local_rank))


def unlink_shared_memory_segment() -> None:
    """Remove this rank's name for DeepSpeed's CPU all-reduce segment once every rank has mapped it.

    On the CPU accelerator, when all ranks share a machine, each rank creates a 66 MiB /dev/shm segment
    (deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>) and the peers map it by name;
    DeepSpeed never unlinks it, so every run on a new port kept its ranks' segments in RAM until reboot.
    After a barrier all peers hold their mappings: dropping the name frees the memory when the last rank
    exits (however it exits), and a later run on the same port starts from a fresh segment."""
    world_size = torch.distributed.get_world_size()
    # DeepSpeed's own test for the shared-memory path, which every rank answers alike (so all or none wait).
    if get_accelerator().device_name() != "cpu" or os.environ.get("LOCAL_SIZE") != str(world_size):
        return
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    torch.distributed.barrier()
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def distributed_runtime(timeout_s: int = 600) -> Runtime:
    """The runtime of a process under a launcher (or --ds-config alone): the process group started, its
    collectives failing after `timeout_s` (--dist-timeout)."""
    device = init_distributed(timeout_s)
    return Runtime(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=device, distributed=True)


def moe_optimizer(optimizer: torch.optim.Optimizer, optim: OptimSection) -> torch.optim.Optimizer:
    """The same AdamW with DeepSpeed's MoE parameter groups: expert weights apart, since ZeRO reduces and
    partitions them over the expert-data-parallel group rather than all ranks."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{"name": f"group{index}", "params": list(group["params"]), "weight_decay": group["weight_decay"]}
             for index, group in enumerate(optimizer.param_groups)]
    groups = [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]
    return type(optimizer)(groups, lr=optim.learning_rate, betas=(optim.beta1, optim.beta2), eps=1e-8,
                           **({"fused": True} if isinstance(optimizer, torch.optim.AdamW) else {}))


class DeepSpeedEngine(Engine):
    """`deepspeed.initialize` around the model with the client optimizer and scheduler."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, plan: DeepSpeedPlan | None = None,
                 runtime: Runtime | None = None):
        """`plan`: the configuration `create_runtime` built and checked before the rendezvous (default: built
        here from `cfg` for WORLD_SIZE ranks, before any process-group or model work, so a bad config fails
        fast and by name)."""
        plan = plan or plan_deepspeed(cfg.engine, cfg.optim, int(os.environ.get("WORLD_SIZE", "1")),
                                     get_accelerator().device_name())
        self.runtime = runtime or distributed_runtime(cfg.engine.dist_timeout)  # built alone (tests, benchmarks)
        self.device, self.rank, self.world_size = self.runtime.device, self.runtime.rank, self.runtime.world_size
        if self.world_size != plan.world_size:
            raise RuntimeError(_("the DeepSpeed config was built for {planned} rank(s), but the process group has "
                                 "{ranks}").format(planned=plan.world_size, ranks=self.world_size))
        raw, config = plan.raw, plan.config
        self.precision = plan.precision
        self.zero_stage = plan.zero_stage
        self._ds_grad_accum = cfg.optim.grad_accum  # DeepSpeed's gradient_accumulation_steps: its backward divides by it
        self._boundary_pending = False
        self.ep_size, self.ep_rank, self.num_local_experts = 1, 0, 0
        num_experts = getattr(getattr(model, "config", None), "num_experts", 0)
        if num_experts:
            # Each rank keeps num_experts / ep_size experts; DeepSpeed's expert-parallel groups are consecutive
            # ranks ([0..ep-1], [ep..2ep-1], ...), so this rank holds experts ep_rank * local ... + local - 1.
            self.ep_size = resolve_ep_size(cfg.engine.ep_size, self.world_size, num_experts, self.zero_stage)
            self.ep_rank, self.num_local_experts = self.rank % self.ep_size, num_experts // self.ep_size
            use_deepspeed_moe(model, self.ep_size, self.ep_rank)
        model = model.to(self.device)
        client_optimizer = build_optimizer(model, cfg.optim)
        if num_experts:
            client_optimizer = moe_optimizer(client_optimizer, cfg.optim)
        if offloads_optimizer(raw):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in client_optimizer.param_groups]
            client_optimizer = DeepSpeedCPUAdam(groups, lr=cfg.optim.learning_rate,
                                                betas=(cfg.optim.beta1, cfg.optim.beta2), eps=1e-8, adamw_mode=True)
        self.schedule_clock = ScheduleClock()
        scheduler = build_scheduler(client_optimizer, cfg.schedule, self.schedule_clock)
        self.ds, self.optimizer, _dataloader, self.scheduler = deepspeed.initialize(
            model=model, optimizer=client_optimizer, lr_scheduler=scheduler, config=config)
        self.module = self.ds.module
        if cfg.engine.activation_checkpointing:
            deepspeed.checkpointing.configure(None, partition_activations=False, contiguous_checkpointing=False,
                                              checkpoint_in_cpu=False, synchronize=False, profile=False)
            enable_activation_checkpointing(self.module, deepspeed.checkpointing.checkpoint, reentrant=True)
        self._names = parameter_names(self.module)
        if num_experts:
            from deepspeed.utils import groups

            found = groups._get_expert_parallel_rank(f"ep_size_{self.ep_size}")
            if found != self.ep_rank:
                raise RuntimeError(_("DeepSpeed placed this rank at expert-parallel rank {found}, expected "
                                     "{expected}").format(
                    found=found, expected=self.ep_rank))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor, micro_batches: int = 1, last: bool = True) -> None:
        """The caller's `last` is DeepSpeed's accumulation boundary (where ZeRO reduces gradients); the
        1/micro_batches scaling is DeepSpeed's own division by its gradient_accumulation_steps.

        DeepSpeed counts the boundary itself from the same micro-batch count, so the two are checked to
        agree rather than forced with `set_gradient_accumulation_boundary` (with that override, one CI run
        saw ZeRO-3 on CPU skip a step for non-finite gradients; DeepSpeed's own counting is the path every
        other run has used)."""
        if micro_batches != self._ds_grad_accum:
            raise ValueError(_("backward over {micro_batches} micro-batches per step, but DeepSpeed was configured "
                               "for gradient_accumulation_steps={accum}").format(
                micro_batches=micro_batches, accum=self._ds_grad_accum))
        if self.ds.is_gradient_accumulation_boundary() != last:
            raise RuntimeError(_("the loop's last micro-batch ({last}) disagrees with DeepSpeed's accumulation "
                                 "boundary: micro-batches were skipped or repeated").format(last=last))
        self.ds.backward(loss)
        if last:
            self._boundary_pending = True
        else:
            self.ds.step()  # DeepSpeed's protocol: step() after every backward; off the boundary it only counts

    def step(self) -> StepResult:
        if not self._boundary_pending:
            raise RuntimeError(_("step() before the backward marked last=True of this optimizer step"))
        self._boundary_pending = False
        lr = self.lr
        fallback_norm = self._local_grad_norm() if self.zero_stage == 0 else None
        if fallback_norm is not None and not math.isfinite(fallback_norm):
            return self._skip_zero0_step(fallback_norm, lr)
        self.ds.step()
        grad_norm = self.ds.get_global_grad_norm()
        grad_norm = float(grad_norm if grad_norm is not None else fallback_norm or 0.0)
        skipped = not self.ds.was_step_applied()
        if skipped:
            log.warning(_("non-finite gradients (norm {norm}): DeepSpeed skipped the update").format(norm=grad_norm))
        return StepResult(grad_norm=grad_norm, lr=lr, skipped=skipped)

    def _skip_zero0_step(self, grad_norm: float, lr: float) -> StepResult:
        """ZeRO-0 in fp32 has no overflow check: let DeepSpeed advance its counters with the optimizer's
        update disabled for this one call, then undo the scheduler step it takes anyway."""
        schedule_position = self.scheduler.state_dict()
        for param in self.module.parameters():
            if param.grad is not None:
                param.grad.zero_()
        optimizer = self.ds.optimizer
        optimizer.step = lambda *args, **kwargs: None  # instance attribute shadows the method for one call
        try:
            self.ds.step()
        finally:
            del optimizer.step
        self.scheduler.load_state_dict(schedule_position)
        sync_group_lrs(self.optimizer, self.scheduler)
        log.warning(_("non-finite gradients (norm {norm}): update skipped, weights unchanged").format(norm=grad_norm))
        return StepResult(grad_norm=grad_norm, lr=lr, skipped=True)

    def _local_grad_norm(self) -> float:
        """Norm of the (already all-reduced) ZeRO-0 gradients, for when DeepSpeed does not compute it.

        A rank holds only its own experts' gradients: their squares are summed over the ranks (each expert
        counted once: divided by its expert-data-parallel replicas) to give the global norm."""
        dense, experts = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for name, param in self.module.named_parameters():
            if param.grad is not None:
                square = param.grad.detach().double().pow(2).sum().cpu()
                if self.num_local_experts and is_expert_name(name):
                    experts += square
                else:
                    dense += square
        if self.num_local_experts:
            replicas = self.world_size // self.ep_size
            experts = self.all_reduce_sum(experts.to(self.device)).cpu() / replicas
        return float((dense + experts).sqrt())

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        # Files land in <parent>/<tag>/ = directory; no `latest` (the checkpoint manager writes its own).
        self.ds.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
        if self.is_main:
            meta = {"engine": "deepspeed", "zero_stage": self.zero_stage, "world_size": self.world_size,
                    "precision": self.precision, "format_version": FORMAT_VERSION, "ep_size": self.ep_size}
            (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        self.barrier()

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        meta = read_engine_meta(directory / META_FILE) if (directory / META_FILE).is_file() else None
        if (directory / ENGINE_FILE).is_file():
            self._load_portable(read_engine_file(directory / ENGINE_FILE), str(directory / ENGINE_FILE))
            return
        if meta is None:
            raise ConfigError(_("{path}: neither {engine_file} (plain engine) nor {meta_file} (DeepSpeed "
                                "engine)").format(
                path=directory, engine_file=ENGINE_FILE, meta_file=META_FILE))
        if (meta["world_size"], meta["zero_stage"], meta["ep_size"]) != (
                self.world_size, self.zero_stage, self.ep_size):
            log.warning(_("{path}: saved by ZeRO-{saved_stage} on {saved_ranks} ranks (expert parallel {saved_ep}), "
                          "this run is ZeRO-{stage} on {ranks} ranks (expert parallel {ep}): converting through full "
                          "fp32 weights and optimizer moments").format(
                path=directory, saved_stage=meta["zero_stage"], saved_ranks=meta["world_size"],
                saved_ep=meta["ep_size"], stage=self.zero_stage, ranks=self.world_size, ep=self.ep_size))
            self._load_portable(read_deepspeed_checkpoint(directory), str(directory))
            return
        self._check_deepspeed_shapes(directory)
        with weights_only_loads():  # DeepSpeed's own loader asks for weights_only=False; never granted
            load_path, _client_state = self.ds.load_checkpoint(str(directory.parent), tag=directory.name,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise ConfigError(_("{path}: DeepSpeed could not load this checkpoint (see the log above)").format(
                path=directory))

    def _check_deepspeed_shapes(self, directory: Path) -> None:
        """Refuse a DeepSpeed checkpoint of another model shape with a message naming the tensor."""
        # Not DeepSpeed's per-expert files (layer_L_expert_E_mp_rank_00_model_states.pt)
        files = sorted(path for path in directory.glob("*model_states.pt") if not path.name.startswith("layer_"))
        if not files:
            raise ConfigError(_("{path}: no DeepSpeed *_model_states.pt files").format(path=directory))
        saved = safe_torch_load(files[0])
        if saved.get("param_shapes"):
            found = {name: torch.empty(shape, device="meta")
                     for group in saved["param_shapes"] for name, shape in group.items()}
        else:  # ZeRO-0 saves the full module instead of partition shapes
            found = {name: saved["module"][name] for name in self._param_shapes() if name in saved["module"]}
        expected = self._param_shapes()
        if self.num_local_experts and not any(is_expert_name(name) for name in found):
            # DeepSpeed keeps the experts out of the module state (its layer_L_expert_E files have them)
            expected = {name: shape for name, shape in expected.items() if not is_expert_name(name)}
        check_shapes_fit(expected, found, str(directory))

    def _param_shapes(self) -> dict[str, torch.Size]:
        return {name: getattr(p, "ds_shape", p.shape) for name, p in self.module.named_parameters()}

    def _load_portable(self, state: dict[str, Any], source: str) -> None:
        """Place engine-neutral state (full weights, named AdamW moments, scheduler) into this engine."""
        # Engine-neutral names are the plain model's; this rank's DeepSpeed-MoE names map onto them.
        names = {name: plain_name(name, self.ep_rank, self.num_local_experts) for name in self._param_shapes()}
        weights = {name: state["model"][plain] for name, plain in names.items() if plain in state["model"]}
        check_shapes_fit(self._param_shapes(), weights, source)
        moments = {name: state["optimizer"][plain] for name, plain in names.items() if plain in state["optimizer"]}
        if not moments:
            log.warning(_("{source}: checkpoint has no optimizer moments; AdamW restarts from zero moments").format(
                source=source))
        if self.zero_stage == 0:
            with torch.no_grad():
                for name, param in self.module.named_parameters():
                    param.copy_(weights[name].to(param.dtype))
            inner = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
            load_named_optimizer_state(inner, self.module, moments, source)
        else:
            self._load_portable_zero(weights, moments)
        self.scheduler.load_state_dict(fit_scheduler_state(state["scheduler"], len(self.optimizer.param_groups)))
        sync_group_lrs(self.optimizer, self.scheduler)

    def _load_portable_zero(self, weights: dict[str, torch.Tensor], moments: dict[str, dict]) -> None:
        inner = self.optimizer.optimizer
        step = next((float(s["step"]) for s in moments.values() if "step" in s), 0.0)
        # AdamW state is created lazily at the first step; create it so the fragments have somewhere to go.
        # ZeRO-3 points the inner optimizer at one flat fp32 sub-group at a time; 1/2 keep them all in its groups.
        flats = (self.optimizer.fp32_partitioned_groups_flat if self.zero_stage == 3
                 else [flat for group in inner.param_groups for flat in group["params"]])
        for flat in flats:
            state = inner.state[flat]
            for key in ADAM_KEYS:
                state.setdefault(key, torch.zeros_like(flat))
            state["step"] = torch.tensor(step, dtype=torch.float32)
        if hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.optimizer._lazy_init_hp_params_optimizer_state()
        for name, param in self.module.named_parameters():
            value = weights[name].to(self.device, torch.float32)
            safe_set_full_fp32_param(param, value)
            for key in ADAM_KEYS:
                if name in moments and key in moments[name]:
                    safe_set_full_optimizer_state(param, moments[name][key].to(self.device, torch.float32), key)
            if self.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.rank == 0:
                        with torch.no_grad():
                            param.copy_(value.to(param.dtype))
            else:
                with torch.no_grad():
                    param.copy_(value.to(param.dtype))

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 from the fp32 master copy (ZeRO 1-3 gather collectively); None elsewhere.

        Mixture of experts: named as the plain model's parameters, every expert gathered from the ranks of
        the first expert-parallel group (ranks 0 .. ep_size - 1 hold experts 0 .. num_experts - 1)."""
        result: dict[str, torch.Tensor] = {}
        gathered: dict[int, torch.Tensor] = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            if isinstance(tensor, nn.Parameter):
                if id(tensor) not in gathered:
                    full = safe_get_full_fp32_param(tensor) if self.zero_stage > 0 else None
                    if full is None and hasattr(tensor, "ds_id"):
                        with deepspeed.zero.GatheredParameters([tensor]):
                            full = tensor.detach().clone()
                    gathered[id(tensor)] = (full if full is not None else tensor.detach()).float().cpu().clone()
                value = gathered[id(tensor)]
            else:
                value = tensor.detach().cpu().clone()
            if self.num_local_experts and is_expert_name(name):
                pieces = [torch.empty_like(value) for _rank in range(self.world_size)]
                torch.distributed.all_gather(pieces, value.to(self.device))
                if self.is_main:
                    for rank in range(self.ep_size):
                        result[plain_name(name, rank, self.num_local_experts)] = pieces[rank].cpu()
            elif self.is_main:
                result[plain_name(name, 0, self.num_local_experts)] = value
        return result if self.is_main else None
