"""`--compile auto`: use torch.compile where it works and pays, decided by measuring this run's own steps.

Compilation costs tens of seconds up front and pays back a fraction of every later step, a fraction that
depends on the model's shape, the precision and the machine (large on tiny models whose steps are
dominated by per-op overhead, nothing on models whose steps are all matmuls). So the run measures instead
of guessing:

1. Skipped at once where it cannot work or cannot pay: not the plain engine, MPS, a CPU without a C++
   compiler (inductor generates C++), CUDA without triton, Windows, mixture-of-experts layers (routing
   has data-dependent shapes), activation checkpointing, modes whose batch shapes vary (dpo, reward, rlhf).
2. Eager steps are timed (`MEASURE` of them after the first). If the rest of the run at that speed is
   shorter than `PAYBACK_SECONDS`, a compilation could not pay for itself: eager it stays.
3. Otherwise the next step compiles (its time, the compile time, is reported and kept out of the
   --max-time step estimate), `MEASURE` compiled steps are timed, and the compiled model is kept only if
   its median step is at least `MIN_GAIN` faster than the eager median.

The decision is saved in each checkpoint (`compiled` in trainer_state.json) and a resumed run follows it
without a new trial, so it continues on the same kind of step. `--compile on` compiles from the first step,
`--compile off` never does. Compiled and eager steps agree to float rounding, not bitwise: a run resumed
from a checkpoint taken before the decision decides again for itself and may differ in the last bits from an
uninterrupted one (use `on` or `off` where bitwise equality matters).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import sys
from collections.abc import Callable

import torch

MEASURE = 5
"""Steps timed on each side of the comparison (after the first eager step, which warms up)."""
PAYBACK_SECONDS = 300.0
"""A compilation (~20-60 s on a CPU) is tried only when the rest of the run would take this long eager."""
MIN_GAIN = 0.05
"""The compiled median step must be this much faster than the eager one to be kept."""
VARYING_SHAPE_MODES = ("dpo", "reward", "rlhf")


def compile_unavailable(device: torch.device, *, plain_engine: bool, moe: bool, activation_checkpointing: bool,
                        mode: str) -> str | None:
    """Why torch.compile cannot work or is not used for this run (None: it can be tried)."""
    if not plain_engine:
        return "the DeepSpeed engine runs eager"
    if sys.platform == "win32":
        return "torch.compile's C++/triton toolchain is not set up on Windows"
    if device.type == "mps":
        return "torch.compile on MPS is experimental"
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++")
                                        if c):
        return "no C++ compiler on PATH (inductor compiles C++ for the CPU)"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if moe:
        return "mixture-of-experts routing has data-dependent shapes"
    if activation_checkpointing:
        return "--activation-checkpointing recomputes blocks outside the compiled graph"
    if mode in VARYING_SHAPE_MODES:
        return f"--mode {mode} batches change shape from step to step"
    return None


class CompileTrial:
    """Drives `--compile auto` from the training loop: call `after_step` after each optimizer step."""

    def __init__(self, set_compiled: Callable[[bool], None], report: Callable[[str], None]):
        self._set_compiled, self._report = set_compiled, report
        self.phase = "eager"
        """eager (timing eager steps) -> compiling (the next step compiles) -> compiled (timing) -> decided"""
        self.eager: list[float] = []
        self.compiled: list[float] = []
        self.compile_seconds: float | None = None
        self.kept: bool | None = None
        self._warmed_up = False

    def after_step(self, seconds: float, steps_left: int, seconds_left: float | None = None) -> bool:
        """Note a finished step's time and switch the engine when the trial calls for it. Returns True when
        this step included the compilation (an outlier the --max-time step estimate must not see)."""
        if self.phase == "eager":
            if not self._warmed_up:  # the first step warms up (allocations, kernel choice)
                self._warmed_up = True
            else:
                self.eager.append(seconds)
            if len(self.eager) == MEASURE:
                eager = statistics.median(self.eager)
                rest = eager * steps_left if seconds_left is None else min(eager * steps_left, seconds_left)
                if rest < PAYBACK_SECONDS:
                    self._decide(False, f"the rest of the run ({rest:.0f} s eager) is too short to pay back a "
                                        "compilation: eager")
                else:
                    self._set_compiled(True)
                    self.phase = "compiling"
            return False
        if self.phase == "compiling":
            self.compile_seconds, self.phase = seconds, "compiled"
            return True
        if self.phase == "compiled":
            self.compiled.append(seconds)
            if len(self.compiled) == MEASURE:
                eager, compiled = statistics.median(self.eager), statistics.median(self.compiled)
                keep = compiled <= (1 - MIN_GAIN) * eager
                self._decide(keep, f"compiled in {self.compile_seconds:.1f} s; median step {eager * 1e3:.1f} ms "
                                   f"eager, {compiled * 1e3:.1f} ms compiled ({eager / compiled:.2f}x): "
                                   + ("compiled from here on" if keep else "not enough faster, eager again"))
        return False

    def _decide(self, keep: bool, why: str) -> None:
        self.kept, self.phase = keep, "decided"
        if not keep and self.compile_seconds is not None:
            self._set_compiled(False)
        self._report(f"--compile auto: {why}")
