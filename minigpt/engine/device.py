"""Which device and which numeric precision a run uses, decided once and printed."""

from __future__ import annotations

import os

import torch

from minigpt.config import ConfigError

Precision = str
"""One of "fp32", "bf16", "fp16" (after `resolve_precision`)."""


def check_device(requested: str) -> torch.device:
    """`--device requested` as a torch device, or a ConfigError naming it when this machine lacks it."""
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise ConfigError(f"--device {requested!r} is not a device name (cpu, cuda, cuda:N, mps)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: CUDA is not available on this machine (use cpu or mps)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {requested}: Apple MPS is not available on this machine")
    return device


def is_first_rank() -> bool:
    """True in a single process and on global rank 0 of a launched run (read from the launcher's environment,
    so it holds before any process group exists)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def detect_device(requested: str = "") -> torch.device:
    """The device to train on: `requested` when given (and available), else cuda > mps > cpu.

    Prints what it chose and why (rank 0 only: ranks of a node choose alike), so a run on the wrong device
    is visible in the first lines of the log."""
    say = print if is_first_rank() else (lambda *a, **k: None)
    if requested and requested != "auto":
        device = check_device(requested)
        say(f"[minigpt] device {device} (requested with --device)", flush=True)
        return device
    if torch.cuda.is_available():
        device, why = torch.device("cuda"), f"CUDA available ({torch.cuda.get_device_name(0)})"
    elif torch.backends.mps.is_available():
        device, why = torch.device("mps"), "Apple MPS available, no CUDA"
    else:
        device, why = torch.device("cpu"), "no CUDA or MPS device found"
    say(f"[minigpt] device {device} (auto-detected: {why}; override with --device)", flush=True)
    return device


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """Turn --precision (auto/fp32/bf16/fp16) into what `device` will actually run.

    auto → bf16 on a CUDA device that supports it, else fp32. bf16 and fp16 run on every device through
    autocast, fp16 with a GradScaler (on CPU too, so the loss-scaling path GPU users rely on is tested
    here); DeepSpeed's CPU accelerator refuses fp16, which `build_ds_config` says clearly."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bf16; "
                          "use --precision fp16 or fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: run in fp32 without autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
