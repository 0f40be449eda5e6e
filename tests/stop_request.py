"""A stop request for in-process training tests: it arrives while the loop finishes a given step."""

from __future__ import annotations

import contextlib


class StopAtStep:
    """A stop request that arrives while the loop finishes step `at` (as a signal would)."""

    signal_name = "SIGTERM"

    def __init__(self, trainer, at: int):
        self.trainer, self.at = trainer, at

    @property
    def requested(self) -> bool:
        return self.trainer.step >= self.at

    def saving(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def uninstall(self) -> None:
        pass
