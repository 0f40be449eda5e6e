"""Pretrain data-loader memory: RSS while iterating PretrainWindows + ResumableSampler as the shard grows.

    python bench/loader_memory.py --sizes 10 200     # millions of tokens (200M uint16 = 400 MB on disk)

For each size a synthetic shard is written with `ShardWriter` (random uint16 tokens, 1,000-token
documents), then a fresh process opens it the way the training loop does (`open_shard`,
`PretrainWindows`, `ResumableSampler`, the loop's `collate`) and draws the same number of batches;
its RSS is read before opening, after opening, and after the batches. The shard is deleted after.
Memory-mapped tokens mean the loader holds no copy of the data: its anonymous memory (RssAnon, the
figure the goal is on) stays flat; the file pages it touched also count in RSS (RssFile, page cache
the kernel can drop), which grows with the number of distinct pages the batches touched, at most
one or two pages per window, not with the shard's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

DOC_TOKENS = 1000
VOCAB = 4096


@dataclass
class LoaderMemory:
    """RSS of one loader process, in MiB."""

    million_tokens: int
    anon_start_mib: float
    anon_end_mib: float
    file_end_mib: float
    rss_end_mib: float
    rss_peak_mib: float
    batches: int


def write_shard(directory: Path, num_tokens: int, seed: int = 0) -> None:
    """A pretrain dataset directory (train/ only) of `num_tokens` random tokens, written in blocks."""
    from minigpt.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    writer = ShardWriter(directory / "train", VOCAB, "pretrain", "synthetic")
    block = 5_000_000
    for start in range(0, num_tokens, block):
        count = min(block, num_tokens - start)
        tokens = rng.integers(4, VOCAB, count, dtype=np.uint16)
        lengths = np.full(count // DOC_TOKENS, DOC_TOKENS)
        if count % DOC_TOKENS:
            lengths = np.append(lengths, count % DOC_TOKENS)
        writer.add_many(tokens, lengths)
    writer.close()


def iterate(dataset_dir: str, batches: int, batch_size: int, seq_len: int) -> dict:
    """Open the shard as the loop does and draw `batches` batches; RSS figures (MiB)."""
    import psutil
    import torch

    from minigpt.data.datasets import PretrainWindows
    from minigpt.data.prefetch import collate
    from minigpt.data.sampler import ResumableSampler
    from minigpt.data.shards import open_shard

    process = psutil.Process()
    rss = lambda: process.memory_info().rss / 2**20  # noqa: E731
    start = status_mib()
    windows = PretrainWindows(open_shard(dataset_dir, "train", vocab_size=VOCAB), seq_len)
    sampler = ResumableSampler(len(windows), batch_size, 1, seed=0)
    peak = rss()
    checksum = 0
    for step in range(batches):
        (indices,) = sampler.next_step()
        batch = collate([windows[int(i)] for i in indices], torch.device("cpu"))
        checksum += int(batch["input_ids"][0, 0])
        if step % 100 == 0:
            peak = max(peak, rss())
    end = status_mib()
    return {"anon_start_mib": start["RssAnon"], "anon_end_mib": end["RssAnon"], "file_end_mib": end["RssFile"],
            "rss_end_mib": end["VmRSS"], "rss_peak_mib": max(peak, end["VmRSS"]), "batches": batches}


def status_mib() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process in MiB (Linux /proc/self/status)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            values[name] = int(rest.split()[0]) / 1024
    return values


def measure(million_tokens: int, batches: int = 3000, batch_size: int = 16, seq_len: int = 256,
            scratch: Path | None = None) -> LoaderMemory:
    """Write a shard of `million_tokens`, iterate it in a fresh process, delete it."""
    root = Path(tempfile.mkdtemp(prefix="loader_memory_", dir=scratch))
    try:
        write_shard(root / "data", million_tokens * 1_000_000)
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"from loader_memory import iterate; "
                f"print(json.dumps(iterate({str(root / 'data')!r}, {batches}, {batch_size}, {seq_len})))")
        output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout
        return LoaderMemory(million_tokens=million_tokens, **json.loads(output.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 200], help="shard sizes in millions of tokens")
    parser.add_argument("--batches", type=int, default=3000)
    args = parser.parse_args(argv)
    print(f"{'Mtokens':>8} {'anon start':>10} {'anon end':>8} {'file end':>8} {'RSS end':>8} {'RSS peak':>8}"
          f"  (MiB, {args.batches} batches)")
    for size in args.sizes:
        r = measure(size, args.batches)
        print(f"{r.million_tokens:>8} {r.anon_start_mib:>10.1f} {r.anon_end_mib:>8.1f} {r.file_end_mib:>8.1f} "
              f"{r.rss_end_mib:>8.1f} {r.rss_peak_mib:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
