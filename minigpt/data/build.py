"""Build a dataset directory (train/ and val/ shards + dataset_stats.json) from raw files.

    raw files -> records (paragraphs or JSONL lines) -> parse + encode in worker processes
              -> cleaning, when asked (minigpt.data.cleaning: filters in the workers, duplicates here)
              -> one staging shard of every kept document, in input order (long pretraining documents
                 cut into pieces, see `cut_long_text`)
              -> deterministic split by document (seeded) -> train/ and val/ shards
              -> dataset_stats.json -> rename the staging directory into place

Bad records are counted per file with their first line numbers and skipped (or fail the run with
`strict=True`). Nothing appears at `out_dir` until the whole dataset is written.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minigpt.data.cleaning import DROP_REASONS, Cleaning, DuplicateFilter, document_drop_reason, text_hash
from minigpt.data.shards import KINDS, ShardReader, ShardWriter
from minigpt.data.sources import (
    Example,
    InputError,
    Skip,
    cut_long_text,
    expand_inputs,
    input_format,
    iter_raw_records,
    parse_record,
    record_bytes,
    record_columns,
)
from minigpt.fsutil import fsync_dir, fsync_file, make_staging_dir, replace_dir
from minigpt.i18n import _, docs_page
from minigpt.tokenizer import Tokenizer

STATS_FILE = "dataset_stats.json"
ENCODING_VERSION = 2
"""The encoding `build_dataset` writes for an input and a tokenizer model (a typed `▁` is escaped; tab and
newline have pieces of their own). It is part of train.py's cache key for pre-tokenized raw files: bump it
whenever that output changes, so the cache is rebuilt rather than reused."""
CHUNK_RECORDS = 256
CHUNK_BYTES = 1 << 20
FIRST_LINES = 5
"""How many line numbers of each skip reason the stats keep per file."""


class DatasetBuildError(ValueError):
    """Inputs that cannot become a dataset (nothing usable, or bad input under strict mode)."""


@dataclass
class FileStats:
    """What became of one input file: documents read, kept, skipped (by reason, with first lines), split."""

    path: str
    format: str
    bytes: int
    documents_read: int = 0
    documents_kept: int = 0
    documents_cut: int = 0
    """Kept documents longer than MAX_DOCUMENT_CHARS, each split into pieces (train/val count pieces)."""
    skipped: dict[str, int] = field(default_factory=dict)
    first_skipped_lines: dict[str, list[int]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    """Usable documents that cleaning dropped (duplicate, too_short, repetitive); not in documents_kept."""
    first_dropped_lines: dict[str, list[int]] = field(default_factory=dict)
    tokens: int = 0
    train_documents: int = 0
    val_documents: int = 0
    val_tokens: int = 0
    validation_share: float = 0.0

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        lines = self.first_skipped_lines.setdefault(reason, [])
        if len(lines) < FIRST_LINES:
            lines.append(line)

    def drop(self, reason: str, line: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        lines = self.first_dropped_lines.setdefault(reason, [])
        if len(lines) < FIRST_LINES:
            lines.append(line)

    def summary(self) -> str:
        template = _("{reason}: {count} (rows {lines})") if self.format == "parquet" \
            else _("{reason}: {count} (lines {lines})")
        parts = [template.format(
                     reason=reason, count=count,
                     lines=", ".join(map(str, self.first_skipped_lines[reason]))
                     + (", ..." if count > len(self.first_skipped_lines[reason]) else ""))
                 for reason, count in sorted(self.skipped.items())]
        return _("{path}: skipped {skipped} of {read}: {reasons}").format(
            path=self.path, skipped=sum(self.skipped.values()), read=self.documents_read, reasons="; ".join(parts))


@dataclass
class _Chunk:
    file_index: int
    fmt: str
    records: list[tuple[int, bytes]]
    nbytes: int


@dataclass
class _EncodedChunk:
    """A chunk's kept examples as one block of documents, and its skipped records.

    `num_kept` records were kept; they became `num_examples` examples (more when long documents were
    cut, `num_cut` of them).
    """

    file_index: int
    nbytes: int
    skips: list[Skip]
    num_kept: int
    num_cut: int
    num_examples: int
    tokens: np.ndarray
    lengths: np.ndarray
    loss_mask: np.ndarray | None = None
    records: list[dict] | None = None
    dropped: list[Skip] = field(default_factory=list)
    """Kept records that cleaning dropped (the reason: duplicate, too_short or repetitive)."""
    hashes: np.ndarray | None = None
    """With de-duplication: per kept record its text hash, first line and number of examples."""
    lines: np.ndarray | None = None
    pieces: np.ndarray | None = None


@dataclass
class _Job:
    kind: str
    text_field: str
    max_prompt_tokens: int | None
    cleaning: Cleaning = field(default_factory=Cleaning)


def _hash_parts(kind: str, example: Example) -> list[str]:
    """The strings two records must share (after normalising) to be duplicates: the text, or every role and
    content of the conversation(s), with the RLHF reference."""
    if kind == "pretrain":
        return [example.text]
    turns = example.messages if kind == "sft" else example.prompt_messages
    parts = [s for m in turns for s in (m["role"], m["content"])]
    if kind == "dpo":
        for response in (example.chosen, example.rejected):
            parts += ["\x1d"] + [s for m in response for s in (m["role"], m["content"])]
    if kind == "rlhf":
        parts += ["\x1d", example.extra.get("reference") or ""]
    return parts


def _encode_pretrain(tokenizer: Tokenizer, examples: list[Example]) -> tuple[list[list[int]], int]:
    """Token ids + EOS of each piece of each text, and how many texts were long enough to be cut."""
    pieces = [cut_long_text(e.text) for e in examples]
    encoded = tokenizer.encode_batch([piece for cut in pieces for piece in cut])
    return [ids + [tokenizer.eos_id] for ids in encoded], sum(len(cut) > 1 for cut in pieces)


def _encode_post_training(tokenizer: Tokenizer, job: _Job, example: Example) -> list[tuple] | Skip:
    """[(ids, mask, record)] per document of the example (two for DPO), or a Skip."""
    if job.kind == "sft":
        chat = tokenizer.encode_chat(example.messages)
        return [(chat.ids, chat.assistant_mask, None)]
    generation = job.kind == "rlhf"
    prompt = tokenizer.encode_chat(example.prompt_messages, add_generation_prompt=generation)
    if job.max_prompt_tokens is not None and len(prompt.ids) > job.max_prompt_tokens:
        return Skip(example.line, "prompt_too_long", _("{count} tokens").format(count=len(prompt.ids)))
    if generation:
        return [(prompt.ids, None, {"messages": example.prompt_messages, **example.extra})]
    documents = []
    for response in (example.chosen, example.rejected):
        chat = tokenizer.encode_chat(example.prompt_messages + response)
        # earlier assistant turns of the prompt are not the response
        mask = [0] * len(prompt.ids) + chat.assistant_mask[len(prompt.ids):]
        documents.append((chat.ids, mask, None))
    return documents


def _encode_chunk(tokenizer: Tokenizer, job: _Job, chunk: _Chunk) -> _EncodedChunk:
    parsed = [parse_record(job.kind, chunk.fmt, line, raw, job.text_field) for line, raw in chunk.records]
    skips = [p for p in parsed if isinstance(p, Skip)]
    examples = [p for p in parsed if isinstance(p, Example)]
    dropped = []
    if job.cleaning.filters_documents and job.kind == "pretrain":
        reasons = [document_drop_reason(job.cleaning, e.text) for e in examples]
        dropped = [Skip(e.line, reason) for e, reason in zip(examples, reasons, strict=True) if reason]
        examples = [e for e, reason in zip(examples, reasons, strict=True) if not reason]
    num_cut = 0
    if job.kind == "pretrain":
        encoded, num_cut = _encode_pretrain(tokenizer, examples)
        documents = [(ids, None, None) for ids in encoded]
        num_kept, num_examples, kept = len(examples), len(documents), examples
    else:
        documents, num_examples, kept = [], 0, []
        for example in examples:
            result = _encode_post_training(tokenizer, job, example)
            if isinstance(result, Skip):
                skips.append(result)
            else:
                documents += result
                num_examples += 1
                kept.append(example)
        num_kept = num_examples
    skips.sort(key=lambda skip: skip.line)
    lengths = np.array([len(ids) for ids, _mask, _record in documents], dtype=np.int64)
    # chain.from_iterable flattens in C: ~30% faster than a nested generator over millions of ids.
    tokens = np.fromiter(chain.from_iterable(ids for ids, _mask, _record in documents), dtype=np.int64,
                         count=int(lengths.sum()))
    mask = None
    if job.kind in ("sft", "dpo"):
        mask = np.fromiter(chain.from_iterable(doc_mask for _ids, doc_mask, _record in documents), dtype=np.uint8,
                           count=int(lengths.sum()))
    records = [record for _ids, _mask, record in documents] if job.kind == "rlhf" else None
    encoded = _EncodedChunk(chunk.file_index, chunk.nbytes, skips, num_kept, num_cut, num_examples, tokens, lengths,
                            mask, records, dropped)
    if job.cleaning.dedup:
        encoded.hashes = np.array([text_hash(_hash_parts(job.kind, e)) for e in kept], dtype=np.uint64)
        encoded.lines = np.array([e.line for e in kept], dtype=np.int64)
        encoded.pieces = np.array([len(cut_long_text(e.text)) for e in kept] if job.kind == "pretrain"
                                  else [1] * len(kept), dtype=np.int64)
    return encoded


def _drop_duplicates(encoded: _EncodedChunk, seen: DuplicateFilter, docs_per_example: int) -> None:
    """Remove from `encoded` the records whose hash `seen` already holds (or an earlier record of the chunk)."""
    keep = seen.first_seen(encoded.hashes)
    if keep.all():
        return
    documents = np.repeat(np.repeat(keep, encoded.pieces), docs_per_example)
    tokens = np.repeat(documents, encoded.lengths)
    encoded.tokens, encoded.lengths = encoded.tokens[tokens], encoded.lengths[documents]
    if encoded.loss_mask is not None:
        encoded.loss_mask = encoded.loss_mask[tokens]
    if encoded.records is not None:
        encoded.records = [r for r, k in zip(encoded.records, documents, strict=True) if k]
    encoded.dropped = sorted(encoded.dropped + [Skip(int(line), "duplicate") for line in encoded.lines[~keep]],
                             key=lambda drop: drop.line)
    encoded.num_kept = int(keep.sum())
    encoded.num_examples = int(encoded.pieces[keep].sum())
    encoded.num_cut = int((encoded.pieces[keep] > 1).sum())


_WORKER: tuple[Tokenizer, _Job] | None = None


def _init_worker(tokenizer_dir: str, job: _Job) -> None:
    global _WORKER
    _WORKER = (Tokenizer(tokenizer_dir), job)


def _encode_in_worker(chunk: _Chunk) -> _EncodedChunk:
    tokenizer, job = _WORKER
    return _encode_chunk(tokenizer, job, chunk)


def _chunks(files: list[Path], stats: list[FileStats], strict: bool, columns: list[str] | None) -> Iterator[_Chunk]:
    """Records of every file in order, in chunks; file-level problems go into `stats` (or raise)."""
    for index, path in enumerate(files):
        records: list[tuple[int, bytes | dict]] = []
        nbytes, seen = 0, 0
        try:
            for line, raw in iter_raw_records(path, columns):
                records.append((line, raw))
                nbytes += record_bytes(raw)
                seen += 1
                if len(records) >= CHUNK_RECORDS or nbytes >= CHUNK_BYTES:
                    yield _Chunk(index, stats[index].format, records, nbytes)
                    records, nbytes = [], 0
        except InputError as err:
            if strict:
                raise DatasetBuildError(_("{error} (strict mode)").format(error=err)) from err
            print(_("[minigpt] warning: {error}; kept what was read before").format(error=err), file=sys.stderr)
            stats[index].skip("unreadable_file", seen + 1)
            stats[index].documents_read += 1  # the record cut off (and whatever followed it) is lost
        if records:
            yield _Chunk(index, stats[index].format, records, nbytes)
        if seen == 0 and not stats[index].skipped:
            if strict:
                raise DatasetBuildError(_("{path}: empty file (strict mode)").format(path=path))
            stats[index].skip("empty_file", 0)


def _bounded_ordered_map(pool: ProcessPoolExecutor, chunks: Iterator[_Chunk],
                         window: int) -> Iterator[_EncodedChunk]:
    """Results of `_encode_in_worker` over `chunks` in order, with at most `window` chunks in flight.

    (Pool.imap would read the whole input ahead into its queue; a dead worker raises here
    instead of hanging.)
    """
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.submit(_encode_in_worker, chunk))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _encode_all(files: list[Path], stats: list[FileStats], tokenizer: Tokenizer, job: _Job, workers: int,
                strict: bool, progress: bool) -> Iterator[_EncodedChunk]:
    """Encoded chunks of every file, in input order; skipped records counted in `stats` (or raised)."""
    # compressed inputs: their records are larger than the files, so no total
    total = None if any(s.path.endswith(".gz") or s.format == "parquet" for s in stats) else sum(s.bytes for s in stats)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=_("pretokenize"), disable=not progress)
    chunks = _chunks(files, stats, strict, record_columns(job.kind, job.text_field))
    seen = DuplicateFilter() if job.cleaning.dedup else None
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),  # fork is unsafe
                                   initializer=_init_worker, initargs=(str(tokenizer.directory), job))
        results = _bounded_ordered_map(pool, chunks, window=4 * workers)
    else:
        results = (_encode_chunk(tokenizer, job, chunk) for chunk in chunks)
    try:
        for encoded in results:
            bar.update(encoded.nbytes)
            file_stats = stats[encoded.file_index]
            if encoded.skips and strict:
                skip = encoded.skips[0]
                where = _("{path}: row {line}") if file_stats.format == "parquet" else "{path}:{line}"
                message = (_("{where}: {reason} ({detail}) (strict mode)") if skip.detail
                           else _("{where}: {reason} (strict mode)"))
                raise DatasetBuildError(message.format(where=where.format(path=file_stats.path, line=skip.line),
                                                       reason=skip.reason, detail=skip.detail))
            if seen is not None:
                _drop_duplicates(encoded, seen, 2 if job.kind == "dpo" else 1)
            for skip in encoded.skips:
                file_stats.skip(skip.reason, skip.line)
            for drop in encoded.dropped:
                file_stats.drop(drop.reason, drop.line)
            file_stats.documents_read += len(encoded.skips) + len(encoded.dropped) + encoded.num_kept
            file_stats.documents_kept += encoded.num_kept
            file_stats.documents_cut += encoded.num_cut
            yield encoded
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def split_examples(num_examples: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the examples that go to validation: a seeded choice of round(fraction x n).

    At least one validation and one training example whenever the fraction is positive and there
    are two or more examples.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(_("val_fraction must be in [0, 1), got {value}").format(value=val_fraction))
    is_val = np.zeros(num_examples, dtype=bool)
    count = round(val_fraction * num_examples)
    if val_fraction > 0 and num_examples >= 2:
        count = min(max(1, count), num_examples - 1)
    elif num_examples < 2:
        count = 0
    is_val[np.random.default_rng(seed).permutation(num_examples)[:count]] = True
    return is_val


def _write_split(staged: ShardReader, docs_per_example: int, select: np.ndarray, writer: ShardWriter,
                 extra_meta: dict) -> None:
    """Copy the selected examples of the staging shard into `writer`, keeping their order."""
    documents = np.repeat(select, docs_per_example)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], documents.astype(np.int8), [0]])))
    for first, end in zip(edges[::2], edges[1::2], strict=True):  # runs of consecutive selected documents
        start, stop = int(staged.offsets[first]), int(staged.offsets[end])
        writer.add_many(staged.tokens[start:stop], np.diff(staged.offsets[first:end + 1]),
                        None if staged.loss_mask is None else staged.loss_mask[start:stop],
                        None if staged.records is None else staged.records[first:end])
    writer.close({**extra_meta, "num_examples": int(select.sum())})


def build_dataset(inputs: list[str | Path], out_dir: str | Path, tokenizer: Tokenizer, kind: str = "pretrain",
                  val_fraction: float = 0.01, seed: int = 1337, workers: int = 1, text_field: str = "text",
                  strict: bool = False, progress: bool = True, max_prompt_tokens: int | None = None,
                  overwrite: bool = False, cleaning: Cleaning | None = None) -> Path:
    """Pre-tokenize `inputs` (files or globs) into the dataset directory `out_dir` and return it.

    kind: 'pretrain' (text, EOS after each document), 'sft' (conversations with an assistant loss
    mask), 'dpo' (chosen/rejected pairs, mask on the responses) or 'rlhf' (prompts + references).
    cleaning: de-duplication and document filters (none by default; see minigpt.data.cleaning).
    The split is by example, seeded: the same inputs and seed give the same shards for any
    number of workers. See docs/data.md for the input schemas and the files written.
    """
    if kind not in KINDS:
        raise DatasetBuildError(_("kind {kind!r} is not one of {kinds}").format(kind=kind, kinds=KINDS))
    cleaning = cleaning or Cleaning()
    if cleaning.filters_documents and kind != "pretrain":
        raise DatasetBuildError(_("--min-chars and --max-repeated-lines filter pretraining documents; {kind} data "
                                  "takes --dedup only").format(kind=kind))
    split_examples(0, val_fraction, seed)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DatasetBuildError(_("{path}: already exists; remove it or pass overwrite (--overwrite)").format(
            path=out_dir))
    try:
        files = expand_inputs(inputs)
    except InputError as err:
        raise DatasetBuildError(str(err)) from err
    started = time.monotonic()
    stats = [FileStats(str(path), input_format(path), path.stat().st_size) for path in files]
    job = _Job(kind, text_field, max_prompt_tokens, cleaning)
    docs_per_example = 2 if kind == "dpo" else 1
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(out_dir.parent, prefix=f".{out_dir.name}.building-")
    try:
        common = {"vocab_size": tokenizer.vocab_size, "kind": kind, "tokenizer_checksum": tokenizer.checksum,
                  "sources": [s.path for s in stats]}
        staged_writer = ShardWriter(staging / "all", **common)
        example_files = []
        for encoded in _encode_all(files, stats, tokenizer, job, max(1, workers), strict, progress):
            staged_writer.add_many(encoded.tokens, encoded.lengths, encoded.loss_mask, encoded.records)
            example_files += [encoded.file_index] * encoded.num_examples
        staged_writer.close()
        for file_stats in stats:
            if file_stats.skipped:
                print(_("[minigpt] {note}").format(note=file_stats.summary()), file=sys.stderr)
        _print_cleaning(stats)
        if not example_files:
            raise DatasetBuildError(_("no usable {kind} examples in {paths} (see the skip reasons above and {docs} "
                                      "for the formats)").format(kind=kind, paths=", ".join(s.path for s in stats),
                                                                 docs=docs_page("data.md")))
        staged = ShardReader(staging / "all")
        is_val = split_examples(len(example_files), val_fraction, seed)
        split_meta = {"seed": seed, "val_fraction": val_fraction}
        _write_split(staged, docs_per_example, ~is_val, ShardWriter(staging / "train", **common),
                     {**split_meta, "split": "train"})
        _write_split(staged, docs_per_example, is_val, ShardWriter(staging / "val", **common),
                     {**split_meta, "split": "val"})
        example_tokens = staged.document_lengths().reshape(-1, docs_per_example).sum(axis=1)
        _fill_split_stats(stats, np.array(example_files), example_tokens, is_val)
        del staged
        shutil.rmtree(staging / "all")
        _write_stats(staging / STATS_FILE, stats, common, {**split_meta, "cleaning": cleaning.as_dict()}, text_field,
                     time.monotonic() - started)
        fsync_dir(staging)
        replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _fill_split_stats(stats: list[FileStats], example_files: np.ndarray, example_tokens: np.ndarray,
                      is_val: np.ndarray) -> None:
    for index, file_stats in enumerate(stats):
        mine = example_files == index
        file_stats.tokens = int(example_tokens[mine].sum())
        file_stats.val_documents = int((mine & is_val).sum())
        file_stats.train_documents = int(mine.sum()) - file_stats.val_documents
        file_stats.val_tokens = int(example_tokens[mine & is_val].sum())
        examples = int(mine.sum())
        file_stats.validation_share = round(file_stats.val_documents / examples, 6) if examples else 0.0


def _print_cleaning(stats: list[FileStats]) -> None:
    dropped = {reason: sum(s.dropped.get(reason, 0) for s in stats) for reason in DROP_REASONS}
    if any(dropped.values()):
        print(_("[minigpt] cleaning dropped {dropped} of {read} documents: {reasons}").format(
            dropped=sum(dropped.values()), read=sum(s.documents_read for s in stats),
            reasons=", ".join(f"{reason} {count}" for reason, count in dropped.items() if count)), file=sys.stderr)


def _write_stats(path: Path, stats: list[FileStats], common: dict, split_meta: dict, text_field: str,
                 seconds: float) -> None:
    keys = ("documents_read", "documents_kept", "documents_cut", "tokens", "train_documents", "val_documents",
            "val_tokens")
    totals = {key: sum(getattr(s, key) for s in stats) for key in keys}
    skipped: dict[str, int] = {}
    for file_stats in stats:
        for reason, count in file_stats.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    totals["documents_dropped"] = sum(sum(s.dropped.values()) for s in stats)
    totals["documents_skipped"] = totals["documents_read"] - totals["documents_kept"] - totals["documents_dropped"]
    totals["skipped"] = dict(sorted(skipped.items()))
    totals["dropped"] = {reason: sum(s.dropped.get(reason, 0) for s in stats) for reason in DROP_REASONS}
    report = {**{k: v for k, v in common.items() if k != "sources"}, **split_meta, "text_field": text_field,
              "totals": totals, "files": [asdict(s) for s in stats], "build_seconds": round(seconds, 3)}
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    fsync_file(path)
