"""The share of training step time spent waiting for data, with batches read in the loop and prefetched.

    python bench/data_wait.py                   # `small` preset, 20 steps each way, tinyshakespeare shards
    python bench/data_wait.py --preset tiny --steps 40

Runs `launch/train.py` as a user would, twice (`--prefetch 0`, then the default `--prefetch 2`), and reads
each step's `data_wait_s` and `seconds` back from metrics.jsonl. The first step of each run is left out
(it includes the first reads of the memory-mapped shard and the thread's start).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = Path(__file__).resolve().parents[1]


@dataclass
class DataWait:
    prefetch: int
    steps: int
    step_ms: float
    """Median step time."""
    wait_ms: float
    """Mean time a step waited for its batches."""
    share: float
    """Total wait / total step time."""


def measure(work: Path, dataset_dir: Path, tokenizer_dir: Path, prefetch: int, preset: str = "small",
            steps: int = 20, batch_size: int = 8, seq_len: int = 256) -> DataWait:
    run_dir = work / f"prefetch{prefetch}"
    command = [sys.executable, str(REPO / "launch" / "train.py"), "--mode", "pretrain", "--config", preset,
               "--device", "cpu", "--data", str(dataset_dir), "--tokenizer", str(tokenizer_dir), "--out", str(run_dir),
               "--overwrite", "--seq-len", str(seq_len), "--batch-size", str(batch_size), "--max-steps", str(steps),
               "--warmup-steps", "2", "--eval-interval", "0", "--eval-batches", "1", "--save-interval", "0",
               "--prefetch", str(prefetch), "--log-interval", str(steps), "--sample-prompt", ""]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"][1:]
    seconds = sorted(r["seconds"] for r in train)
    waits = [r["data_wait_s"] for r in train]
    return DataWait(prefetch, len(train), 1000 * seconds[len(seconds) // 2], 1000 * sum(waits) / len(waits),
                    sum(waits) / sum(r["seconds"] for r in train))


def main(argv: list[str] | None = None) -> int:
    from shakespeare_data import prepare

    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "data_wait")
    args = parser.parse_args(argv)
    prepared = prepare(args.out / "shakespeare", 1024)
    print(f"{'prefetch':>8} {'steps':>5} {'step ms':>8} {'wait ms':>8} {'wait share':>10}")
    for prefetch in (0, 2):
        r = measure(args.out, prepared.dataset_dir, prepared.tokenizer_dir, prefetch, args.preset, args.steps)
        print(f"{r.prefetch:>8} {r.steps:>5} {r.step_ms:>8.1f} {r.wait_ms:>8.3f} {r.share:>10.4%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
