"""Durable file writes: fsync files and directories, atomic file replacement, staged directories.

Every on-disk artefact (shards, tokenizers, checkpoints, consolidated weights) is written under a
temporary name, flushed with these, then renamed, so a crash never leaves a complete-looking file: one
file with `atomic_write` (and its text/torch forms); a directory of files built in `make_staging_dir`,
each flushed with `fsync_file`, then moved into place with `replace_dir` (`staged_directory` does all
three around the code that fills it). While it is written, a staging directory or temporary file is
held with an `flock`, so `sweep_leftovers` can tell what a dead writer left from what a live one writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from minigpt.i18n import _


def make_staging_dir(parent: str | Path, prefix: str) -> Path:
    """A new, uniquely named directory `parent/prefix<random>` with the permissions of a plain mkdir
    (0777 less the umask).

    For a directory that is renamed into place once complete: `tempfile.mkdtemp` would make it 0700,
    and the published dataset or tokenizer would then be private to its builder.
    """
    for _attempt in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(_("{parent}: no free name for a staging directory {prefix}*").format(
        parent=parent, prefix=prefix))


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (a rename inside it is durable only after this)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | Path) -> None:
    """Flush every file below `directory` and the directories themselves."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace `path` with what `write(handle)` writes, so readers see the old or the new content, never a
    mix, and the new content survives a crash once this returns (file and directory entry fsynced).

    The temporary file is `.<name>.tmp-<random>` beside `path`: unique, so two writers never share it, and
    swept by `minigpt.checkpoint.sweep_temporary` if a crash leaves it behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # in use: not a leftover for sweep_leftovers
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also leave a stray half-written file
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_torch_save(obj: object, path: str | Path) -> None:
    """`atomic_write` of `torch.save(obj)` (torch imported here only, so the data tools need not load it)."""
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle))


def replace_dir(staging: Path, target: Path) -> None:
    """Move a complete `staging` directory to `target` by rename, durably.

    An existing `target` is renamed aside first and removed only after the new one is in place, so a
    crash leaves either the old directory or the new one under `target` (plus a hidden leftover)."""
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.rename(target, old)
    os.rename(staging, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def held(path: str | Path) -> Iterator[None]:
    """An exclusive `flock` on the file or directory `path` for the block: marks it as being written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_directory(target: str | Path, label: str = "tmp") -> Iterator[Path]:
    """Build the directory `target` all at once: yields an empty staging directory beside it
    (`.<name>.<label>-<random>`); when the block ends normally every file in it is fsynced and it replaces
    `target` (`replace_dir`); when the block raises it is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(target.parent, f".{target.name}.{label}-")
    try:
        with held(staging):
            yield staging
            fsync_tree(staging)
            replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}")
"""The names this module gives what it writes beside a target: `.<name>.tmp-<8 hex>` (a file or staging
directory being written) and `.<name>.old-<8 hex>` (a directory `replace_dir` put aside)."""


def in_use(path: Path) -> bool:
    """Whether a live writer holds `path` (see `held`)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def sweep_leftovers(parent: str | Path, name: str | None = None) -> list[Path]:
    """Clear what interrupted writes left in `parent` (of `name` only, when given), by `LEFTOVER`'s names
    alone, so no file of the user's is touched: a temporary file or staging directory no live writer holds
    is removed; a put-aside `.old-` directory is removed once its target exists, and renamed back to the
    target when it does not (a crash between `replace_dir`'s two renames left it as the only copy).
    Returns what was removed or put back."""
    parent = Path(parent)
    swept = []
    for path in sorted(parent.iterdir()) if parent.is_dir() else []:
        match = LEFTOVER.fullmatch(path.name)
        if match is None or name not in (None, match["name"]) or in_use(path):
            continue
        target = parent / match["name"]
        if match["kind"] == "old" and not target.exists():
            os.rename(path, target)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        swept.append(path)
    return swept
