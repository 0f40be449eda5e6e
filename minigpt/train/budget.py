"""--max-time: a wall-clock budget for a run, counted across resumes.

The loop asks `TimeBudget` after every step whether another step still fits: the time spent so far plus
what the rest costs — one more step, the final evaluation and sample, the final checkpoint and the
consolidated weights, each estimated from this run's own measurements with a safety margin — must stay
inside the budget. All ranks decide on numbers they agreed on (the loop all-reduces them with the stop
flag), so they stop at the same step. The share of the budget used drives the LR decay
(`minigpt.engine.base.ScheduleClock`).

Time counts from the start of the process (`launch/train.py`: interpreter start-up and imports included;
a `Trainer` built in-process counts from its construction) plus the time the checkpoint being resumed had
already spent.
"""

from __future__ import annotations

import time

MARGIN = 1.25
"""Estimates of the remaining work are multiplied by this: a loaded machine is slower than it measured."""
EMA = 0.2
"""Weight of the newest step time in the moving average of step times."""


class TimeBudget:
    """How much of `seconds` is spent and whether the next step still fits."""

    def __init__(self, seconds: float, *, eval_batches: int, grad_accum: int, state_bytes: int,
                 origin: float | None = None, clock=time.monotonic):
        """`origin`: the `clock()` reading at which this run's time starts (default: now)."""
        self.seconds = seconds
        self.spent_before = 0.0
        self._clock = clock
        self._origin = clock() if origin is None else origin
        self._eval_batches, self._grad_accum = eval_batches, grad_accum
        self._state_bytes = state_bytes
        self.step_seconds: float | None = None
        self._steps_noted = 0
        self.eval_seconds: float | None = None
        self.save_seconds: float | None = None

    def elapsed(self) -> float:
        """Seconds spent by this run and the runs it resumed."""
        return self.spent_before + self._clock() - self._origin

    def note_step(self, seconds: float) -> None:
        """Add one step's time to the moving average. The process's first step (allocations, kernel
        selection, compilation) is a guess only until the second one replaces it."""
        self._steps_noted += 1
        if self.step_seconds is None or self._steps_noted == 2:
            self.step_seconds = seconds
        else:
            self.step_seconds = (1 - EMA) * self.step_seconds + EMA * seconds

    def note_eval(self, seconds: float) -> None:
        self.eval_seconds = seconds

    def note_save(self, seconds: float) -> None:
        self.save_seconds = seconds

    def reserve(self) -> float:
        """Seconds to keep for one more step and the run's ending (evaluation + sample, checkpoint,
        consolidation): measured where this run has done them, estimated where it has not."""
        step = self.step_seconds or 0.0
        # An evaluation micro-batch is a forward pass: about a third of a training micro-batch.
        evaluate = self.eval_seconds if self.eval_seconds is not None else \
            step / max(1, self._grad_accum) * self._eval_batches / 2 + step
        # Weights and two AdamW moments, written at a conservative 100 MB/s, twice (checkpoint, final/).
        save = self.save_seconds if self.save_seconds is not None else 0.5 + self._state_bytes / 100e6
        return MARGIN * (step + evaluate + 2 * save)

    def fraction(self, elapsed: float, reserve: float) -> float:
        """Share of the usable budget (less what the ending needs) spent at `elapsed` seconds."""
        usable = max(self.seconds - reserve, 1e-9)
        return min(1.0, elapsed / usable)

    def fits(self, elapsed: float, reserve: float) -> bool:
        """Whether another step and the ending fit in the budget, given agreed `elapsed` and `reserve`."""
        return elapsed + reserve < self.seconds
