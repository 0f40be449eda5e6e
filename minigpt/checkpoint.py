"""Training checkpoints: atomic, verified, never trusted blindly, never lost to a damaged newer one.

Layout of a run directory:
    ckpt/step_0000100/      engine-native state (DeepSpeed checkpoint files or the plain engine's
                            engine.pt), trainer_state.json (step, save index, tokens seen, sampler
                            position), rng_rank<r>.json for each rank, and manifest.json: the size and
                            SHA-256 of every other file and the checkpoint's format version
                            (FORMAT_VERSION), written last
    latest                  name of the newest complete checkpoint (a hint for people and tools)
A checkpoint is written to `step_N.tmp/`, flushed to disk, then renamed; `latest` changes only after
the rename. A crash or a full disk mid-write leaves at most a `.tmp` directory, removed by the failed
save itself or swept at the next start, and `latest` still names the previous complete checkpoint.

Checkpoints are ordered by save index, then step (`save_order_key`), never by a clock. Resuming picks
the newest that verifies, and verifies before it parses: the manifest (size-capped, strict JSON, typed
entries), every file's size, the trainer state's SHA-256, then the trainer state field by field, then
the other files' digests. Newer damaged ones are skipped with the reason; a checkpoint of another format
version (or without a manifest) is refused by name. Every torch file is loaded weights-only
(`minigpt.safe_load`), so a checkpoint is data, never code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt import strict_json
from minigpt.engine.base import Engine
from minigpt.fsutil import atomic_write_text, fsync_dir, fsync_tree, sweep_leftovers
from minigpt.i18n import _
from minigpt.safe_load import UnsafeFileError

CKPT_DIR = "ckpt"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
"""The checkpoint layout this MiniGPT writes and reads, recorded in each checkpoint's manifest."""
STEP_NAME = re.compile(r"step_(\d+)")
TMP_SUFFIX = ".tmp"
CHOICE_BYTES = 1 << 16
MANIFEST_BYTES = 4 << 20
STATE_BYTES = 1 << 20
RNG_BYTES = 4 << 20
LATEST_BYTES = 4096
"""Caps on what is read of a checkpoint's JSON files: far above what a save writes, far below memory."""
MAX_COUNT = 1 << 62
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
PRECISIONS = ("fp32", "bf16", "fp16")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, unsafe or does not fit this run."""


# --- RNG state as JSON: no pickle, readable by anyone ---------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as JSON-able data."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((npy["kind"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]] if state.get("cuda") else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.json"


def read_rng_file(checkpoint: Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG state in `checkpoint`'s `rng_rank<rank>.json`, None if it has none (a run saved on fewer
    ranks has none for the others); a file of the wrong shape is a `CheckpointError` naming it. The state is
    checked by setting it, then the RNG is put back as it was."""
    path = checkpoint / rng_file(rank)
    if not path.is_file():
        return None
    current = rng_state()
    try:
        state = strict_json.read_json(path, RNG_BYTES)
        set_rng_state(state)
    except strict_json.JSONFileError as err:
        raise CheckpointError(str(err)) from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RuntimeError) as err:
        raise CheckpointError(_("{path}: damaged RNG state ({kind}: {error})").format(
            path=path, kind=type(err).__name__, error=str(err)[:120])) from None
    finally:
        set_rng_state(current)
    return state


