"""Pre-tokenization throughput and memory: build_dataset against plain SentencePiece encode.

    python bench/pretokenize.py                                  # ../shared/data/zh_classics.jsonl
    python bench/pretokenize.py --input corpus.jsonl --vocab-size 8000 --workers 1 2 4
    python bench/pretokenize.py --big /work/big --size-gb 2      # the large-corpus goal (see below)

Trains a tokenizer on the input first (not timed). The baseline is `SentencePieceProcessor.encode`
on each text in one process, after the texts are already in memory; the pipeline's time includes
reading, JSON parsing, the split and writing the shards. Rows are repeated (`--repeat`, best kept)
and interleaved with the baseline, since a shared machine's load moves between them; CPU seconds
(of this process and its workers) are shown beside wall seconds.

`--big DIR` writes a corpus of mixed Chinese and English documents of `--size-gb` into DIR (made from
../shared/data by repetition and perturbation: lines shuffled, dropped and repeated, characters
swapped, a number in each document; kept for the next run), trains a tokenizer on its first 64 MB,
then runs `data_tools/pretokenize.py` on it with `--workers` as a user would, reporting wall time,
CPU seconds, MB/s and the peak resident memory of the command (its process and workers added up,
sampled every 0.2 s). The goal: 2 GB in 6 minutes or less on 2 cores, under 1 GB of memory.

Per worker (printed with the comparison): the work one worker does on each 1 MB block of the input
(unpickling the block, parsing, checking, encoding, the uint16 array, pickling the result) against
plain `sp.encode` of the same texts one by one, alternating, `--rounds` times; the median of the
per-round ratios, in CPU seconds of this process (what a quiet core would give) and in wall seconds.
The goal: 0.9x or more.

`--tokenizer DIR` runs only the per-worker comparison, with that tokenizer, on the first `--max-mb` of
`--input` (so it suits the 2 GB corpus). `--scaling MB` cuts the first MB megabytes of `--input` into a file under `--big` (outside the
repository) and runs `data_tools/pretokenize.py` on it with each of `--workers`, alternating,
`--repeat` rounds, with the load average before each run: wall time, CPU seconds, and the speedup of
each round over the first `--workers` entry (median). The goal: 1.7x or more with 2 workers on 2 quiet
cores. A shared machine's load is printed, not subtracted.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt.data.build import CHUNK_BYTES, STATS_FILE, _Chunk, _encode_chunk, _Job, build_dataset  # noqa: E402
from minigpt.data.shards import token_dtype  # noqa: E402
from minigpt.data.sources import block_records, input_format, iter_blocks, pretrain_texts  # noqa: E402
from minigpt.tokenizer import Tokenizer  # noqa: E402
from minigpt.tokenizer_training import train_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_INPUT = SHARED / "zh_classics.jsonl"


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the workers), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(function) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = function()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def compare(path: Path, text_field: str, vocab_size: int, workers_list: list[int], repeat: int,
            worker_rounds: int = 7) -> tuple:
    """(MB of input, vocabulary, rows of (label, wall s, cpu s, tokens), `per_worker`'s result), best of `repeat`
    each: plain sp.encode first, then the pipeline with each number of workers, interleaved."""
    megabytes = path.stat().st_size / 1e6
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = train_tokenizer([path], Path(scratch) / "tok", vocab_size, text_field=text_field)
        with open(path, encoding="utf-8") as handle:
            texts = [json.loads(line)[text_field] for line in handle if line.strip()]
        best: dict[str, tuple] = {}

        def keep(label, row):
            if label not in best or row[0] < best[label][0]:
                best[label] = row

        for _round in range(repeat):
            wall, cpu, tokens = timed(lambda: sum(len(tokenizer.sp.encode(text)) + 1 for text in texts))
            keep("sp.encode, 1 process", (wall, cpu, tokens))  # +1: the EOS the pipeline adds
            for workers in workers_list:
                out = Path(scratch) / f"w{workers}"
                shutil.rmtree(out, ignore_errors=True)
                wall, cpu, _out = timed(lambda w=workers, o=out: build_dataset(
                    [path], o, tokenizer, workers=w, text_field=text_field, progress=False))
                tokens = json.loads((out / STATS_FILE).read_text())["totals"]["tokens"]
                keep(f"pretokenize, {workers} worker(s)", (wall, cpu, tokens))
        worker = per_worker(path, tokenizer, text_field, worker_rounds)
    return megabytes, tokenizer.vocab_size, [(label, *row) for label, row in best.items()], worker


def per_worker(path: Path, tokenizer: Tokenizer, text_field: str = "text", rounds: int = 7,
               max_bytes: int = 64 << 20) -> dict:
    """What one worker spends on the blocks of `path` (its first `max_bytes`) against plain `sp.encode` of the
    same texts one by one, alternating (which goes first alternates too), `rounds` times. Returns the medians
    of the per-round ratios (baseline seconds / worker seconds: above 1 is faster than the baseline), in
    CPU and wall seconds, and the median seconds of each."""
    fmt = input_format(path)
    blocks, size = [], 0
    for block in iter_blocks(path, 0, 1, CHUNK_BYTES):
        blocks.append(block)
        size += len(block.data)
        if size >= max_bytes:
            break
    chunks = [pickle.dumps(_Chunk(0, fmt, block)) for block in blocks]  # what the main process sends
    texts = [pretrain_texts(fmt, block_records(fmt, block), text_field)[1] for block in blocks]
    job = _Job("pretrain", text_field, None, token_dtype(tokenizer.vocab_size).name)
    encode = tokenizer.sp.encode

    def baseline() -> None:
        for block_texts in texts:
            for text in block_texts:
                encode(text)

    def worker() -> None:
        for data in chunks:
            pickle.dumps(_encode_chunk(tokenizer, job, pickle.loads(data)))  # what it sends back

    cpu: dict[str, list[float]] = {"baseline": [], "worker": []}
    wall: dict[str, list[float]] = {"baseline": [], "worker": []}
    for index in range(rounds):
        order = [("baseline", baseline), ("worker", worker)]
        for name, function in order if index % 2 == 0 else order[::-1]:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            function()
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
    return {"megabytes": size / 1e6, "documents": sum(map(len, texts)), "rounds": rounds,
            "cpu_ratio": statistics.median(b / w for b, w in zip(cpu["baseline"], cpu["worker"], strict=True)),
            "wall_ratio": statistics.median(b / w for b, w in zip(wall["baseline"], wall["worker"], strict=True)),
            "baseline_cpu": statistics.median(cpu["baseline"]), "worker_cpu": statistics.median(cpu["worker"]),
            "baseline_wall": statistics.median(wall["baseline"]), "worker_wall": statistics.median(wall["worker"])}


def print_per_worker(result: dict) -> None:
    print(f"per worker vs sp.encode (first {result['megabytes']:.0f} MB, {result['documents']:,} documents, "
          f"median of {result['rounds']} alternating rounds): {result['cpu_ratio']:.2f}x in CPU seconds "
          f"({result['worker_cpu']:.2f} vs {result['baseline_cpu']:.2f} s), {result['wall_ratio']:.2f}x in wall "
          f"seconds; load average {os.getloadavg()[0]:.2f}; goal >= 0.90x: "
          f"{'PASS' if result['cpu_ratio'] >= 0.9 else 'FAIL'}")


def run_pretokenize(corpus: Path, tokenizer_dir: Path, out: Path, workers: int
                    ) -> tuple[int, float, float, int, float]:
    """`data_tools/pretokenize.py` on `corpus` as a user runs it: (exit code, wall s, CPU s of it and its workers,
    peak RSS of them together, CPU s of its main process alone: reading, writing and the split)."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, str(ROOT / "data_tools" / "pretokenize.py"), "--input", str(corpus), "--tokenizer",
               str(tokenizer_dir), "--out", str(out), "--workers", str(workers), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    code, peak, main_cpu = peak_memory(subprocess.Popen(command, env=env))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its workers, once waited for
    return code, seconds, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, peak, main_cpu


def scaling(path: Path, directory: Path, megabytes: int, vocab_size: int, text_field: str, workers_list: list[int],
            rounds: int) -> int:
    """Wall time of `data_tools/pretokenize.py` on the first `megabytes` MB of `path` with each number of workers,
    alternating, `rounds` rounds, the load average before each run printed beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / f"{path.stem}-first-{megabytes}mb{path.suffix}"
    if not corpus.exists():
        with open(path, "rb") as source, open(corpus, "wb") as target:
            target.write(source.read(megabytes << 20).rsplit(b"\n", 1)[0] + b"\n")
    tokenizer_dir = directory / "tokenizer"
    if not tokenizer_dir.exists():
        sample = directory / f"sample{path.suffix}"
        with open(corpus, "rb") as source, open(sample, "wb") as target:
            target.write(source.read(64 << 20).rsplit(b"\n", 1)[0] + b"\n")
        train_tokenizer([sample], tokenizer_dir, vocab_size, text_field=text_field)
    print(f"{corpus.name}: {corpus.stat().st_size / 1e6:,.0f} MB, {os.cpu_count()} CPU cores")
    print(f"{'round':>5} {'workers':>7} {'load before':>11} {'seconds':>8} {'cpu s':>7} {'main cpu s':>10} "
          f"{'peak RSS':>9}")
    walls: dict[int, list[float]] = {workers: [] for workers in workers_list}
    for index in range(rounds):
        for workers in workers_list if index % 2 == 0 else workers_list[::-1]:
            load = os.getloadavg()[0]
            code, seconds, cpu, peak, main_cpu = run_pretokenize(corpus, tokenizer_dir, directory / "scaling-shards",
                                                                 workers)
            if code != 0:
                print(f"error: pretokenize exited with {code}", file=sys.stderr)
                return 1
            walls[workers].append(seconds)
            print(f"{index + 1:5d} {workers:7d} {load:11.2f} {seconds:8.1f} {cpu:7.1f} {main_cpu:10.1f} "
                  f"{peak / 2**20:6.0f} MB", flush=True)
    first = workers_list[0]
    for workers in workers_list[1:]:
        speedups = [a / b for a, b in zip(walls[first], walls[workers], strict=True)]
        print(f"{workers} workers vs {first}: median speedup {statistics.median(speedups):.2f}x "
              f"(rounds: {', '.join(f'{x:.2f}' for x in speedups)}); load average now {os.getloadavg()[0]:.2f}")
    shutil.rmtree(directory / "scaling-shards", ignore_errors=True)
    return 0


def perturb(rng: random.Random, lines: list[str], number: int) -> str:
    """A variant of a document: lines shuffled a little, one dropped or repeated, two characters swapped."""
    lines = list(lines)
    if len(lines) > 2 and rng.random() < 0.5:
        i = rng.randrange(len(lines) - 1)
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
    if len(lines) > 3 and rng.random() < 0.3:
        del lines[rng.randrange(len(lines))]
    if rng.random() < 0.2:
        lines.append(rng.choice(lines))
    text = "\n".join(lines)
    if len(text) > 4:
        i = rng.randrange(len(text) - 1)
        text = text[:i] + text[i + 1] + text[i] + text[i + 2:]
    return f"{text}\n({number})"


def write_big_corpus(path: Path, size_bytes: int, seed: int = 0) -> None:
    """~`size_bytes` of JSONL {"text": ...}: about two Chinese documents for one English passage."""
    with open(SHARED / "zh_classics.jsonl", encoding="utf-8") as handle:
        chinese = [json.loads(line)["text"].split("\n") for line in handle if line.strip()]
    paragraphs = (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")
    english = [p.split("\n") for p in paragraphs if p.strip()]
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    written, number = 0, 0
    with open(tmp, "w", encoding="utf-8") as out:
        while written < size_bytes:
            batch = []
            for _doc in range(4096):
                number += 1
                if rng.random() < 0.67:
                    lines = rng.choice(chinese)
                else:  # a passage of a few speeches
                    start = rng.randrange(len(english) - 8)
                    lines = [line for p in english[start:start + rng.randint(1, 8)] for line in p]
                batch.append(json.dumps({"text": perturb(rng, lines, number)}, ensure_ascii=False) + "\n")
            chunk = "".join(batch)
            out.write(chunk)
            written += len(chunk.encode("utf-8"))
    tmp.rename(path)


def peak_memory(process: subprocess.Popen) -> tuple[int, float, float]:
    """(exit code, peak resident bytes of `process` and its children added up, CPU seconds of `process` itself as
    last seen), sampling every 0.2 s."""
    peak, own = 0, 0.0
    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            times = root.cpu_times()
            own = times.user + times.system
        except psutil.Error:
            pass
        time.sleep(0.2)
    return process.returncode, peak, own


def big(directory: Path, size_gb: float, vocab_size: int, workers: int) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / f"mixed-{size_gb:g}gb.jsonl"
    if not corpus.exists():
        print(f"writing {corpus} ...", flush=True)
        write_big_corpus(corpus, int(size_gb * 1e9))
    sample = directory / "sample.jsonl"
    with open(corpus, "rb") as source, open(sample, "wb") as target:
        target.write(source.read(64 << 20).rsplit(b"\n", 1)[0] + b"\n")
    tokenizer_dir = directory / "tokenizer"
    if not tokenizer_dir.exists():
        train_tokenizer([sample], tokenizer_dir, vocab_size)
    out = directory / "shards"
    load = os.getloadavg()[0]
    code, seconds, cpu_seconds, peak, main_cpu = run_pretokenize(corpus, tokenizer_dir, out, workers)
    if code != 0:
        print(f"error: pretokenize exited with {code}", file=sys.stderr)
        return 1
    stats = json.loads((out / STATS_FILE).read_text())
    megabytes = corpus.stat().st_size / 1e6
    print(f"{corpus.name}: {megabytes:,.0f} MB, {stats['totals']['documents_kept']:,} documents, "
          f"{stats['totals']['tokens']:,} tokens, vocab {stats['vocab_size']}, {workers} worker(s), "
          f"{os.cpu_count()} CPU cores, load average {load:.2f} before")
    print(f"{'seconds':>8} {'cpu s':>7} {'MB/s':>7} {'Mtok/s':>7} {'peak RSS':>9}")
    print(f"{seconds:8.1f} {cpu_seconds:7.1f} {megabytes / seconds:7.2f} {stats['totals']['tokens'] / seconds / 1e6:7.3f} "
          f"{peak / 2**20:7.0f} MB")
    print(f"main process alone: {main_cpu:.1f} CPU s (reading, writing, the split)")
    print(f"load average after: {os.getloadavg()[0]:.2f}; CPU seconds / {workers} = {cpu_seconds / workers:.0f} s "
          "(the wall time on that many quiet cores, if the work splits evenly)")
    goal = seconds <= 360 and peak < 2**30
    print(f"goal (<= 6 min, < 1 GB): {'PASS' if goal else 'FAIL'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="a .jsonl corpus")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best of each row is shown")
    parser.add_argument("--big", type=Path, default=None, help="directory (outside the repository) for the "
                        "large-corpus run")
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of the per-worker comparison")
    parser.add_argument("--scaling", type=int, default=0, metavar="MB", help="time the first MB megabytes of "
                        "--input with each of --workers, in --big (default: a temporary directory)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="an existing tokenizer directory: run only "
                        "the per-worker comparison, on the first --max-mb of --input (a corpus of any size)")
    parser.add_argument("--max-mb", type=int, default=64)
    args = parser.parse_args(argv)
    if args.tokenizer is not None:
        print_per_worker(per_worker(args.input, Tokenizer(args.tokenizer), args.text_field, args.rounds,
                                    args.max_mb << 20))
        return 0
    if args.scaling:
        if args.big is not None:
            return scaling(args.input, args.big, args.scaling, args.vocab_size, args.text_field, args.workers,
                           args.repeat)
        with tempfile.TemporaryDirectory() as scratch:
            return scaling(args.input, Path(scratch), args.scaling, args.vocab_size, args.text_field, args.workers,
                           args.repeat)
    if args.big is not None:
        return big(args.big, args.size_gb, args.vocab_size, max(args.workers))
    if not args.input.is_file():
        print(f"error: {args.input} not found", file=sys.stderr)
        return 2
    megabytes, vocab, rows, worker = compare(args.input, args.text_field, args.vocab_size, args.workers, args.repeat,
                                             args.rounds)
    base_wall, base_cpu = rows[0][1], rows[0][2]
    print(f"{args.input.name}: {megabytes:.1f} MB, vocab {vocab}, {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'':28} {'seconds':>8} {'cpu s':>7} {'MB/s':>7} {'Mtok/s':>7} {'vs sp.encode':>13} {'cpu vs':>7}")
    for name, wall, cpu, tokens in rows:
        print(f"{name:28} {wall:8.2f} {cpu:7.2f} {megabytes / wall:7.2f} {tokens / wall / 1e6:7.3f} "
              f"{base_wall / wall:12.2f}x {base_cpu / cpu:6.2f}x")
    print_per_worker(worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
