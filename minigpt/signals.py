"""Graceful stop on SIGINT / SIGTERM / SIGUSR1: set a flag, let the loop save at a step boundary.

The handler only records the request; the loop asks `requested` at each step boundary and the ranks
agree on it with an all-reduce, so every rank saves the same step. A second SIGINT exits at once, unless
a checkpoint is being written: then the process exits as soon as that checkpoint is complete.

Two things that stop a run besides a signal it receives:
- under the `deepspeed` launcher, the launcher processes going away (the runner killed by SIGTERM or
  SIGINT does not pass the signal on): `watch_launcher` requests the same stop;
- a terminal whose reader went away (`train.py | tee log` and Ctrl-C, which stops `tee` too): output that
  can no longer be written goes to /dev/null (`tolerate_lost_output`), so the save still happens.

Exit codes of `launch/train.py`:
  0   finished (final checkpoint and consolidated weights written)
  75  stopped by a signal (or its launcher's exit) after saving a checkpoint; rerun with --auto-resume
      (EX_TEMPFAIL)
  130 second SIGINT before a checkpoint was being written: exited at once without saving
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import psutil

from minigpt.i18n import _

EXIT_FINISHED = 0
EXIT_PREEMPTED = 75
EXIT_ABORTED = 130

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s)


def say(message: str) -> None:
    """A notice on stderr that never raises: the terminal may be gone, or the signal may have interrupted
    another write to stderr (a reentrant write raises RuntimeError)."""
    try:
        sys.stderr.write(f"\n[minigpt] {message}\n")
        sys.stderr.flush()
    except (OSError, RuntimeError, ValueError):
        pass


class StopRequest:
    """Records the first stop request; restores the previous handlers on `uninstall()`."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        """What asked the run to stop: a signal's name, or another reason (the launcher exited)."""
        self._previous: dict[int, Any] = {}
        self._saving = False
        self._exit_after_save = False
        self.checks: list[Callable[[], str | None]] = []
        """Conditions a watcher polls (the launcher's exit), asked again by `reason_now`."""

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

    def request(self, reason: str, event: str) -> None:
        """Ask the run to save at the next step boundary and exit 75, saying that `event` happened; only the
        first request counts. `reason` is what `signal_name` keeps (a signal's name)."""
        if self.requested:
            return
        self.signal_name = reason
        say(_("{event}: saving a checkpoint at the next step boundary, then exiting with code {code} (resume "
              "with --auto-resume)").format(event=event, code=EXIT_PREEMPTED))

    def reason_now(self) -> str | None:
        """What a registered check finds at this moment: when another rank stopped first, this rank's own
        watcher may not have polled yet, but the reason is the same."""
        return next((found for check in self.checks if (found := check())), None)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """A checkpoint being written: a second SIGINT inside waits for it, then the process exits (75)."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
        if self._exit_after_save:
            say(_("checkpoint complete; exiting now (code {code})").format(code=EXIT_PREEMPTED))
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                sys.stdout.flush()
            os._exit(EXIT_PREEMPTED)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            if self._saving:
                self._exit_after_save = True
                say(_("second SIGINT: a checkpoint is being written; exiting as soon as it is complete"))
                return
            say(_("second SIGINT: exiting now without saving (code {code})").format(code=EXIT_ABORTED))
            os._exit(EXIT_ABORTED)
        name = signal.Signals(signum).name
        self.request(name, _("{signal} received").format(signal=name))


class LostOutputTolerant:
    """stdout or stderr whose reader may go away (a pipe to `tee` that Ctrl-C stopped too, a closed terminal).

    The first write or flush that fails points the file descriptor at /dev/null and is repeated there, so
    later writes (ours, a library's, the interpreter's last flush) succeed and a run being stopped still
    saves. Everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._to_devnull()
            return self._stream.write(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._to_devnull()
            self._stream.flush()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def tolerate_lost_output() -> None:
    """Make sys.stdout and sys.stderr `LostOutputTolerant` (once) and writes to a closed pipe an error, not a
    SIGPIPE death (Python's default, made sure of)."""
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, LostOutputTolerant):
            setattr(sys, name, LostOutputTolerant(stream))


def _is_deepspeed_process(process: psutil.Process, module: str) -> bool:
    """True when `process` runs DeepSpeed's `module` ("launch" or "runner"; the runner also as the `deepspeed`
    script)."""
    try:
        args = process.cmdline()
    except psutil.Error:
        return False
    script = "deepspeed" if module == "runner" else None
    return any(arg == f"deepspeed.launcher.{module}" or arg.endswith(f"deepspeed/launcher/{module}.py")
               or (script is not None and os.path.basename(arg) == script) for arg in args[:4])


def launcher_chain() -> list[psutil.Process]:
    """This rank's parent when it is DeepSpeed's per-node launcher (`deepspeed.launcher.launch`), then that
    launcher's parent when it is the `deepspeed` runner; [] outside DeepSpeed's launcher."""
    try:
        parent = psutil.Process().parent()
        if parent is None or not _is_deepspeed_process(parent, "launch"):
            return []
        runner = parent.parent()
    except psutil.Error:
        return []
    return [parent, runner] if runner is not None and _is_deepspeed_process(runner, "runner") else [parent]


def launcher_gone(chain: list[psutil.Process]) -> bool:
    """True once a process of `chain` has exited: a process whose parent exits is handed to another parent,
    so it is enough that each link still has its parent (the top one is watched by its child)."""
    try:
        return os.getppid() != chain[0].pid or any(chain[i].ppid() != chain[i + 1].pid
                                                   for i in range(len(chain) - 1))
    except psutil.Error:
        return True


def watch_launcher(stop: StopRequest, interval: float = 0.5) -> threading.Thread | None:
    """Under the `deepspeed` launcher, request a stop when a launcher process exits.

    DeepSpeed's runner passes no signal to its ranks (its per-node launcher does, as SIGTERM), so
    `kill RUNNER` or a SIGINT to the runner alone would leave the ranks training without a launcher; they
    notice here within `interval` seconds, agree, save the same step and exit 75. None outside the launcher."""
    chain = launcher_chain()
    if not chain:
        return None

    def gone() -> str | None:
        return _("deepspeed launcher exited") if launcher_gone(chain) else None

    def watch() -> None:
        while not stop.requested:
            if gone():
                stop.request(_("deepspeed launcher exited"),
                             _("the deepspeed launcher (pid {pid}) exited").format(pid=chain[-1].pid))
                return
            time.sleep(interval)

    stop.checks.append(gone)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