# --- manifest and verification ----------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(directory: Path) -> list[str]:
    """Every file below `directory` except the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """Record the size and SHA-256 of every file of a checkpoint being written (the main rank, last)."""
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
             for name in checkpoint_files(directory)}
    manifest = {"format_version": FORMAT_VERSION, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def read_manifest(checkpoint: Path) -> dict[str, tuple[int, str]]:
    """The manifest's {relative file name: (bytes, sha256)}, each entry checked for type and form; a
    checkpoint without one, or of another format version, is refused by name."""
    path = checkpoint / MANIFEST
    if not path.is_file():
        raise CheckpointError(_("{path}: missing, so the checkpoint has no format version; this MiniGPT reads "
                                "checkpoint format version {version}").format(path=path, version=FORMAT_VERSION))
    try:
        manifest = strict_json.read_json(path, MANIFEST_BYTES)
    except strict_json.JSONFileError as err:
        raise CheckpointError(str(err)) from None
    if isinstance(manifest, dict) and manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(_("{path}: checkpoint format version {found!r}; this MiniGPT reads version "
                                "{version}").format(path=path, found=manifest.get("format_version"),
                                                    version=FORMAT_VERSION))
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(_("{path}: damaged manifest (expected an object of files)").format(path=path))
    expected = {}
    for name, entry in files.items():
        parts = name.split("/")
        if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise CheckpointError(_("{path}: damaged manifest (file name {name!r} is not inside the folder)").format(
                path=path, name=name[:80]))
        size, digest = (entry.get("bytes"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if not _is_count(size) or not (isinstance(digest, str) and SHA256_HEX.fullmatch(digest)):
            raise CheckpointError(_("{path}: damaged manifest (entry {name!r} needs an integer 'bytes' and a "
                                    "64-digit hex 'sha256')").format(path=path, name=name[:80]))
        expected[name] = (size, digest)
    return expected


def check_listing(checkpoint: Path, expected: dict[str, tuple[int, str]]) -> None:
    """Every listed file present with its size, no unlisted file: stat calls only, before any hashing."""
    for name in sorted(set(checkpoint_files(checkpoint)) - set(expected)):
        raise CheckpointError(_("{path}: not in {manifest} (added after the checkpoint was saved)").format(
            path=checkpoint / name, manifest=MANIFEST))
    for name, (size, _digest) in expected.items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(_("{path}: missing (listed in {manifest})").format(path=path, manifest=MANIFEST))
        if path.stat().st_size != size:
            raise CheckpointError(_("{path}: {size} bytes, {manifest} says {expected} (truncated?)").format(
                path=path, size=path.stat().st_size, manifest=MANIFEST, expected=size))


def check_digest(path: Path, digest: str) -> None:
    if sha256_of(path) != digest:
        raise CheckpointError(_("{path}: SHA-256 differs from {manifest} (damaged or replaced)").format(
            path=path, manifest=MANIFEST))


def _non_negative_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf


STATE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "step": (_is_count, "a non-negative integer"),
    "save_index": (_is_count, "a non-negative integer"),
    "tokens_seen": (_is_count, "a non-negative integer"),
    "sampler": (lambda v: isinstance(v, dict), "an object"),
    "max_steps": (_is_count, "a non-negative integer"),
    "warmup_steps": (_is_count, "a non-negative integer"),
    "world_size": (lambda v: _is_count(v) and v > 0, "a positive integer"),
    "precision": (lambda v: v in PRECISIONS, "one of {choices}"),
    "elapsed_seconds": (_non_negative_number, "a non-negative number"),
    "lr_warmup_end": (lambda v: v is None or _non_negative_number(v), "a non-negative number or null"),
    "saved_at": (_non_negative_number, "a non-negative number"),
    "compiled": (lambda v: isinstance(v, bool), "true or false"),
    "tokenizer_checksum": (lambda v: v is None or isinstance(v, str), "a string or null"),
    **{name: (lambda v: isinstance(v, str), "a string") for name in ("mode", "weights_from", "engine")},
}
"""The trainer state's fields, each with its check and what the check wants (unknown fields pass; the wants are
messages, translated where they are said)."""


@dataclass
class TrainerState:
    """Everything a checkpoint holds of a training run besides the engine's files: the trainer's counters, the
    sampler, the clocks and this rank's RNG. `Trainer.state_dict()` makes one and `Trainer.load_state_dict()`
    applies one; `CheckpointManager` stores it, `to_json()` as `trainer_state.json` (fields checked by
    `STATE_FIELDS`) and `rng` as `rng_rank<N>.json` on each rank, and reads it back the same way."""

    step: int
    tokens_seen: int
    sampler: dict[str, Any]
    """The sampler's own state (`ResumableSampler.state_dict`)."""
    mode: str
    weights_from: str
    precision: str
    max_steps: int
    warmup_steps: int
    tokenizer_checksum: str | None = None
    budget: tuple[float, float | None] | None = None
    """With --max-time: (seconds spent before this save, the step at which the LR warmup ended or None while
    warming up). None without a budget."""
    compiled: bool | None = None
    """Whether --compile auto chose compilation (a resumed run follows it); None before it decided."""
    rng: dict[str, Any] | None = None
    """This rank's Python, numpy and torch RNG states (`rng_state()`); None where the checkpoint has no file for
    this rank (it was saved on fewer ranks)."""
    checkpoint: str = ""
    """The checkpoint directory this state was read from ("" for one being saved)."""

    def to_json(self) -> dict[str, Any]:
        """The fields of `trainer_state.json` that are the run's (`CheckpointManager.save` adds `step`, `save_index`,
        the world size, the engine and the time; the RNG goes to each rank's own file)."""
        state = {"tokens_seen": self.tokens_seen, "sampler": self.sampler, "tokenizer_checksum": self.tokenizer_checksum,
                 "mode": self.mode, "weights_from": self.weights_from, "max_steps": self.max_steps,
                 "warmup_steps": self.warmup_steps, "precision": self.precision}
        if self.budget is not None:
            state["elapsed_seconds"], state["lr_warmup_end"] = self.budget
        if self.compiled is not None:
            state["compiled"] = self.compiled
        return state

    @classmethod
    def from_json(cls, state: dict[str, Any], checkpoint: str | Path, rng: dict[str, Any] | None = None) -> TrainerState:
        """The state `check_trainer_state` passed, as saved by a training run, with this rank's `rng`: a
        CheckpointError names the file and the field a run needs that it lacks."""
        for name in ("tokens_seen", "sampler"):
            if name not in state:
                raise CheckpointError(_("{path}: no '{name}' field; not a checkpoint of a training run").format(
                    path=Path(checkpoint) / TRAINER_STATE, name=name))
        budget = ((float(state["elapsed_seconds"]), state.get("lr_warmup_end")) if "elapsed_seconds" in state
                  else None)
        return cls(step=state["step"], tokens_seen=state["tokens_seen"], sampler=state["sampler"],
                   mode=state.get("mode", ""), weights_from=state.get("weights_from", ""),
                   precision=state.get("precision", ""), max_steps=state.get("max_steps"),
                   warmup_steps=state.get("warmup_steps"), tokenizer_checksum=state.get("tokenizer_checksum"),
                   budget=budget, compiled=state.get("compiled"), rng=rng, checkpoint=str(checkpoint))


