"""DeepSpeed overhead: step time of `launch/train.py` under DeepSpeed against the plain engine.

    python bench/ds_overhead.py --steps 40        # prepares the tinyshakespeare shards first

Same model (the `shakespeare` preset), same micro-batch, same data, same flags; the figure is the
median optimizer-step wall time from each run's metrics.jsonl (first steps dropped as warm-up).
One rank: `deepspeed --num_gpus 1` with ZeRO-0 against `python` (PlainEngine). Two ranks: ZeRO-1/2/3,
each rank with one CPU thread (2 ranks x 1 thread = this machine's 2 cores; two threads each would
oversubscribe them). Every deepspeed launch costs ~30 s of start-up, which is not in the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 5


@dataclass
class StepTiming:
    """One launch's median step time."""

    label: str
    ranks: int
    step_ms: float
    tokens_per_sec: float
    launch_seconds: float


def run_flags(dataset_dir: Path, tokenizer_dir: Path, out: Path, steps: int, batch_size: int, seq_len: int) -> list[str]:
    return ["--mode", "pretrain", "--config", "shakespeare", "--device", "cpu", "--precision", "fp32",
            "--data", str(dataset_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--max-steps", str(steps), "--batch-size", str(batch_size), "--seq-len", str(seq_len),
            "--warmup-steps", "5", "--eval-interval", "0", "--eval-batches", "1", "--save-interval", "0",
            "--log-interval", "1000"]


def timed_launch(label: str, command: list[str], out: Path, ranks: int, env: dict | None = None) -> StepTiming:
    """Run `command`, then read the median step seconds (after warm-up) of its metrics.jsonl."""
    started = time.perf_counter()
    log = out.with_suffix(".log")
    with open(log, "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, **(env or {})})
    launch_seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{label}: exited with code {code}; see {log}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("split") == "train"][WARMUP_STEPS:]
    median = statistics.median(r["seconds"] for r in steps)
    return StepTiming(label, ranks, median * 1e3, statistics.median(r["tokens_per_sec"] for r in steps),
                      launch_seconds)


def measure_all(work: Path, dataset_dir: Path, tokenizer_dir: Path, steps: int = 40, batch_size: int = 16,
                seq_len: int = 128, stages: tuple[int, ...] = (1, 2, 3), log=print) -> list[StepTiming]:
    """Plain, one-rank ZeRO-0, and two-rank ZeRO `stages` step times."""
    work.mkdir(parents=True, exist_ok=True)
    train = str(REPO / "launch" / "train.py")
    results = []

    def flags(name: str) -> list[str]:
        out = work / name
        if out.exists():
            import shutil

            shutil.rmtree(out)
        return run_flags(dataset_dir, tokenizer_dir, out, steps, batch_size, seq_len)

    results.append(timed_launch("plain engine, 1 process", [sys.executable, train, *flags("plain")],
                                work / "plain", 1))
    log(f"ds_overhead: plain {results[-1].step_ms:.1f} ms/step")
    deepspeed = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port"]
    port = 29700 + os.getpid() % 200
    results.append(timed_launch("deepspeed ZeRO-0, 1 rank", [
        *deepspeed, str(port), "--num_gpus", "1", train, *flags("ds1_zero0"),
        "--ds-config", str(REPO / "ds_configs" / "zero0.json")], work / "ds1_zero0", 1))
    log(f"ds_overhead: 1-rank ZeRO-0 {results[-1].step_ms:.1f} ms/step")
    for stage in stages:
        results.append(timed_launch(f"deepspeed ZeRO-{stage}, 2 ranks x 1 thread", [
            *deepspeed, str(port + stage), "--num_gpus", "2", train, *flags(f"ds2_zero{stage}"),
            "--ds-config", str(REPO / "ds_configs" / f"zero{stage}.json")], work / f"ds2_zero{stage}", 2,
            env={"OMP_NUM_THREADS": "1"}))
        log(f"ds_overhead: 2-rank ZeRO-{stage} {results[-1].step_ms:.1f} ms/step")
    return results


def main(argv: list[str] | None = None) -> int:
    from shakespeare_data import prepare

    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "ds_overhead")
    args = parser.parse_args(argv)
    prepared = prepare(args.work / "shakespeare", 1024)
    results = measure_all(args.work, prepared.dataset_dir, prepared.tokenizer_dir, args.steps)
    plain = results[0].step_ms
    print(f"{'launch':<38} {'ms/step':>8} {'vs plain':>8} {'tokens/s':>9} {'launch s':>8}")
    for r in results:
        print(f"{r.label:<38} {r.step_ms:>8.1f} {r.step_ms / plain:>7.2f}x {r.tokens_per_sec:>9,.0f} "
              f"{r.launch_seconds:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
