"""One run per run directory: a fresh run never trains into another run's checkpoints, weights or plots.

A run directory holds one run's `ckpt/`, `latest`, `final/`, `metrics.jsonl`, `samples.jsonl` and
`tensorboard/` events. A new run (no `--resume`/`--auto-resume`) into a directory that holds them is
refused, naming it, unless `--overwrite` asks to delete them first; the run's `tokenizer/` is kept
(`--retrain-tokenizer` replaces it). `--auto-resume` that finds no checkpoint clears the leftovers of the
attempt that saved none, so plots and metrics never mix two runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from minigpt.checkpoint import CKPT_DIR, LATEST
from minigpt.config import ConfigError, TrainConfig
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
    if cfg.resume or cfg.auto_resume:
        return []
    found = previous_run_artefacts(cfg.run_dir)
    if found and not cfg.overwrite:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
        raise ConfigError(f"{cfg.run_dir} holds another run ({names}); continue it with --auto-resume, train "
                          f"into another directory with --out DIR, or pass --overwrite to delete them and start clean")
    return found


def remove_artefacts(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
