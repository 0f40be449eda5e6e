"""Training checkpoints: atomic writes, a `latest` pointer written last, keep-last-N, exact resume.

Layout of a run directory:
    ckpt/step_0000100/      engine-native state (DeepSpeed checkpoint files or the plain engine's
                            engine.pt), trainer_state.json (step, tokens seen, sampler position,
                            where the weights came from) and rng_rank<r>.pt for each rank
    latest                  name of the newest complete checkpoint, replaced atomically
A checkpoint is written to `step_N.tmp/`, flushed to disk, then renamed; `latest` changes only
after the rename. A crash mid-write leaves a `.tmp` directory that the next save removes, and
`latest` still names the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt.engine.base import Engine
from minigpt.fsutil import atomic_write_text, fsync_dir, fsync_tree

CKPT_DIR = "ckpt"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path, a `ckpt/` folder or a run directory (via `latest`)."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path
    for run_dir in (path, path.parent):
        latest = run_dir / LATEST
        if latest.is_file():
            target = run_dir / CKPT_DIR / latest.read_text().strip()
            if not (target / TRAINER_STATE).is_file():
                raise CheckpointError(f"{latest} names {target}, which is not a complete checkpoint")
            return target
    raise CheckpointError(f"no checkpoint at {path}: expected {TRAINER_STATE} there or a {LATEST} file")


class CheckpointManager:
    """Saves and restores the full training state of a run through its engine."""

    def __init__(self, run_dir: str | Path, engine: Engine, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CKPT_DIR
        self.engine = engine
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        try:
            return resolve_checkpoint(self.run_dir)
        except CheckpointError:
            return None

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint `step` collectively; every rank calls this with the same step."""
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f"step_{step:07d}.tmp"
        if self.engine.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.engine.barrier()
        self.engine.save(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{self.engine.rank}.pt")
        if self.engine.is_main:
            state = {**trainer_state, "step": step, "world_size": self.engine.world_size,
                     "engine": type(self.engine).__name__}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
        self.engine.barrier()
        if self.engine.is_main:
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            atomic_write_text(self.run_dir / LATEST, f"{final.name}\n")
            self._prune()
        self.engine.barrier()
        return final

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in complete[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore engine state and this rank's RNG from `path`; return the trainer state."""
        checkpoint = resolve_checkpoint(path)
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        self.engine.load(checkpoint)
        rng_file = checkpoint / f"rng_rank{self.engine.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        state["checkpoint"] = str(checkpoint)
        return state
