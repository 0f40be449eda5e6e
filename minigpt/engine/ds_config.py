"""Build the final DeepSpeed config from a `ds_configs/*.json` file and the training config.

The JSON holds only what is DeepSpeed's own (ZeRO stage, offload, communication). Batch sizes,
accumulation, clipping and precision come from the training config's `optim` and `engine` sections; a JSON
that also sets one of them must agree, or `ConfigError` names the file, the field and both values before any work starts. Optimizer
and LR schedule are the engine's client objects, so a JSON `optimizer`/`scheduler` section is refused.
A top-level key DeepSpeed does not read (a misspelling such as `zero_optimizaton`) is warned about,
with the closest known key.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt.config import ConfigError, EngineSection, OptimSection
from minigpt.engine.device import resolve_precision
from minigpt.i18n import _

ZERO_STAGES = (0, 1, 2, 3)
DEEPSPEED_TOP_LEVEL_KEYS = (
    "activation_checkpointing", "aio", "autotuning", "bf16", "bfloat16", "checkpoint", "comet", "comms_logger",
    "communication_data_type", "compile", "csv_monitor", "data_efficiency", "data_types", "dataloader_drop_last",
    "datastates_ckpt", "disable_allgather", "disable_python_gc", "dump_state", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "hybrid_engine", "log_level", "managed_gradient_accumulation",
    "memory_breakdown", "optimizer", "pipeline", "prescale_gradients", "scheduler",
    "seq_parallel_communication_data_type", "steps_per_print", "tensor_parallel", "tensorboard", "timers",
    "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
    "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "zero_optimization",
)
"""The top-level keys DeepSpeed 0.19 reads (`DeepSpeedConfig._initialize_params` in
deepspeed/runtime/config.py, plus `vocabulary_size`). DeepSpeed keeps no such list and ignores a key it
does not read, so a misspelled section would silently run with defaults. tests/test_ds_config.py
replays DeepSpeed's parsing to keep this list in step."""


