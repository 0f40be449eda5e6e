"""Training checkpoints: atomic, verified, never trusted blindly, never lost to a damaged newer one.

Layout of a run directory:
    ckpt/step_0000100/      engine-native state (DeepSpeed checkpoint files or the plain engine's
                            engine.pt), trainer_state.json (step, tokens seen, sampler position, save
                            time), rng_rank<r>.json for each rank, and manifest.json: the size and
                            SHA-256 of every other file, written last
    latest                  name of the newest complete checkpoint (a hint for people and tools)
A checkpoint is written to `step_N.tmp/`, flushed to disk, then renamed; `latest` changes only after
the rename. A crash or a full disk mid-write leaves at most a `.tmp` directory, removed by the failed
save itself or swept at the next start, and `latest` still names the previous complete checkpoint.

Resuming picks the newest checkpoint (in save order) that verifies: its manifest matches the files,
its trainer state parses. Newer damaged ones are skipped with the reason. Every torch file is loaded
weights-only (`minigpt.safe_load`), so a checkpoint is data, never code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt.engine.base import Engine
from minigpt.fsutil import atomic_write_text, fsync_dir, fsync_tree
from minigpt.safe_load import UnsafeFileError, safe_torch_load, weights_only_loads

CKPT_DIR = "ckpt"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
STEP_NAME = re.compile(r"step_(\d+)")
TMP_SUFFIX = ".tmp"
PATH_BYTES = 4096


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
    """Restore what `rng_state` returned (or a legacy pickled state of earlier versions)."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        np.random.set_state((npy["kind"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]] if state.get("cuda") else None
    else:  # legacy pickle: the tuples themselves
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.json"


def read_rng_file(checkpoint: Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG state from `checkpoint` (JSON; `.pt` of earlier versions loaded weights-only)."""
    path = checkpoint / rng_file(rank)
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: damaged RNG state ({err})") from None
    legacy = checkpoint / f"rng_rank{rank}.pt"
    if legacy.is_file():
        try:
            return safe_torch_load(legacy, numpy_arrays=True)
        except UnsafeFileError as err:
            raise CheckpointError(str(err)) from None
    return None


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
    manifest = {"format_version": MANIFEST_VERSION, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: no integer 'step' field")
    return state


def verify_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """Check that `checkpoint` is complete and undamaged; return its trainer state.

    With a manifest every listed file must exist with its size and SHA-256, and no unlisted file may be
    present; checkpoints of earlier versions (no manifest) get the structural checks only."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: not a directory")
    manifest_path = checkpoint / MANIFEST
    if manifest_path.is_file():
        try:
            files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
            expected = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{manifest_path}: damaged manifest ({err})") from None
        present = checkpoint_files(checkpoint)
        for name in sorted(set(present) - set(expected)):
            raise CheckpointError(f"{checkpoint / name}: not in {MANIFEST} (added after the checkpoint was saved)")
        for name, (size, digest) in expected.items():
            path = checkpoint / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
            if path.stat().st_size != size:
                raise CheckpointError(f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {size} (truncated?)")
            if sha256_of(path) != digest:
                raise CheckpointError(f"{path}: SHA-256 differs from {MANIFEST} (damaged or replaced)")
    state = read_trainer_state(checkpoint)
    match = STEP_NAME.fullmatch(checkpoint.name)
    if match and int(match.group(1)) != state["step"]:
        raise CheckpointError(f"{checkpoint / TRAINER_STATE}: step {state['step']} in a folder named {checkpoint.name}")
    return state


# --- choosing a checkpoint --------------------------------------------------------------------------------

def complete_checkpoints(root: Path) -> list[Path]:
    """Folders `step_N` in `root` (finished writes; `.tmp` folders are never candidates)."""
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and STEP_NAME.fullmatch(p.name)]


def save_order_key(checkpoint: Path) -> tuple[float, int]:
    """When a checkpoint was saved (trainer state's `saved_at`, else its file time), then its step.

    Save order, not step order: after rolling back to an earlier step the new saves are the newest."""
    step = int(STEP_NAME.fullmatch(checkpoint.name).group(1))
    try:
        saved_at = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8")).get("saved_at")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        saved_at = None
    if not isinstance(saved_at, (int, float)):
        try:
            saved_at = (checkpoint / TRAINER_STATE).stat().st_mtime
        except OSError:
            saved_at = checkpoint.stat().st_mtime
    return float(saved_at), step