def check_trainer_state(state: Any, path: Path) -> dict[str, Any]:
    """`state` if every known field has its type and range (`step` and `save_index` required), else a
    `CheckpointError` naming the file and the first field that does not."""
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(_("{path}: no integer 'step' field").format(path=path))
    if "save_index" not in state:
        raise CheckpointError(_("{path}: no '{name}' field; not a checkpoint of a training run").format(
            path=path, name="save_index"))
    for name, (valid, wanted) in STATE_FIELDS.items():
        if name in state and not valid(state[name]):
            raise CheckpointError(_("{path}: {name} must be {wanted}, got {value!r}").format(
                path=path, name=name, wanted=_(wanted).format(choices=list(PRECISIONS)), value=str(state[name])[:40]))
    return state


def read_candidate(checkpoint: Path) -> tuple[dict[str, Any], dict[str, tuple[int, str]]]:
    """The trainer state of `checkpoint` and its manifest, read without trusting either: the manifest is
    checked for version and form, every file's size against it, and the trainer state's SHA-256 before the
    state is parsed; the state is then checked field by field."""
    if not checkpoint.is_dir():
        raise CheckpointError(_("{path}: not a directory").format(path=checkpoint))
    state_path = checkpoint / TRAINER_STATE
    manifest = read_manifest(checkpoint)
    check_listing(checkpoint, manifest)
    if TRAINER_STATE in manifest:
        check_digest(state_path, manifest[TRAINER_STATE][1])
    if not state_path.is_file():
        raise CheckpointError(_("{path}: missing (the checkpoint is incomplete)").format(path=state_path))
    try:
        state = check_trainer_state(strict_json.read_json(state_path, STATE_BYTES), state_path)
    except strict_json.JSONFileError as err:
        raise CheckpointError(str(err)) from None
    match = STEP_NAME.fullmatch(checkpoint.name)
    if match and int(match.group(1)) != state["step"]:
        raise CheckpointError(_("{path}: step {step} in a folder named {folder}").format(
            path=state_path, step=state["step"], folder=checkpoint.name))
    return state, manifest


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The checked trainer state of `checkpoint` (its other files' digests not computed)."""
    return read_candidate(checkpoint)[0]


def verify_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """Check that `checkpoint` is complete and undamaged; return its trainer state.

    Its manifest must be of this format version, every listed file must exist with its size and SHA-256,
    and no unlisted file may be present."""
    state, manifest = read_candidate(checkpoint)
    for name, (_size, digest) in manifest.items():
        if name != TRAINER_STATE:
            check_digest(checkpoint / name, digest)
    return state


# --- choosing a checkpoint --------------------------------------------------------------------------------

def complete_checkpoints(root: Path) -> list[Path]:
    """Folders `step_N` in `root` (finished writes; `.tmp` folders are never candidates)."""
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and STEP_NAME.fullmatch(p.name)]


