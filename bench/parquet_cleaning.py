"""Parquet input and cleaning at the door: what they cost against a plain JSONL build of the same records.

    python bench/parquet_cleaning.py                       # ../shared/data/zh_classics.jsonl, one worker
    python bench/parquet_cleaning.py --input corpus.jsonl --copies 3 --repeats 3

Writes the JSONL input `--copies` times over (so a known share of it is duplicate) and the same records as
Parquet, trains a tokenizer on it (not timed), then times build_dataset on each variant, best of
`--repeats` rounds that take the variants in turn. Ratios are of CPU seconds (this process and its
threads; with --workers 1 that is the whole build), against the plain JSONL build of the same run: on a
shared machine wall time follows the load more than the code.
Needs pyarrow (`pip install -e ".[parquet]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.data.build import STATS_FILE, build_dataset  # noqa: E402
from minigpt.data.cleaning import Cleaning  # noqa: E402
from minigpt.tokenizer_training import train_tokenizer  # noqa: E402

DEFAULT_INPUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "zh_classics.jsonl"


def write_inputs(source: Path, copies: int, work: Path) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = texts * copies
    jsonl = work / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    parquet = work / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), parquet, row_group_size=8192)
    return jsonl, parquet


def timed_build(path: Path, tokenizer, cleaning: Cleaning, out: Path, workers: int) -> tuple[float, float, dict]:
    """CPU seconds, wall seconds and the stats totals of one build."""
    cpu, wall = time.process_time(), time.perf_counter()
    build_dataset([path], out, tokenizer, workers=workers, progress=False, cleaning=cleaning, overwrite=True)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu, wall, json.loads((out / STATS_FILE).read_text())["totals"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="JSONL with a text field")
    parser.add_argument("--copies", type=int, default=2, help="times the input is repeated (copies after the "
                        "first are duplicates)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        jsonl, parquet = write_inputs(args.input, args.copies, work)
        tokenizer = train_tokenizer([args.input], work / "tok", vocab_size=args.vocab_size,
                                    input_sentence_size=200_000)
        rows = [("jsonl", jsonl, Cleaning()), ("parquet", parquet, Cleaning()),
                ("jsonl --dedup", jsonl, Cleaning(dedup=True)),
                ("jsonl --dedup --min-chars 20 --max-repeated-lines 0.3", jsonl,
                 Cleaning(dedup=True, min_chars=20, max_repeated_lines=0.3)),
                ("parquet --dedup", parquet, Cleaning(dedup=True))]
        best: dict[str, tuple[float, float, dict]] = {}
        for _round in range(args.repeats):
            for name, path, cleaning in rows:
                cpu, wall, totals = timed_build(path, tokenizer, cleaning, work / "out", args.workers)
                old = best.get(name, (float("inf"), float("inf"), totals))
                best[name] = (min(cpu, old[0]), min(wall, old[1]), totals)
    base = best["jsonl"][0]
    print(f"{'input':<55} {'cpu s':>6} {'ratio':>6} {'wall s':>7} {'kept':>8} {'dropped':>8}")
    for name, (cpu, wall, totals) in best.items():
        print(f"{name:<55} {cpu:6.2f} {cpu / base:6.2f} {wall:7.2f} {totals['documents_kept']:8d} "
              f"{totals['documents_dropped']:8d}")


if __name__ == "__main__":
    main()
