"""Which device and which numeric precision a run uses, decided once and printed."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
from dataclasses import dataclass

import torch

from minigpt.config import ConfigError
from minigpt.i18n import _

Precision = str
"""One of "fp32", "bf16", "fp16" (after `resolve_precision`)."""


def check_device(requested: str) -> torch.device:
    """`--device requested` as a torch device, or a ConfigError naming it when this machine lacks it."""
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise ConfigError(_("--device {device!r} is not a device name (cpu, cuda, cuda:N, mps)").format(
            device=requested)) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(_("--device {device}: CUDA is not available on this machine (use cpu or mps)").format(
            device=requested))
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(_("--device {device}: only {count} CUDA device(s) visible").format(
            device=requested, count=torch.cuda.device_count()))
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(_("--device {device}: Apple MPS is not available on this machine").format(device=requested))
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
        say(_("[minigpt] device {device} (requested with --device)").format(device=device), flush=True)
        return device
    if torch.cuda.is_available():
        device, why = torch.device("cuda"), _("CUDA available ({name})").format(name=torch.cuda.get_device_name(0))
    elif torch.backends.mps.is_available():
        device, why = torch.device("mps"), _("Apple MPS available, no CUDA")
    else:
        device, why = torch.device("cpu"), _("no CUDA or MPS device found")
    say(_("[minigpt] device {device} (auto-detected: {why}; override with --device)").format(device=device, why=why),
        flush=True)
    return device


PROBE_MARGIN = 1.5
"""Where the CPU's flags don't say whether it has native bf16, the probe picks bf16 only when a bf16 matmul
runs at least this much faster than an fp32 one: native bf16 measures 2-3x, emulated bf16 ~0.01x, so no
load on the machine can move a CPU from one side of the margin to the other."""
BF16_ISA_LIMITS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "ALL",
                   "DEFAULT")
"""Values of ONEDNN_MAX_CPU_ISA that still let oneDNN (torch's CPU bf16 matmuls) use the bf16 instructions."""


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved precision and why it was chosen (printed at start-up and by --dry-run)."""

    precision: Precision
    why: str


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU feature flags the kernel reports (x86 `flags`, ARM `Features`), or None where there is no
    /proc/cpuinfo (macOS, Windows)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _colon, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def native_cpu_bf16(flags: set[str] | None, machine: str) -> tuple[bool | None, str]:
    """Whether this CPU runs bf16 matmuls in hardware, from facts that don't change with load: the CPU's
    flags and the oneDNN ISA cap. None when the flags don't settle it (no flags, an unknown architecture)."""
    if flags is None:
        return None, _("no CPU flags to read (no /proc/cpuinfo)")
    if machine in ("x86_64", "amd64", "i386", "i686"):
        native = sorted(flags & {"avx512_bf16", "amx_bf16"})
        if not native:
            return False, _("this CPU has no avx512_bf16 or amx_bf16, so bf16 is emulated (8-10x slower than fp32 "
                            "here)")
        limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
        if limit and limit not in BF16_ISA_LIMITS:
            return False, _("ONEDNN_MAX_CPU_ISA={limit} keeps oneDNN off the CPU's {isa} instructions").format(
                limit=limit, isa="/".join(native))
        return True, _("this CPU has {isa}").format(isa=_(" and ").join(native))
    if machine in ("aarch64", "arm64"):
        if "bf16" in flags:
            return True, _("this CPU has the Arm bf16 extension")
        return False, _("this CPU lacks the Arm bf16 extension, so bf16 is emulated")
    return None, _("no known bf16 flag for a {machine} CPU").format(machine=machine)


def bf16_matmul_speedup(size: int = 512, repeats: int = 5) -> float:
    """fp32 matmul time over bf16 matmul time on this CPU (> 1: bf16 is faster). Interleaved and the best of
    `repeats` each, on constant inputs: it draws no random numbers and touches no model."""
    a = torch.linspace(-1, 1, size * size).reshape(size, size)
    timings: dict[torch.dtype, float] = {}
    for _repeat in range(repeats):
        for dtype in (torch.float32, torch.bfloat16):
            x = a.to(dtype)
            started = time.perf_counter()
            x @ x
            timings[dtype] = min(timings.get(dtype, float("inf")), time.perf_counter() - started)
    return timings[torch.float32] / max(timings[torch.bfloat16], 1e-12)


@functools.lru_cache(maxsize=1)
def choose_cpu_precision() -> PrecisionChoice:
    """`--precision auto` on the CPU: bf16 where the hardware runs it natively, else fp32; a short probe with
    a decisive margin (PROBE_MARGIN) only where the flags don't settle it. Decided once per process."""
    native, why = native_cpu_bf16(cpu_flags(), platform.machine().lower())
    if native is None:
        speedup = bf16_matmul_speedup()
        native = speedup >= PROBE_MARGIN
        why = (_("{why}; a bf16 matmul probe ran {speedup:.2f}x the speed of fp32 (at least the {margin}x that bf16 "
                 "must win by)") if native else
               _("{why}; a bf16 matmul probe ran {speedup:.2f}x the speed of fp32 (under the {margin}x that bf16 must "
                 "win by)")).format(why=why, speedup=speedup, margin=PROBE_MARGIN)
    return PrecisionChoice("bf16" if native else "fp32", why)


def choose_precision(precision: str, device: torch.device, *, deepspeed: bool = False) -> PrecisionChoice:
    """Turn --precision (auto/fp32/bf16/fp16) into what `device` will actually run, and say why.

    auto → on CUDA bf16 where the GPU has it natively (Ampere and newer), else fp32; on the CPU bf16 where
    the CPU has native bf16 (`choose_cpu_precision`), else fp32 — except under DeepSpeed, whose bf16 mode
    keeps the weights themselves in bf16 (its CPU accelerator is for testing: fp32 there); on MPS fp32.
    bf16 and fp16 run on every device through autocast, fp16 with a GradScaler (on CPU too, so the
    loss-scaling path GPU users rely on is tested here); DeepSpeed's CPU accelerator refuses fp16, which
    `build_ds_config` says clearly."""
    if precision == "auto":
        if device.type == "cuda":
            if torch.cuda.get_device_capability(device)[0] >= 8:
                return PrecisionChoice("bf16", _("auto: {gpu} has native bf16").format(
                    gpu=torch.cuda.get_device_name(device)))
            return PrecisionChoice("fp32", _("auto: {gpu} has no native bf16 (--precision fp16 uses its tensor cores "
                                             "with loss scaling)").format(gpu=torch.cuda.get_device_name(device)))
        if device.type == "cpu" and deepspeed:
            return PrecisionChoice("fp32", _("auto: DeepSpeed on the CPU runs fp32 (its bf16 mode stores the "
                                             "weights in bf16; pass --precision bf16 to use it)"))
        if device.type == "cpu":
            choice = choose_cpu_precision()
            return PrecisionChoice(choice.precision, _("auto: {why}").format(why=choice.why))
        return PrecisionChoice("fp32", _("auto: fp32 on {device}").format(device=device.type))
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(_("--precision bf16: {gpu} does not support bf16; use --precision fp16 or fp32").format(
            gpu=torch.cuda.get_device_name(device)))
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(_("--precision must be auto, fp32, bf16 or fp16, got {value!r}").format(value=precision))
    return PrecisionChoice(precision, _("requested with --precision"))


def resolve_precision(precision: str, device: torch.device, *, deepspeed: bool = False) -> Precision:
    """The precision `choose_precision` picks, without the reason."""
    return choose_precision(precision, device, deepspeed=deepspeed).precision


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: run in fp32 without autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast_context(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """The autocast a forward pass at `precision` runs under on `device` (a no-op for fp32)."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
