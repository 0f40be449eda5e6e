"""--max-time: a wall-clock budget for a run, counted across resumes.

The loop asks `TimeBudget` after every step whether another step still fits: the time spent so far plus
what the rest costs — one more step, the final evaluation and sample, the final checkpoint and the
consolidated weights, each from this run's own measurements with a safety margin — must stay inside the
budget. All ranks decide on numbers they agreed on (the loop all-reduces them with the stop flag), so they
stop at the same step. The share of the budget used drives the LR decay (`minigpt.engine.base.ScheduleClock`).

What is measured, and when:
- a step: the median of the recent steps after the process's first. That first step (allocations, kernel
  selection, compilation, the optimizer's state) can take many times as long as the rest, so it stands
  for a step only while it is the only one measured, and then without the margin: the run goes on to a
  second step when one more step as slow and the ending still fit, so a run whose steps are all that
  slow ends in time too;
- the final evaluation: after the process's first step, before deciding on a second, the loop times one
  validation micro-batch (all of them when the evaluation has at most `WHOLE_EVAL_TIMED`) and the sample
  at full length, `ENDING_PASSES` times back to back (`Trainer.time_ending`); the evaluation counts as
  the fastest per-batch time times the batches it runs, plus the fastest sample. A periodic evaluation
  (--eval-interval) is timed whole (--eval-task included) and replaces that;
- saving: each checkpoint's write is timed; until the first, it is estimated from the state's size.

Time counts from the start of the process (`launch/train.py`: interpreter start-up and imports included;
a `Trainer` built in-process counts from its construction) plus the time the checkpoint being resumed had
already spent.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

MARGIN = 1.25
"""Estimates of the remaining work are multiplied by this: a loaded machine is slower than it measured."""
RECENT_STEPS = 9
"""Steps whose median is the step estimate: recent enough to follow a change of speed (a compiled model),
enough of them that one slow step (a garbage collection, a data stall) does not move it."""
WHOLE_EVAL_TIMED = 3
"""An evaluation of at most this many micro-batches is timed whole; a longer one by its first micro-batch."""
ENDING_PASSES = 2
"""Timing passes over the ending: the fastest counts, so a pass slowed by warming up (the first forward pass
in eval mode, the first generation's kernels) or by a busy moment does not end a run early."""


class TimeBudget:
    """How much of `seconds` is spent and whether the next step still fits."""

    def __init__(self, seconds: float, *, eval_batches: int, grad_accum: int, state_bytes: int,
                 origin: float | None = None, clock=time.monotonic):
        """`eval_batches`: the validation micro-batches each rank's evaluation runs; `origin`: the `clock()`
        reading at which this run's time starts (default: now)."""
        self.seconds = seconds
        self.spent_before = 0.0
        self._clock = clock
        self._origin = clock() if origin is None else origin
        self._eval_batches, self._grad_accum = eval_batches, grad_accum
        self._state_bytes = state_bytes
        self.warmup_step_seconds: float | None = None
        """The process's first step, kept out of the estimate once a later step is measured."""
        self._recent_steps: deque[float] = deque(maxlen=RECENT_STEPS)
        self.ending_passes = 0
        self.eval_batch_seconds: float | None = None
        self.sample_seconds: float | None = None
        self.eval_seconds: float | None = None
        self.save_seconds: float | None = None

    def resume(self, saved: tuple[float, float | None] | None, clock, past_warmup: bool) -> None:
        """Continue a resumed run's budget (`TrainerState.budget`): the seconds it had spent, and where its LR
        warmup ended on the `ScheduleClock` `clock`. A checkpoint saved without --max-time spent none of this
        budget; past its warmup, the decay runs over the whole budget."""
        if saved is None:
            if past_warmup:
                clock.warmup_end = 0.0
            return
        self.spent_before, clock.warmup_end = saved

    def elapsed(self) -> float:
        """Seconds spent by this run and the runs it resumed."""
        return self.spent_before + self._clock() - self._origin

    def note_step(self, seconds: float) -> None:
        """Record one step's time; the process's first is its warm-up."""
        if self.warmup_step_seconds is None:
            self.warmup_step_seconds = seconds
        else:
            self._recent_steps.append(seconds)

    @property
    def step_seconds(self) -> float | None:
        """What the next step is expected to take: the median of the recent steps after the warm-up, or the
        warm-up step while it is the only one (None before any)."""
        if self._recent_steps:
            return statistics.median(self._recent_steps)
        return self.warmup_step_seconds

    @property
    def ending_pass_due(self) -> bool:
        """Whether the ending wants another timing pass: until `ENDING_PASSES` have run, unless a periodic
        evaluation was timed whole."""
        return self.eval_seconds is None and self.ending_passes < ENDING_PASSES

    def note_ending_pass(self, eval_batches: int, eval_seconds: float, sample_seconds: float) -> None:
        """Record a timing pass: `eval_batches` validation micro-batches took `eval_seconds`, the sample
        `sample_seconds`; the fastest pass counts."""
        per_batch = eval_seconds / max(1, eval_batches)
        self.ending_passes += 1
        if self.eval_batch_seconds is not None:  # both are set together: the fastest of each counts
            per_batch = min(per_batch, self.eval_batch_seconds)
            sample_seconds = min(sample_seconds, self.sample_seconds)
        self.eval_batch_seconds, self.sample_seconds = per_batch, sample_seconds

    def note_eval(self, seconds: float) -> None:
        """Record a whole periodic evaluation with its sample (and --eval-task)."""
        self.eval_seconds = seconds

    def note_save(self, seconds: float) -> None:
        self.save_seconds = seconds

    def evaluation_estimate(self) -> float:
        """Seconds the final evaluation and sample take: a periodic evaluation's time once one ran, else the
        timed micro-batch times the batches the evaluation runs plus the timed sample, else (before the
        first timing pass) extrapolated from a step."""
        if self.eval_seconds is not None:
            return self.eval_seconds
        if self.eval_batch_seconds is not None:
            return self.eval_batch_seconds * self._eval_batches + self.sample_seconds
        step = self.step_seconds or 0.0
        # An evaluation micro-batch is a forward pass: about a third of a training micro-batch.
        return step / max(1, self._grad_accum) * self._eval_batches / 2 + step

    def reserve(self) -> float:
        """Seconds to keep for one more step and the run's ending (evaluation + sample, checkpoint,
        consolidation): measured where this run has done them, estimated where it has not."""
        # Weights and two AdamW moments, written at a conservative 100 MB/s, twice (checkpoint, final/).
        save = self.save_seconds if self.save_seconds is not None else 0.5 + self._state_bytes / 100e6
        ending = MARGIN * (self.evaluation_estimate() + 2 * save)
        if self._recent_steps:
            return MARGIN * self.step_seconds + ending
        # Only the warm-up step measured: it over-states a step already, so it counts without the margin.
        return (self.warmup_step_seconds or 0.0) + ending

    def fraction(self, elapsed: float, reserve: float) -> float:
        """Share of the usable budget (less what the ending needs) spent at `elapsed` seconds."""
        usable = max(self.seconds - reserve, 1e-9)
        return min(1.0, elapsed / usable)

    def fits(self, elapsed: float, reserve: float) -> bool:
        """Whether another step and the ending fit in the budget, given agreed `elapsed` and `reserve`."""
        return elapsed + reserve < self.seconds