def load_ds_json(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config, naming the file on a missing file or a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(_("--ds-config {path}: no such file (see ds_configs/ for the shipped ones)").format(
            path=path))
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(_("{path}:{line}:{column}: not valid JSON ({error})").format(
            path=path, line=err.lineno, column=err.colno, error=err.msg)) from err
    if not isinstance(raw, dict):
        raise ConfigError(_("{path}: a DeepSpeed config must be a JSON object, got {kind}").format(
            path=path, kind=type(raw).__name__))
    if os.environ.get("RANK", "0") == "0":  # once per run, not once per rank
        for warning in unknown_key_warnings(raw, str(path)):
            print(_("[minigpt] warning: {warning}").format(warning=warning), file=sys.stderr, flush=True)
    return raw


def unknown_key_warnings(raw: dict[str, Any], source: str) -> list[str]:
    """One line per top-level key of `raw` that DeepSpeed does not read, with the closest known key."""
    warnings = []
    for key in sorted(set(raw) - set(DEEPSPEED_TOP_LEVEL_KEYS)):
        close = difflib.get_close_matches(key, DEEPSPEED_TOP_LEVEL_KEYS, n=1)
        hint = _(" (did you mean {key!r}?)").format(key=close[0]) if close else ""
        warnings.append(_("{source}: unknown top-level key {key!r}{hint}; DeepSpeed does not read it").format(
            source=source, key=key, hint=hint))
    return warnings


def zero_stage_of(raw: dict[str, Any]) -> int:
    """The ZeRO stage a raw config asks for (0 when it has no zero_optimization section)."""
    return int(raw.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(raw: dict[str, Any]) -> bool:
    """True when the config offloads optimizer state to CPU/NVMe (which needs DeepSpeed's CPU Adam)."""
    device = raw.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def _agree(raw: dict[str, Any], field: str, expected: Any, source: str, flag: str) -> None:
    if field in raw and raw[field] != expected:
        raise ConfigError(_("{source}: {field}={value!r} contradicts the training config ({flag} gives "
                            "{expected!r}); remove {field!r} from the JSON (it is filled from the training config) "
                            "or change {flag}").format(source=source, field=field, value=raw[field], flag=flag,
                                                       expected=expected))


DEFAULT_DS_CONFIG: dict[str, Any] = {"zero_optimization": {"stage": 0}}
"""What a run under a launcher without --ds-config uses: plain data parallelism (ZeRO-0)."""


@dataclass(frozen=True)
class DeepSpeedPlan:
    """A DeepSpeed run's configuration, built and checked once, before the process group starts: what
    `--dry-run` prints, what `DeepSpeedEngine` hands to `deepspeed.initialize`."""

    config: dict[str, Any]
    """The final config (`build_ds_config`)."""
    raw: dict[str, Any]
    """The JSON as the user wrote it (DEFAULT_DS_CONFIG without --ds-config)."""
    source: str
    """The JSON's path, or a name for the default, as errors say it."""
    precision: str
    accelerator: str
    world_size: int

    @property
    def zero_stage(self) -> int:
        return zero_stage_of(self.raw)


def plan_deepspeed(engine: EngineSection, optim: OptimSection, world_size: int, accelerator: str) -> DeepSpeedPlan:
    """Load `engine.ds_config` (or the default), resolve the precision for `accelerator` (DeepSpeed's name:
    "cuda", "cpu", ...) and build the final config for `world_size` ranks; ConfigError names what is wrong."""
    raw = load_ds_json(engine.ds_config) if engine.ds_config else copy.deepcopy(DEFAULT_DS_CONFIG)
    source = engine.ds_config or _("<default ZeRO-0 config>")
    precision = resolve_precision(engine.precision, torch.device(accelerator), deepspeed=True)
    config = build_ds_config(raw, engine, optim, world_size, source, precision=precision, accelerator=accelerator)
    return DeepSpeedPlan(config, raw, source, precision, accelerator, world_size)


def build_ds_config(raw: dict, engine: EngineSection, optim: OptimSection, world_size: int, source: str, *,
                    precision: str | None = None, accelerator: str = "cuda") -> dict:
    """The config passed to `deepspeed.initialize`: `raw` plus batch sizes and clipping (`optim`) and precision
    (`engine`).

    `source` names the JSON in error messages. `accelerator` is DeepSpeed's accelerator name ("cuda",
    "cpu", ...); `precision` is the resolved precision (default: `engine.precision` resolved for it)."""
    if precision is None:
        precision = resolve_precision(engine.precision, torch.device(accelerator), deepspeed=True)
    if world_size < 1:
        raise ConfigError(_("world size must be at least 1, got {value}").format(value=world_size))
    if engine.compile == "on":
        raise ConfigError(_("--compile on: the DeepSpeed engine runs eager (torch.compile is applied by the plain "
                            "engine only); pass --compile auto (it says it stays eager) or off, or train on one "
                            "device without a launcher and --ds-config to compile"))
    ds = copy.deepcopy(raw)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(_("{source}: has a {section!r} section, but MiniGPT builds the {section} from the "
                                "training config (--learning-rate, --warmup-steps, ...); remove it from the "
                                "JSON").format(
                source=source, section=section))
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(_("{source}: zero_optimization must be an object, got {value!r}").format(
            source=source, value=zero))
    if zero.get("stage", 0) not in ZERO_STAGES:
        raise ConfigError(_("{source}: zero_optimization.stage={stage!r}; choose one of {stages}").format(
            source=source, stage=zero.get("stage"), stages=ZERO_STAGES))
    if offloads_optimizer(ds) and zero.get("stage", 0) == 0:
        raise ConfigError(_("{source}: offload_optimizer needs zero_optimization.stage 1, 2 or 3, got 0").format(
            source=source))

    micro, accum = optim.batch_size, optim.grad_accum
    _agree(ds, "train_micro_batch_size_per_gpu", micro, source, "--batch-size")
    _agree(ds, "gradient_accumulation_steps", accum, source, "--grad-accum")
    _agree(ds, "train_batch_size", micro * accum * world_size, source,
           _("--batch-size {micro} x --grad-accum {accum} x world size {world_size}").format(
               micro=micro, accum=accum, world_size=world_size))
    _agree(ds, "gradient_clipping", float(optim.grad_clip), source, "--grad-clip")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * world_size
    ds["gradient_clipping"] = float(optim.grad_clip)

    if precision == "fp16" and accelerator == "cpu":
        raise ConfigError(_("{source}: fp16 requested but DeepSpeed runs on its CPU accelerator, which does not "
                            "support fp16; use --precision bf16 or fp32").format(source=source))
    for name in ("bf16", "fp16"):
        section = ds.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(_("{source}: {name} must be an object like {{\"enabled\": true}}, got {value!r}").format(
                source=source, name=name, value=section))
        wanted = precision == name
        if "enabled" in section and bool(section["enabled"]) != wanted:
            raise ConfigError(_("{source}: {name}.enabled={enabled!r} contradicts the training config (--precision "
                                "{requested} resolves to {precision}); remove {name!r} from the JSON or pass "
                                "--precision {suggested}").format(
                source=source, name=name, enabled=section["enabled"], requested=engine.precision, precision=precision,
                suggested=name if section["enabled"] else precision))
        ds[name] = {**section, "enabled": wanted}
    # A torch AdamW client optimizer is not on DeepSpeed's list of ZeRO-tested optimizers.
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def resolve_ep_size(requested: int, world_size: int, num_experts: int, zero_stage: int) -> int:
    """The expert-parallel size: `requested` (--ep-size) checked, or the largest divisor of both (0)."""
    if zero_stage == 3:
        raise ConfigError(_("mixture-of-experts models train with ZeRO stage 0, 1 or 2: DeepSpeed refuses its MoE "
                            "layer under ZeRO-3 (\"Native DeepSpeed MoE is not supported with ZeRO Stage 3\"); use "
                            "ds_configs/zero2.json"))
    if requested == 0:
        return math.gcd(world_size, num_experts)
    if world_size % requested or num_experts % requested:
        raise ConfigError(_("--ep-size {requested} must divide the world size ({world_size}) and the expert count "
                            "(num_experts={experts})").format(
            requested=requested, world_size=world_size, experts=num_experts))
    return requested
