"""`--compile auto`: use torch.compile where it works and pays, decided from facts that don't change with load.

Compilation costs tens of seconds up front (11-110 s on a CPU, more on a busy one) and pays back a fraction
of every later step: 1.15-1.4x in fp32 on the small shapes this project trains on a CPU, 0.97x (the shape of
the quality recipe) to 1.31x (the baseline shape) in bf16 there (docs/performance.md). Timing eager and compiled steps
inside the run would let a busy machine decide differently from a quiet one, and since compiled and eager
steps agree only to float rounding, the run's numbers would depend on how busy the machine was. So the
decision reads only facts fixed before the first step:

1. Skipped where it cannot work: not the plain engine, Windows, MPS, a CPU without a C++ compiler (inductor
   generates C++), CUDA without triton, mixture-of-experts layers (routing has data-dependent shapes),
   activation checkpointing, modes whose batch shapes vary (`Objective.varying_shapes`: dpo, reward, rlhf).
2. Skipped where it does not reliably pay: bf16 on the CPU.
3. Skipped where the run is too short to pay back a compilation: fewer than `MIN_STEPS` optimizer steps
   asked for, or a --max-time budget under `MIN_SECONDS`.

Otherwise the model is compiled from the first step. The decision is saved in each checkpoint (`compiled`
in trainer_state.json) and a resumed run follows it, so it continues on the same kind of step.
`--compile on` compiles from the first step, `--compile off` never does.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import torch

from minigpt.i18n import _
from minigpt.modes import objective_class

MIN_STEPS = 2000
"""A run asking for fewer optimizer steps stays eager: at the 10-50 ms steps of the small shapes where a
compilation gains most, 2000 steps are 20-100 s of work, about what the compilation itself costs."""
MIN_SECONDS = 600.0
"""A --max-time budget under this stays eager: a compilation would take a large share of it."""


def compile_unavailable(device: torch.device, *, plain_engine: bool, moe: bool, activation_checkpointing: bool,
                        mode: str) -> str | None:
    """Why torch.compile cannot work or is not used for this run (None: it can be tried)."""
    if not plain_engine:
        return _("the DeepSpeed engine runs eager")
    if sys.platform == "win32":
        return _("torch.compile's C++/triton toolchain is not set up on Windows")
    if device.type == "mps":
        return _("torch.compile on MPS is experimental")
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++")
                                        if c):
        return _("no C++ compiler on PATH (inductor compiles C++ for the CPU)")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return _("triton is not installed")
    if moe:
        return _("mixture-of-experts routing has data-dependent shapes")
    if activation_checkpointing:
        return _("--activation-checkpointing recomputes blocks outside the compiled graph")
    if objective_class(mode).varying_shapes:
        return _("--mode {mode} batches change shape from step to step").format(mode=mode)
    return None


def compile_pays(device: torch.device, precision: str, steps_left: int,
                 budget_seconds: float | None) -> tuple[bool, str]:
    """Whether a compilation is worth it for the rest of this run, and why, from facts only: the device, the
    precision, the optimizer steps left and the --max-time budget (None: no budget)."""
    if device.type == "cpu" and precision == "bf16":
        return False, _("bf16 steps on the CPU gain too little from compilation to rely on (0.97-1.31x measured)")
    if steps_left < MIN_STEPS:
        return False, _("{steps:,} steps are too few to pay back a compilation (it needs {needed:,} or more)").format(
            steps=steps_left, needed=MIN_STEPS)
    if budget_seconds is not None and budget_seconds < MIN_SECONDS:
        return False, _("a {budget:.0f} s budget is too short to pay back a compilation (it needs {needed:.0f} s or "
                        "more)").format(budget=budget_seconds, needed=MIN_SECONDS)
    if budget_seconds is None:
        return True, _("{steps:,} steps pay back a compilation").format(steps=steps_left)
    return True, _("{steps:,} steps and a {budget:.0f} s budget pay back a compilation").format(
        steps=steps_left, budget=budget_seconds)