def save_order_key(state: dict[str, Any]) -> tuple[int, int]:
    """Where a checkpoint stands in save order: its save index (one more than the highest in its run
    directory when it was written, so it survives resumes and rollbacks), then its step. Never a clock: a
    node whose clock is an hour off must not make new checkpoints look old."""
    return state["save_index"], state["step"]


@dataclass
class SavedCheckpoints:
    """The checkpoints of a `ckpt/` folder whose manifest and trainer state read back, newest first in save
    order, and one line for each that does not."""

    readable: list[tuple[Path, dict[str, Any]]]
    damaged: list[str]

    @property
    def next_save_index(self) -> int:
        return 1 + max((save_order_key(state)[0] for _path, state in self.readable), default=0)


def saved_checkpoints(root: Path) -> SavedCheckpoints:
    readable, damaged = [], []
    for checkpoint in sorted(complete_checkpoints(root), reverse=True):
        try:
            readable.append((checkpoint, read_candidate(checkpoint)[0]))
        except CheckpointError as err:
            damaged.append(_("skipped {name}: {error}").format(name=checkpoint.name, error=err))
    readable.sort(key=lambda item: save_order_key(item[1]), reverse=True)
    return SavedCheckpoints(readable, damaged)


def read_latest(run_dir: Path) -> str | None:
    """The checkpoint name `latest` holds; refuses anything but a `step_N` name inside `ckpt/`."""
    path = run_dir / LATEST
    if not path.is_file():
        return None
    if path.stat().st_size > LATEST_BYTES:
        raise CheckpointError(_("{path}: {size:,} bytes, too large to hold a checkpoint name").format(
            path=path, size=path.stat().st_size))
    try:
        name = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(_("{path}: not UTF-8 text").format(path=path)) from None
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(_("{path}: holds {name!r}, not the name of a checkpoint folder in {folder}/").format(
            path=path, name=name[:80], folder=CKPT_DIR))
    return name


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from, and what was passed over on the way (newest first)."""

    path: Path
    state: dict[str, Any]
    skipped: list[str] = field(default_factory=list)


def find_resume_point(run_dir: Path) -> ResumePoint | None:
    """The newest (in save order) checkpoint of `run_dir` that verifies; None when `ckpt/` holds none at all.

    Raises when checkpoints exist but none verifies: starting fresh over them would lose the run."""
    notes: list[str] = []
    try:
        latest = read_latest(run_dir)
    except CheckpointError as err:
        latest, notes = None, [_("{error}; ignored").format(error=err)]
    saved = saved_checkpoints(run_dir / CKPT_DIR)
    notes += saved.damaged
    names = [path.name for path, _state in saved.readable]
    if latest and not (run_dir / CKPT_DIR / latest).is_dir():
        notes.append(_("{path} names {name}, which does not exist").format(path=run_dir / LATEST, name=latest))
    for index, (checkpoint, _state) in enumerate(saved.readable):
        try:
            state = verify_checkpoint(checkpoint)
        except CheckpointError as err:
            notes.append(_("skipped {name}: {error}").format(name=checkpoint.name, error=err))
            continue
        if latest in names and names.index(latest) > index:
            notes.append(_("{path} names {name}, but {newer} was saved after it").format(
                path=run_dir / LATEST, name=latest, newer=checkpoint.name))
        return ResumePoint(checkpoint, state, notes)
    if names or saved.damaged:
        count = len(names) + len(saved.damaged)
        raise CheckpointError(_("{path}: {count} checkpoint(s) and none is loadable: {reasons}. Move them away or "
                                "pass --resume with a good one").format(
            path=run_dir / CKPT_DIR, count=count, reasons="; ".join(notes)))
    return None


def recorded_precision(path: str | Path) -> str | None:
    """The precision the checkpoint a resume would start from recorded (`path`: a checkpoint folder or a run
    directory), read before any engine exists so a resumed `--precision auto` run keeps its precision on
    another machine. Manifest and trainer state are checked, the large files not: None when there is
    nothing readable to follow."""
    path = Path(path)
    if is_checkpoint_folder(path):
        try:
            states = [read_trainer_state(path)]
        except CheckpointError:
            return None
    else:
        root = (path.parent if path.name == CKPT_DIR else path) / CKPT_DIR
        states = [state for _path, state in saved_checkpoints(root).readable[:1]]
    return states[0].get("precision") if states else None


def is_checkpoint_folder(path: Path) -> bool:
    """A single checkpoint (as opposed to a run directory or its `ckpt/` folder)."""
    return ((path / TRAINER_STATE).exists() or (path / MANIFEST).exists()
            or (STEP_NAME.fullmatch(path.name) is not None and path.parent.name == CKPT_DIR))


def resolve_checkpoint(path: str | Path) -> ResumePoint:
    """What `--resume PATH` means: a checkpoint folder (verified strictly, no fallback), or a run
    directory / its `ckpt/` folder (the newest checkpoint that verifies)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(_("{path}: no such checkpoint or run directory").format(path=path))
    if is_checkpoint_folder(path):
        return ResumePoint(path, verify_checkpoint(path))
    run_dir = path.parent if path.name == CKPT_DIR else path
    point = find_resume_point(run_dir)
    if point is None:
        raise CheckpointError(_("no checkpoint at {path}: expected a checkpoint folder, or a run directory with "
                                "{folder}/step_N folders").format(path=path, folder=CKPT_DIR))
    return point