def read_latest(run_dir: Path) -> str | None:
    """The checkpoint name `latest` holds; refuses anything but a `step_N` name inside `ckpt/`."""
    path = run_dir / LATEST
    if not path.is_file():
        return None
    try:
        name = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{path}: holds {name[:80]!r}, not the name of a checkpoint folder in {CKPT_DIR}/")
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
        latest, notes = None, [f"{err}; ignored"]
    candidates = sorted(complete_checkpoints(run_dir / CKPT_DIR), key=save_order_key, reverse=True)
    if latest and latest not in {c.name for c in candidates}:
        notes.append(f"{run_dir / LATEST} names {latest}, which does not exist")
    names = [c.name for c in candidates]
    for index, checkpoint in enumerate(candidates):
        try:
            state = verify_checkpoint(checkpoint)
        except CheckpointError as err:
            notes.append(f"skipped {checkpoint.name}: {err}")
            continue
        if latest in names and names.index(latest) > index:
            notes.append(f"{run_dir / LATEST} names {latest}, but {checkpoint.name} was saved after it")
        return ResumePoint(checkpoint, state, notes)
    if candidates:
        raise CheckpointError(f"{run_dir / CKPT_DIR}: {len(candidates)} checkpoint(s) and none is loadable: "
                              + "; ".join(notes) + ". Move them away or pass --resume with a good one")
    return None


def recorded_precision(path: str | Path) -> str | None:
    """The precision the checkpoint a resume would start from recorded (`path`: a checkpoint folder or a run
    directory), read before any engine exists so a resumed `--precision auto` run keeps its precision on
    another machine. A cheap read, not a verification: None when there is nothing readable to follow."""
    path = Path(path)
    candidates = [path] if is_checkpoint_folder(path) else sorted(
        complete_checkpoints((path.parent if path.name == CKPT_DIR else path) / CKPT_DIR), key=save_order_key,
        reverse=True)[:1]
    for checkpoint in candidates:
        try:
            state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        precision = state.get("precision") if isinstance(state, dict) else None
        return precision if precision in ("fp32", "bf16", "fp16") else None
    return None


def is_checkpoint_folder(path: Path) -> bool:
    """A single checkpoint (as opposed to a run directory or its `ckpt/` folder)."""
    return ((path / TRAINER_STATE).exists() or (path / MANIFEST).exists()
            or (STEP_NAME.fullmatch(path.name) is not None and path.parent.name == CKPT_DIR))


