"""One training command run twice, through the plain engine and through 2 DeepSpeed ranks, for the tests that
check the two engines train alike: one plain rank of micro-batch 4 accumulating 2 micro-batches takes the same
steps as 2 ranks of micro-batch 4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ports import free_port

REPO = Path(__file__).resolve().parents[1]


def train_losses(run_dir: Path) -> list[float]:
    rows = map(json.loads, filter(None, (run_dir / "metrics.jsonl").read_text().splitlines()))
    return [r["loss"] for r in rows if r.get("split") == "train"]


def train_on_both_engines(tmp_path: Path, common: list[str], ds_config: str) -> dict[str, subprocess.CompletedProcess]:
    """`launch/train.py COMMON` as one plain process (`--grad-accum 2`, out `tmp_path/plain`) and under
    `deepspeed --num_gpus 2` with `ds_configs/DS_CONFIG` (out `tmp_path/deepspeed`), both with `--batch-size 4`;
    each must exit 0."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commands = {"plain": [sys.executable, str(REPO / "launch" / "train.py"), *common, "--batch-size", "4",
                          "--grad-accum", "2", "--out", str(tmp_path / "plain")],
                "deepspeed": ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                              str(REPO / "launch" / "train.py"), *common, "--batch-size", "4",
                              "--ds-config", str(REPO / "ds_configs" / ds_config), "--out",
                              str(tmp_path / "deepspeed")]}
    done = {}
    for name, command in commands.items():
        done[name] = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
        assert done[name].returncode == 0, done[name].stdout[-4000:] + done[name].stderr[-4000:]
    return done
