"""The engine-neutral checkpoint format both engines read and write, and its reader for DeepSpeed files.

`engine.pt` holds weights and AdamW moments keyed by parameter name, the LR-scheduler position and the
loss scaler, so a run saved by one engine (or one ZeRO layout) resumes on another. It lives apart from
both engines so that neither imports the other; `read_deepspeed_checkpoint` imports deepspeed only when
called, which keeps this module (and the plain engine) importable without it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt.config import ConfigError
from minigpt.i18n import _
from minigpt.safe_load import safe_torch_load, weights_only_loads

ENGINE_FILE = "engine.pt"
META_FILE = "engine_meta.json"
"""What the DeepSpeed engine writes beside DeepSpeed's own files: stage, world size, precision, ep_size."""
FORMAT_VERSION = 1
"""The format version `engine.pt` and `engine_meta.json` carry; files of another version are refused by name."""
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_DS_EXPERT = re.compile(r"^(?P<prefix>.*)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<local>\d+)\.(?P<rest>.*)$")
_DS_GATE = re.compile(r"^(?P<prefix>.*)\.moe\.deepspeed_moe\.gate\.wg\.weight$")


def plain_name(name: str, ep_rank: int, num_local: int) -> str:
    """The plain model's name of a DeepSpeed-MoE parameter (minigpt/engine/moe.py); other names unchanged.

    DeepSpeed names a rank's experts by local index; expert-parallel rank `ep_rank` holds experts
    ep_rank * num_local ... ep_rank * num_local + num_local - 1."""
    if match := _DS_GATE.match(name):
        return f"{match['prefix']}.router.weight"
    if match := _DS_EXPERT.match(name):
        return f"{match['prefix']}.experts.{ep_rank * num_local + int(match['local'])}.{match['rest']}"
    return name


def is_expert_name(name: str) -> bool:
    """True for a parameter of one of DeepSpeed's (rank-local) experts."""
    return _DS_EXPERT.match(name) is not None


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
                    raise ConfigError(_("{source}: optimizer state {key} of {name!r} has shape {found}, parameter "
                                        "has {expected}").format(source=source, key=key, name=name,
                                                                 found=tuple(state[key].shape),
                                                                 expected=tuple(param.shape)))
            optimizer.state[param] = {
                key: (value.to(param.device, torch.float32) if key in ADAM_KEYS else
                      value.detach().clone().float() if torch.is_tensor(value) else torch.tensor(float(value)))
                for key, value in state.items()}


def sync_group_lrs(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each group's lr from the restored scheduler position (LambdaLR.load_state_dict does not)."""
    for group, base_lr, schedule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                        strict=True):
        group["lr"] = base_lr * schedule(scheduler.last_epoch)


def fit_scheduler_state(state: dict[str, Any], num_groups: int) -> dict[str, Any]:
    """The LR-scheduler state for an optimizer of `num_groups` parameter groups.

    Every group follows one schedule from one peak LR; only the number of groups differs between engines
    (DeepSpeed's MoE optimizer adds a group for the experts), so per-group lists are cut or extended."""
    state = dict(state)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        if isinstance(state.get(key), list) and state[key] and len(state[key]) != num_groups:
            values = state[key]
            state[key] = [values[min(i, len(values) - 1)] for i in range(num_groups)]
    return state


def read_engine_file(path: Path) -> dict[str, Any]:
    """Load an `engine.pt` and check its format version."""
    return check_format_version(safe_torch_load(path), path)