def resolve_checkpoint(path: str | Path) -> ResumePoint:
    """What `--resume PATH` means: a checkpoint folder (verified strictly, no fallback), or a run
    directory / its `ckpt/` folder (the newest checkpoint that verifies)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if is_checkpoint_folder(path):
        return ResumePoint(path, verify_checkpoint(path))
    run_dir = path.parent if path.name == CKPT_DIR else path
    point = find_resume_point(run_dir)
    if point is None:
        raise CheckpointError(f"no checkpoint at {path}: expected a checkpoint folder, or a run directory "
                              f"with {CKPT_DIR}/step_N folders")
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
    """Remove what interrupted writes left in a run directory (`ckpt/*.tmp`, `*.tmp` files); main rank,
    before anything else is written, so a full disk cannot block its own recovery."""
    removed = []
    # `.final.tmp-*`: an unfinished consolidation (never `.final.old-*`, which may hold the only copy)
    for stale in [*(run_dir / CKPT_DIR).glob(f"*{TMP_SUFFIX}"), *run_dir.glob(f"*{TMP_SUFFIX}"),
                  *run_dir.glob(f".*{TMP_SUFFIX}-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


class CheckpointManager:
    """Saves and restores the full training state of a run through its engine."""

    def __init__(self, run_dir: str | Path, engine: Engine, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CKPT_DIR
        self.engine = engine
        self.keep_last = keep_last

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint `step` collectively; every rank calls this with the same step."""
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f"step_{step:07d}{TMP_SUFFIX}"
        if self.engine.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"*{TMP_SUFFIX}"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.engine.barrier()
        try:
            self.engine.save(tmp)
            (tmp / rng_file(self.engine.rank)).write_text(json.dumps(rng_state()) + "\n")
            if self.engine.is_main:
                state = {**trainer_state, "step": step, "world_size": self.engine.world_size,
                         "engine": type(self.engine).__name__, "saved_at": time.time()}
                (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
            self.engine.barrier()
            if self.engine.is_main:
                write_manifest(tmp)
                fsync_tree(tmp)
        except (OSError, RuntimeError) as err:
            culprit = newest_file(tmp) if tmp.is_dir() else tmp
            disk_full = is_disk_full(err, self.root)
            if self.engine.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if disk_full:
                raise CheckpointError(f"disk full while writing {culprit}: checkpoint step {step} not saved; "
                                      f"the previous checkpoint and {LATEST} are untouched. Free space, then "
                                      "rerun with --auto-resume") from None
            raise
        if self.engine.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            atomic_write_text(self.run_dir / LATEST, f"{final.name}\n")
            self._prune(final)
        self.engine.barrier()
        return final

    def _prune(self, just_written: Path) -> None:
        """Keep the newest `keep_last` checkpoints in save order; never the one just written."""
        ordered = sorted(complete_checkpoints(self.root), key=save_order_key, reverse=True)
        keep = {just_written.name, *(c.name for c in ordered[:max(self.keep_last, 1)])}
        for old in ordered:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def resume_point(self, explicit: str, auto: bool) -> ResumePoint | None:
        """The checkpoint to resume from (`--resume PATH` or `--auto-resume`), chosen on the main rank and
        agreed by all; None to start fresh. Reasons for skipped checkpoints are printed by the main rank."""
        point, error = None, None
        if self.engine.is_main:
            try:
                point = resolve_checkpoint(explicit) if explicit else \
                    find_resume_point(self.run_dir) if auto else None
            except CheckpointError as err:
                error = err
        chosen = self._agree_on(point, error is not None)
        if error is not None:
            raise error
        if chosen is None:
            return None
        if point is None:  # another rank: the main rank verified it
            point = ResumePoint(chosen, read_trainer_state(chosen))
        for note in point.skipped:
            print(f"[minigpt] {note}", flush=True)
        return point

    def _agree_on(self, point: ResumePoint | None, failed: bool) -> Path | None:
        """Share the main rank's choice with every rank: [code, path bytes...], code 1 chosen, -1 none,
        -2 failed (all-reduced: the other ranks contribute zeros)."""
        if self.engine.world_size == 1:
            return point.path if point else None
        payload = torch.zeros(1 + PATH_BYTES, dtype=torch.int64)
        if self.engine.is_main:
            payload[0] = -2 if failed else 1 if point else -1
            if point is not None:
                encoded = str(point.path).encode("utf-8")
                if len(encoded) > PATH_BYTES:
                    raise CheckpointError(f"{point.path}: path longer than {PATH_BYTES} bytes")
                payload[1:1 + len(encoded)] = torch.tensor(list(encoded), dtype=torch.int64)
        payload = self.engine.all_reduce_sum(payload.to(self.engine.device)).cpu()
        code = int(payload[0])
        if code == -2 and not self.engine.is_main:
            raise CheckpointError("the main rank could not choose a checkpoint (its error is printed there)")
        if code != 1:
            return None
        return Path(bytes(payload[1:].tolist()).rstrip(b"\0").decode("utf-8"))

    def load(self, point: ResumePoint) -> dict[str, Any]:
        """Restore engine state and this rank's RNG from a verified checkpoint; return the trainer state."""
        checkpoint = point.path
        try:
            with weights_only_loads():
                self.engine.load(checkpoint)
        except UnsafeFileError as err:
            raise CheckpointError(str(err)) from None
        rng = read_rng_file(checkpoint, self.engine.rank)
        if rng is not None:
            set_rng_state(rng)
        return {**point.state, "checkpoint": str(checkpoint)}
