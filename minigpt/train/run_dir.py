"""One run per run directory: a fresh run never trains into another run's checkpoints, weights or plots.

A run directory holds one run's `ckpt/`, `latest`, `final/`, `metrics.jsonl`, `samples.jsonl` and
`tensorboard/` events. A new run (no `--resume`/`--auto-resume`) into a directory that holds them is
refused, naming it, unless `--overwrite` asks to delete them first; the run's `tokenizer/` is kept
(`--retrain-tokenizer` replaces it). `--auto-resume` that finds no checkpoint clears the leftovers of the
attempt that saved none, so plots and metrics never mix two runs.

One process per run directory: the main rank holds an exclusive `flock` on `<run dir>/.run.lock` from
before it writes or sweeps anything until the run ends, so a second run into the same directory (fresh or
`--auto-resume`) is refused by name and never sweeps a live `step_N.tmp`. The kernel drops the lock when
the process dies, however it dies: no stale lock is ever left. Only the main rank locks; the other ranks
write only inside the checkpoint folders the main rank prepares. On NFS (v4, or v3 with lockd) a `flock`
is a lock on the server, seen by every node; a file system without locks (Lustre mounted without
`flock`) is warned about and the run goes on unprotected.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from minigpt.checkpoint import CKPT_DIR, LATEST
from minigpt.config import ConfigError, TrainConfig
from minigpt.i18n import _
from minigpt.monitor import METRICS_FILE, TENSORBOARD_DIR
from minigpt.train.dpo import REFERENCE_FILE
from minigpt.weights import FINAL_DIR

SAMPLES_FILE = "samples.jsonl"
RUN_ARTEFACTS = (CKPT_DIR, LATEST, FINAL_DIR, METRICS_FILE, SAMPLES_FILE, TENSORBOARD_DIR, REFERENCE_FILE)
"""What one run writes into its directory besides the tokenizer, snapshot and dataset statistics (DPO's
cached reference log-probs included: another run's must not be reused)."""


def previous_run_artefacts(run_dir: Path) -> list[Path]:
    """The artefacts of an earlier run in `run_dir` (empty folders do not count)."""
    found = []
    for name in RUN_ARTEFACTS:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(path)
    return found


def check_fresh_run_dir(cfg: TrainConfig) -> list[Path]:
    """For a fresh run: raise `ConfigError` when `cfg.run_dir` holds another run, unless `--overwrite`;
    returns what `--overwrite` is to delete (nothing for a resumed run or an empty directory)."""
    if cfg.checkpointing.resuming:
        return []
    found = previous_run_artefacts(cfg.run_dir)
    if found and not cfg.checkpointing.overwrite:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
        raise ConfigError(_("{path} holds another run ({names}); continue it with --auto-resume, train into another "
                            "directory with --out DIR, or pass --overwrite to delete them and start clean").format(
            path=cfg.run_dir, names=names))
    return found


def remove_artefacts(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


LOCK_FILE = ".run.lock"
UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
"""What `flock` answers on a file system that has no locks."""


class RunDirBusy(ConfigError):
    """Another process holds the run directory's lock."""


class RunDirLock:
    """The main rank's hold on its run directory (see the module docstring); `release()` ends it."""

    def __init__(self, path: Path, fd: int | None, warning: str | None = None,
                 created: list[Path] | None = None):
        self.path, self._fd, self.warning = path, fd, warning
        self.created = created or []
        """The directories `lock_run_dir` made, deepest first."""

    def release(self, tidy: bool = False) -> None:
        """Drop the lock. `tidy` (a run that stopped before writing anything): also remove the lock file and
        the directories taking the lock made, where they are empty, so a refused run leaves nothing behind."""
        if tidy and self._fd is not None:
            self.path.unlink(missing_ok=True)
            for directory in self.created:
                try:
                    directory.rmdir()
                except OSError:  # not empty: something was written after all
                    break
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def lock_run_dir(run_dir: Path) -> RunDirLock:
    """Take `run_dir`'s lock (making the directory), or raise `RunDirBusy` naming the process that has it."""
    created = [parent for parent in [run_dir, *run_dir.parents] if not parent.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in UNSUPPORTED:
            return RunDirLock(path, None, _("{path}: the file system cannot lock {lock} ({error}); nothing stops a "
                                            "second run from writing into this directory").format(
                path=run_dir, lock=LOCK_FILE, error=err.strerror))
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise RunDirBusy(_("{path}: another process ({holder}) is training into this directory; wait for it to end "
                           "or stop it, or train into another directory with --out DIR").format(
            path=run_dir, holder=lock_holder(path))) from None
    os.ftruncate(fd, 0)
    holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.write(fd, holder.encode("utf-8") + b"\n")
    return RunDirLock(path, fd, created=created)


def lock_holder(path: Path) -> str:
    """Who holds the lock, as the holder wrote it into the lock file (it may not have written it yet)."""
    try:
        text = path.read_bytes()[:200].decode("utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or _("pid not yet recorded")
