"""Peak FLOP/s of one device: the denominator of model FLOPs utilisation (MFU).

Known GPUs come from a table of vendor dense (no sparsity) figures; CPUs, MPS and unknown GPUs are
measured once per process with a short matmul benchmark. `MINIGPT_PEAK_FLOPS` (FLOP/s per device)
overrides both. `model_flops_utilization` turns achieved FLOP/s into MFU, capped at 100%, for the training
monitor and the benchmarks alike.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import NamedTuple

import torch

from minigpt.i18n import _

PEAK_FLOPS_ENV = "MINIGPT_PEAK_FLOPS"

PRECISION_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class GpuPeak(NamedTuple):
    """Dense peak TFLOP/s of one GPU model."""

    pattern: str
    """Substring of `torch.cuda.get_device_name()` (upper case) that identifies the model."""
    half: float
    """bf16/fp16 tensor-core TFLOP/s (fp16 for GPUs without bf16)."""
    fp32: float
    """Plain fp32 TFLOP/s (no TF32)."""
    tf32: float | None = None
    """TF32 tensor-core TFLOP/s, used for fp32 when TF32 matmuls are allowed."""


# Ordered: the first pattern contained in the device name wins, so specific names come first
# ("H100 PCIE" before "H100", "L40S" before "L40" before "L4").
GPU_PEAKS: tuple[GpuPeak, ...] = (
    GpuPeak("B200", 2250.0, 80.0, 1125.0),
    GpuPeak("H100 PCIE", 756.0, 51.2, 378.0),
    GpuPeak("H100 NVL", 835.0, 60.0, 418.0),
    GpuPeak("H200 NVL", 835.0, 60.0, 418.0),
    GpuPeak("GH200", 989.4, 67.0, 494.7),
    GpuPeak("H100", 989.4, 67.0, 494.7),
    GpuPeak("H200", 989.4, 67.0, 494.7),
    GpuPeak("H800", 989.4, 67.0, 494.7),
    GpuPeak("A100", 312.0, 19.5, 156.0),
    GpuPeak("A800", 312.0, 19.5, 156.0),
    GpuPeak("L40S", 362.0, 91.6, 183.0),
    GpuPeak("L40", 181.0, 90.5, 90.5),
    GpuPeak("L4", 121.0, 30.3, 60.0),
    GpuPeak("A40", 149.7, 37.4, 74.8),
    GpuPeak("RTX A6000", 154.8, 38.7, 77.4),
    GpuPeak("RTX 4090", 165.2, 82.6, 82.6),
    GpuPeak("RTX 3090", 71.0, 35.6, 35.6),
    GpuPeak("V100S", 130.0, 16.4),
    GpuPeak("V100-PCIE", 112.0, 14.0),
    GpuPeak("V100", 125.0, 15.7),
    GpuPeak("T4", 65.0, 8.1),
    GpuPeak("MI300X", 1307.4, 163.4, 653.7),
    GpuPeak("MI250X", 383.0, 95.7),
)


def lookup_gpu_peak(device_name: str, precision: str, *, tf32: bool = False) -> float | None:
    """Table peak FLOP/s of the named GPU for `precision`, or None when the GPU is not in the table."""
    _check_precision(precision)
    name = device_name.upper()
    for entry in GPU_PEAKS:
        if entry.pattern in name:
            if precision != "fp32":
                tflops = entry.half
            elif tf32 and entry.tf32 is not None:
                tflops = entry.tf32
            else:
                tflops = entry.fp32
            return tflops * 1e12
    return None


def peak_flops(device: torch.device | str, precision: str) -> tuple[float, str]:
    """Peak FLOP/s of one `device` at `precision` ("fp32", "bf16", "fp16") and where the figure came from.

    The source starts with "env", "table" or "measured". Measurements are cached per process.
    """
    _check_precision(precision)
    device = torch.device(device)
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ValueError(_("${name} must be a positive number of FLOP/s, got {value!r}").format(
                name=PEAK_FLOPS_ENV, value=override))
        return value, f"env {PEAK_FLOPS_ENV}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = precision == "fp32" and torch.backends.cuda.matmul.allow_tf32
        value = lookup_gpu_peak(name, precision, tf32=tf32)
        if value is not None:
            kind = "tf32" if tf32 else precision
            return value, f"table ({name}, {kind} dense)"
    dtype = PRECISION_DTYPES[precision]
    # One square matmul stands for the device's best, which it is not everywhere: where bf16 is emulated (no
    # avx512_bf16/amx_bf16, or ONEDNN_MAX_CPU_ISA=AVX2) a 1024x1024 bf16 matmul ran at 0.9 GFLOP/s while the
    # model's narrow autocast linears (2048x160 by 160x432) ran at 12, so training steps beat this "peak"
    # several times over; a busy machine at start-up lowers it too. `model_flops_utilization` caps MFU at 100%.
    size = 1024 if device.type == "cpu" else 4096
    value = measure_matmul_flops(device, dtype, size=size)
    return value, f"measured ({size}x{size} {str(dtype).removeprefix('torch.')} matmul on {device})"


def model_flops_utilization(achieved_flops: float, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak, never above 1.

    A peak measured with one matmul can fall below what a workload reaches (see `peak_flops`); a ratio above
    1 then says the peak is wrong, not that the device did more than it can, so every MFU is capped here."""
    if not peak_flops_per_device > 0:
        raise ValueError(_("the peak must be a positive number of FLOP/s, got {value!r}").format(
            value=peak_flops_per_device))
    return min(achieved_flops / peak_flops_per_device, 1.0)


@functools.cache
def measure_matmul_flops(device: torch.device, dtype: torch.dtype, *, size: int = 1024,
                         seconds: float = 0.3, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of `size`x`size` matmuls on `device`, about `seconds` in all."""
    try:
        # A generator of its own: measuring the peak must not move the run's seeded random stream.
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(size, size, device=device, generator=generator).to(dtype)
        b = torch.randn(size, size, device=device, generator=generator).to(dtype)
        out = torch.mm(a, b)
    except RuntimeError as err:
        raise ValueError(_("cannot run a {dtype} matmul on {device} to measure its peak FLOP/s: {error}").format(
            dtype=dtype, device=device, error=err)) from err
    batch = 1 if device.type == "cpu" else 10  # accelerators: amortise the synchronisation
    best = 0.0
    for _repeat in range(repeats):
        _synchronize(device)
        done, start = 0, time.perf_counter()
        while True:
            for _matmul in range(batch):
                torch.mm(a, b, out=out)
            _synchronize(device)
            done += batch
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / repeats:
                break
        best = max(best, 2.0 * size**3 * done / elapsed)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _check_precision(precision: str) -> None:
    if precision not in PRECISION_DTYPES:
        raise ValueError(_("precision must be one of {choices} (resolve 'auto' first), got {value!r}").format(
            choices=tuple(PRECISION_DTYPES), value=precision))