def read_engine_meta(path: Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint's `engine_meta.json`, its format version checked."""
    return check_format_version(json.loads(path.read_text()), path)


def check_format_version(state: Any, path: Path) -> dict[str, Any]:
    """`state` if it is a dict of this `FORMAT_VERSION`, else a `ConfigError` naming the file and both versions."""
    found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
    if not isinstance(state, dict) or found != FORMAT_VERSION:
        raise ConfigError(_("{path}: engine checkpoint format version {found!r}; this MiniGPT reads version "
                            "{version}").format(path=path, found=found, version=FORMAT_VERSION))
    return state


def read_portable_state(directory: Path) -> dict[str, Any]:
    """The engine-neutral state of any checkpoint directory: `engine.pt`, or converted from DeepSpeed files."""
    if (directory / ENGINE_FILE).is_file():
        return read_engine_file(directory / ENGINE_FILE)
    if any(directory.glob("*model_states.pt")):
        return read_deepspeed_checkpoint(directory)
    raise ConfigError(_("{path}: no engine state found (neither {engine_file} nor DeepSpeed *_model_states.pt)").format(
        path=directory, engine_file=ENGINE_FILE))



def read_deepspeed_checkpoint(directory: Path) -> dict[str, Any]:
    """Rebuild the engine-neutral state (full fp32 weights, AdamW moments by name, step, scheduler) from the
    ZeRO 1/2/3 files of a DeepSpeed checkpoint, on one process.

    Weights come from DeepSpeed's own `zero_to_fp32` reconstruction. The AdamW moments are flat
    partitions laid out exactly like the fp32 master partitions, so the same reconstruction is applied
    to them (DeepSpeed's universal checkpoint does the equivalent with more machinery)."""
    from deepspeed.utils import zero_to_fp32

    directory = Path(directory)
    if any(directory.glob("layer_*_expert_*_model_states.pt")):
        return read_deepspeed_moe_checkpoint(directory)
    with weights_only_loads():  # zero_to_fp32 asks torch.load for weights_only=False; never granted
        model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(str(directory)))
    optim_files = zero_to_fp32.get_optim_files(str(directory))
    ranks = [safe_torch_load(path)["optimizer_state_dict"] for path in optim_files]
    stage, world_size = ranks[0]["zero_stage"], len(ranks)
    if stage not in (1, 2, 3):
        raise ConfigError(_("{path}: ZeRO stage {stage} checkpoints are not converted; resume it with the same "
                            "DeepSpeed config").format(path=directory, stage=stage))
    paddings = ranks[0].get("param_alignment_paddings")

    def merge(flat_by_rank: list) -> dict[str, torch.Tensor]:
        if stage <= 2:
            merged = zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(
                world_size, flat_by_rank, model_states, False, paddings)
        else:
            merged = zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(world_size, flat_by_rank, model_states,
                                                                            False)
        # ZeRO-3 reconstruction hands back lazy tensors; materialise them.
        return zero_to_fp32.to_torch_tensor(merged)

    master_key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    inner_key = "base_optimizer_state" if stage <= 2 else "optimizer_state_dict"
    weights = {k: v.float() if v.is_floating_point() else v for k, v in merge([r[master_key] for r in ranks]).items()}
    inner = [r[inner_key]["state"] for r in ranks]
    names = [name for group in model_states[0].param_shapes for name in group]
    optimizer: dict[str, dict[str, Any]] = {name: {} for name in names}
    if all(len(state) == len(r[master_key]) for state, r in zip(inner, ranks, strict=True)):
        for key in ADAM_KEYS:
            merged = merge([[state[g][key] for g in range(len(state))] for state in inner])
            for name in names:
                optimizer[name][key] = merged[name].float()
        step = inner[0][0]["step"]
        for name in names:
            optimizer[name]["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
    else:
        optimizer = {}
    scheduler = safe_torch_load(zero_to_fp32.get_model_state_file(str(directory), stage))["lr_scheduler"]
    return {"format_version": FORMAT_VERSION, "engine": "deepspeed", "world_size": world_size, "model": weights,
            "optimizer": optimizer, "scheduler": scheduler, "scaler": None}


def read_deepspeed_moe_checkpoint(directory: Path) -> dict[str, Any]:
    """`read_deepspeed_checkpoint` for a mixture-of-experts model under ZeRO-1/2: names mapped to the plain
    model's (every expert by its global index), from the fp32 master partitions and AdamW moments.

    ZeRO-1/2 keep one flat fp32 tensor per parameter group and rank, the group's parameters laid end to end
    (padding only at the end) and cut into `partition_count` equal pieces: the dense groups over all
    ranks, DeepSpeed's expert group over the expert-data-parallel ranks (those with the same rank modulo
    ep_size), whose concatenation is the flat of one expert-parallel rank's local experts."""
    meta_file = directory / META_FILE
    meta = read_engine_meta(meta_file) if meta_file.is_file() else {}
    ep_size = int(meta.get("ep_size", 0))
    if not ep_size:
        raise ConfigError(_("{path}: a DeepSpeed mixture-of-experts checkpoint without engine_meta.json's ep_size "
                            "cannot be converted; resume it with the same DeepSpeed config and world size").format(
            path=directory))
    model_states = safe_torch_load(directory / "mp_rank_00_model_states.pt")
    optim_files = sorted(directory.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                         key=lambda path: int(path.name.split("_")[3]))
    ranks = [safe_torch_load(path)["optimizer_state_dict"] for path in optim_files]
    if not ranks or ranks[0].get("zero_stage") not in (1, 2):
        found = ranks[0].get("zero_stage") if ranks else _("no optimizer files")
        raise ConfigError(_("{path}: mixture-of-experts checkpoints convert from ZeRO-1/2 only (found {found}); "
                            "resume it with the same DeepSpeed config and world size").format(
            path=directory, found=found))
    world_size = len(ranks)
    groups = ranks[0]["base_optimizer_state"]["param_groups"]
    shapes = model_states["param_shapes"]
    local_experts = {int(m["local"]) for group in shapes for name in group if (m := _DS_EXPERT.match(name))}
    num_local = max(local_experts) + 1

    def split(flat: torch.Tensor, group: dict[str, Any], ep_rank: int, out: dict[str, torch.Tensor]) -> None:
        offset = 0
        for name, shape in group.items():
            numel = int(torch.Size(shape).numel())
            out[plain_name(name, ep_rank, num_local)] = flat[offset:offset + numel].view(shape).float().clone()
            offset += numel

    def merged(pieces: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for index, group in enumerate(shapes):
            if groups[index].get("moe"):
                for ep_rank in range(ep_size):
                    members = [r for r in range(world_size) if r % ep_size == ep_rank]
                    split(torch.cat([pieces[r][index] for r in members]), group, ep_rank, out)
            else:
                split(torch.cat([pieces[r][index] for r in range(world_size)]), group, 0, out)
        return out

    weights = merged([r["single_partition_of_fp32_groups"] for r in ranks])
    optimizer: dict[str, dict[str, Any]] = {name: {} for name in weights}
    for alias, source in model_states.get("shared_params", {}).items():  # tied weights: lm_head = embed
        weights[alias] = weights[source]
    states = [r["base_optimizer_state"]["state"] for r in ranks]
    if all(len(state) == len(shapes) for state in states):
        for key in ADAM_KEYS:
            for name, value in merged([[state[g][key] for g in range(len(shapes))] for state in states]).items():
                optimizer[name][key] = value
        for name in optimizer:
            optimizer[name]["step"] = torch.as_tensor(states[0][0]["step"], dtype=torch.float32).clone()
    else:
        optimizer = {}
    return {"format_version": FORMAT_VERSION, "engine": "deepspeed", "world_size": world_size, "model": weights,
            "optimizer": optimizer, "scheduler": model_states["lr_scheduler"], "scaler": None}