# --- writing ----------------------------------------------------------------------------------------------

def is_disk_full(err: BaseException, directory: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain, or torch's stream errors ("basic_ios::clear",
    "unexpected pos") while the file system has no room left. Call it before cleaning up."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain):
        return True
    text = " ".join(str(e) for e in chain)
    if "No space left" in text or "Disk quota" in text:
        return True
    if any(marker in text for marker in ("iostream", "unexpected pos", "file write failed")):
        try:
            return shutil.disk_usage(directory).free < 1 << 20
        except OSError:
            return True
    return False


def newest_file(directory: Path) -> Path:
    files = [p for p in directory.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else directory


def sweep_temporary(run_dir: Path) -> list[Path]:
    """Clear what interrupted writes left in a run directory: `ckpt/*.tmp`, `*.tmp` files, and the hidden
    leftovers of `minigpt.fsutil` (`sweep_leftovers`: an unfinished `final/` is removed, a put-aside one
    removed or put back). Main rank, holding the run directory's lock, before anything else is written, so
    a full disk cannot block its own recovery."""
    removed = []
    for stale in [*(run_dir / CKPT_DIR).glob(f"*{TMP_SUFFIX}"), *run_dir.glob(f"*{TMP_SUFFIX}")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed + sweep_leftovers(run_dir)


class CheckpointManager:
    """Saves and restores the full training state of a run through its engine.

    Every step that one rank does alone (the main rank choosing, preparing or publishing a checkpoint) or
    that each rank does for itself (writing its files, loading them) goes through the runtime's
    `main_rank_does` / `every_rank_does`, so a failure anywhere stops every rank at once with the reason,
    never a rank left waiting in a collective."""

    def __init__(self, run_dir: str | Path, engine: Engine, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CKPT_DIR
        self.engine = engine
        self.keep_last = keep_last
        self.resumed_save_index = 0
        """The save index of the checkpoint this run resumed from: the next save counts on from it."""

    def save(self, step: int, trainer_state: TrainerState) -> Path:
        """Write checkpoint `step` collectively; every rank calls this with the same step and its own
        `trainer_state` (`Trainer.state_dict()`: the same but for each rank's RNG)."""
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f"step_{step:07d}{TMP_SUFFIX}"
        runtime = self.engine.runtime
        save_index = runtime.main_rank_does(lambda: self._prepare(tmp), _("preparing {path}").format(path=tmp))
        try:
            runtime.every_rank_does(lambda: self._write_rank_files(tmp, step, save_index, trainer_state),
                                    _("writing {path}").format(path=tmp))
            runtime.main_rank_does(lambda: (write_manifest(tmp), fsync_tree(tmp)),
                                   _("writing {path}").format(path=tmp / MANIFEST))
        except Exception as err:
            culprit = newest_file(tmp) if tmp.is_dir() else tmp
            disk_full = is_disk_full(err, self.root)
            if self.engine.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if disk_full:
                raise CheckpointError(_("disk full while writing {path}: checkpoint step {step} not saved; the "
                                        "previous checkpoint and {latest} are untouched. Free space, then rerun "
                                        "with --auto-resume").format(path=culprit, step=step, latest=LATEST)) from None
            raise
        runtime.main_rank_does(lambda: self._publish(tmp, final), _("publishing {path}").format(path=final))
        return final

    def _prepare(self, tmp: Path) -> int:
        """Main rank: an empty `tmp` (what an interrupted save of this run left is removed; the run
        directory's lock keeps every other process out); returns the new checkpoint's save index."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"*{TMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        return max(saved_checkpoints(self.root).next_save_index, self.resumed_save_index + 1)

    def _write_rank_files(self, tmp: Path, step: int, save_index: int | None, trainer_state: TrainerState) -> None:
        self.engine.save(tmp)
        (tmp / rng_file(self.engine.rank)).write_text(json.dumps(trainer_state.rng or rng_state()) + "\n")
        if self.engine.is_main:
            state = {**trainer_state.to_json(), "step": step, "save_index": save_index,
                     "world_size": self.engine.world_size, "engine": type(self.engine).__name__,
                     "saved_at": time.time()}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")

    def _publish(self, tmp: Path, final: Path) -> None:
        """Main rank: rename the complete `tmp` to `final`, then point `latest` at it and prune."""
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(self.run_dir / LATEST, f"{final.name}\n")
        self._prune(final)

    def _prune(self, just_written: Path) -> None:
        """Keep the newest `keep_last` checkpoints in save order; never the one just written, and never one
        whose manifest or trainer state does not read back (it is left for a person to look at)."""
        ordered = [path for path, _state in saved_checkpoints(self.root).readable]
        keep = {just_written.name, *(c.name for c in ordered[:max(self.keep_last, 1)])}
        for old in ordered:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def resume_point(self, explicit: str, auto: bool) -> ResumePoint | None:
        """The checkpoint to resume from (`--resume PATH` or `--auto-resume`), chosen and verified on the main
        rank, and sent with its trainer state to every rank; None to start fresh. Reasons for skipped
        checkpoints are printed by the main rank."""

        def choose() -> str | None:
            if not (explicit or auto):
                return None
            point = resolve_checkpoint(explicit) if explicit else find_resume_point(self.run_dir)
            if point is None:
                return None
            for note in point.skipped:
                print(_("[minigpt] {note}").format(note=note), flush=True)
            chosen = json.dumps({"path": str(point.path), "state": point.state})
            if len(chosen.encode("utf-8")) > CHOICE_BYTES:
                raise CheckpointError(_("{path}: path and trainer state longer than {limit:,} bytes").format(
                    path=point.path, limit=CHOICE_BYTES))
            return chosen

        runtime = self.engine.runtime
        chosen = runtime.share_text(runtime.main_rank_does(choose, _("choosing the checkpoint to resume from")),
                                    limit=CHOICE_BYTES)
        if chosen is None:
            return None
        choice = json.loads(chosen)
        return ResumePoint(Path(choice["path"]), choice["state"])

    def load(self, point: ResumePoint) -> TrainerState:
        """Restore the engine's state from a verified checkpoint and return the run's (`TrainerState`, with this
        rank's RNG) for `Trainer.load_state_dict`. The engines load weights-only themselves
        (`minigpt.safe_load`): a refused file is a CheckpointError here, on every rank."""
        checkpoint = point.path
        state = TrainerState.from_json(point.state, checkpoint)

        def load_here() -> None:
            try:
                self.engine.load(checkpoint)
            except UnsafeFileError as err:
                raise CheckpointError(str(err)) from None
            state.rng = read_rng_file(checkpoint, self.engine.rank)

        self.engine.runtime.every_rank_does(load_here, _("loading {path}").format(path=checkpoint))
        self.resumed_save_index = save_order_key(point.state)[0]
        return state
