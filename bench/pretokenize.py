"""Pre-tokenization throughput: build_dataset with 1 and 2 workers against plain SentencePiece encode.

    python bench/pretokenize.py                                  # ../shared/data/zh_classics.jsonl
    python bench/pretokenize.py --input corpus.jsonl --vocab-size 8000 --workers 1 2 4

Trains a tokenizer on the input first (not timed). The baseline is `SentencePieceProcessor.encode`
on each text in one process, after the texts are already in memory; the pipeline's time includes
reading, JSON parsing, the split and writing the shards.
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
from minigpt.tokenizer_training import train_tokenizer  # noqa: E402

DEFAULT_INPUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "zh_classics.jsonl"


def baseline(tokenizer, path: Path, text_field: str) -> tuple[float, int]:
    """Seconds and tokens for encoding every text of `path` one by one (texts preloaded)."""
    with open(path, encoding="utf-8") as handle:
        texts = [json.loads(line)[text_field] for line in handle if line.strip()]
    start = time.perf_counter()
    tokens = sum(len(tokenizer.sp.encode(text)) + 1 for text in texts)  # +1: the EOS the pipeline adds
    return time.perf_counter() - start, tokens


def compare(path: Path, text_field: str, vocab_size: int, workers_list: list[int]) -> tuple[float, int, list]:
    """(MB of input, vocabulary, [(label, seconds, tokens)]): plain sp.encode first, then the pipeline with each
    number of workers. The tokenizer is trained on the input first (not timed)."""
    megabytes = path.stat().st_size / 1e6
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = train_tokenizer([path], Path(scratch) / "tok", vocab_size, text_field=text_field)
        base_seconds, base_tokens = baseline(tokenizer, path, text_field)
        rows = [("sp.encode, 1 process", base_seconds, base_tokens)]
        for workers in workers_list:
            start = time.perf_counter()
            out = build_dataset([path], Path(scratch) / f"w{workers}", tokenizer, workers=workers,
                                text_field=text_field, progress=False)
            seconds = time.perf_counter() - start
            rows.append((f"pretokenize, {workers} worker(s)", seconds,
                         json.loads((out / STATS_FILE).read_text())["totals"]["tokens"]))
    return megabytes, tokenizer.vocab_size, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="a .jsonl corpus")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    if not args.input.is_file():
        print(f"error: {args.input} not found", file=sys.stderr)
        return 2
    megabytes, vocab, rows = compare(args.input, args.text_field, args.vocab_size, args.workers)
    base_seconds = rows[0][1]
    print(f"{args.input.name}: {megabytes:.1f} MB, vocab {vocab}, {os.cpu_count()} CPU cores")
    print(f"{'':28} {'seconds':>8} {'MB/s':>7} {'Mtok/s':>7} {'vs sp.encode':>13}")
    for name, seconds, tokens in rows:
        print(f"{name:28} {seconds:8.2f} {megabytes / seconds:7.2f} {tokens / seconds / 1e6:7.3f} "
              f"{base_seconds / seconds:12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
