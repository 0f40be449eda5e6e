"""Graceful stop on SIGINT / SIGTERM / SIGUSR1: set a flag, let the loop save at a step boundary.

The handler only records the request; the loop asks `requested` at each step boundary and the ranks
agree on it with an all-reduce, so every rank saves the same step. A second SIGINT exits at once.

Exit codes of `launch/train.py`:
  0   finished (final checkpoint and consolidated weights written)
  75  stopped by a signal after saving a checkpoint; rerun with --auto-resume (EX_TEMPFAIL)
  130 second SIGINT: exited at once without saving
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_FINISHED = 0
EXIT_PREEMPTED = 75
EXIT_ABORTED = 130

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s)


class StopRequest:
    """Records the first stop signal; restores the previous handlers on `uninstall()`."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            sys.stderr.write(f"\n[minigpt] second SIGINT: exiting now without saving (code {EXIT_ABORTED})\n")
            sys.stderr.flush()
            os._exit(EXIT_ABORTED)
        if not self.requested:
            self.signal_name = name
            sys.stderr.write(f"\n[minigpt] {name} received: saving a checkpoint at the next step boundary, "
                             f"then exiting with code {EXIT_PREEMPTED} (resume with --auto-resume)\n")
            sys.stderr.flush()
