"""Build a dataset directory (train/ and val/ shards + dataset_stats.json) from raw files, streaming.

    raw files -> blocks of whole records (~1 MB, read in order)            `_read`
              -> parse + encode each block, in worker processes or here   `_encode_chunk`
                 (a per-document filter fits there, on the parsed texts, before the encode)
              -> one staging shard of every kept document, in input order (long pretraining documents
                 cut into pieces, see `cut_long_text`), written as blocks come back, with a progress
                 record saved every CHECKPOINT_SECONDS                  `_encode_into`
              -> deterministic split by document (seeded), streamed from the staging shard in bounded
                 blocks -> train/ and val/ shards                        `_write_splits`
              -> dataset_stats.json -> rename into place

Memory does not grow with the input: a few blocks are in flight, the shards are written as they
come, and the split reads the staging shard block by block (what grows is ~9 bytes per document for
the seeded choice of validation documents). The staging directory `.NAME.partial` beside `NAME`
keeps the staging shard and `progress.json` (input position, shard sizes, stats so far), so a run
that is interrupted (Ctrl-C, a kill, a crash) continues where its last progress record was when
the same command is run again; other inputs or options start over (see `_build_key`).

Bad records are counted per file with their first line numbers and skipped (or fail the run with
`strict=True`). Nothing appears at `out_dir` until the whole dataset is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minigpt.data.cleaning import DROP_REASONS, Cleaning, DuplicateFilter, document_drop_reason, text_hash
from minigpt.data.shards import (
    KINDS,
    LOSS_MASK,
    OFFSETS,
    RECORDS,
    TOKENS,
    ShardError,
    ShardWriter,
    token_dtype,
)
from minigpt.data.sources import (
    MAX_DOCUMENT_CHARS,
    Block,
    Example,
    InputError,
    Skip,
    block_records,
    cut_long_text,
    expand_inputs,
    input_format,
    iter_blocks,
    iter_raw_records,
    parse_record,
    pretrain_texts,
    record_bytes,
    record_columns,
)
from minigpt.fsutil import atomic_write, atomic_write_text, fsync_dir, fsync_file, held, in_use, replace_dir
from minigpt.i18n import _, docs_page
from minigpt.tokenizer import Tokenizer

STATS_FILE = "dataset_stats.json"
PROGRESS_FILE = "progress.json"
ENCODING_VERSION = 2
"""The encoding `build_dataset` writes for an input and a tokenizer model (a typed `▁` is escaped; tab and
newline have pieces of their own). It is part of train.py's cache key for pre-tokenized raw files: bump it
whenever that output changes, so the cache is rebuilt rather than reused."""
CHUNK_BYTES = 1 << 20
"""Input per worker task (whole records: a longer record makes a longer chunk)."""
CHUNK_RECORDS = 4096
"""Parquet rows per worker task at most."""
IN_PROCESS_BYTES = 64 << 20
"""Inputs smaller than this are encoded in the main process whatever `workers` says (sentencepiece's own
threads still use them): starting a worker costs more than it saves on them."""
CHECKPOINT_SECONDS = 30.0
"""How often the progress record of a build is saved (an interrupted build loses at most this much)."""
SPLIT_BLOCK_TOKENS, SPLIT_BLOCK_DOCUMENTS = 1 << 20, 1 << 16
"""The split copies the staging shard to train/ and val/ about this many tokens at a time, looking at most
this many documents ahead (bounded memory)."""
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
    """Whole records of one file, for one worker task."""

    file_index: int
    fmt: str
    block: Block
    """Whole lines or paragraphs of a text file; for Parquet, `block.data` is empty and `records` holds the
    rows (`block.end_line`: the row after them, the resume position)."""
    records: list[tuple[int, dict]] | None = None


@dataclass
class _FileEnd:
    """The end of a file's records in the stream of chunks, and the error that cut it short, if any."""

    file_index: int
    end_line: int
    error: InputError | None = None


@dataclass
class _EncodedChunk:
    """A chunk's kept examples as one block of documents, and its skipped records.

    `num_kept` records were kept; they became `num_examples` examples (more when long documents were
    cut, `num_cut` of them). `end`/`end_line`: where the chunk ended in its file (the resume position).
    """

    file_index: int
    end: int
    end_line: int
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
    dtype: str = "uint16"
    """The shards' token dtype: workers send tokens back in it (half the bytes of int32)."""
    threads: int = 1
    """sentencepiece threads per encode call (the in-process path gives it the workers asked for)."""
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


def _encode_pretrain(tokenizer: Tokenizer, job: _Job, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokens (ids + EOS of each piece of each text, back to back) and lengths, and how many texts were cut."""
    pieces, num_cut = texts, 0
    if max(map(len, texts), default=0) > MAX_DOCUMENT_CHARS:
        cut = [cut_long_text(text) for text in texts]
        pieces, num_cut = [piece for parts in cut for piece in parts], sum(len(parts) > 1 for parts in cut)
    tokens, lengths = tokenizer.encode_documents(pieces, job.threads)
    return tokens, lengths, num_cut


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
    records = chunk.records if chunk.records is not None else block_records(chunk.fmt, chunk.block)
    mask, kept_records, dropped, kept = None, None, [], []
    if job.kind == "pretrain":
        lines, texts, skips = pretrain_texts(chunk.fmt, records, job.text_field)
        if job.cleaning.filters_documents:  # the per-document filters, before the encode
            reasons = [document_drop_reason(job.cleaning, text) for text in texts]
            dropped = [Skip(line, reason) for line, reason in zip(lines, reasons, strict=True) if reason]
            lines = [line for line, reason in zip(lines, reasons, strict=True) if not reason]
            texts = [text for text, reason in zip(texts, reasons, strict=True) if not reason]
        tokens, lengths, num_cut = _encode_pretrain(tokenizer, job, texts)
        num_kept, num_examples = len(texts), len(lengths)
        kept = [Example(line, text=text) for line, text in zip(lines, texts, strict=True)] if job.cleaning.dedup \
            else []
    else:
        parsed = [parse_record(job.kind, chunk.fmt, line, raw, job.text_field) for line, raw in records]
        skips = [p for p in parsed if isinstance(p, Skip)]
        documents, num_examples, num_cut = [], 0, 0
        for example in (p for p in parsed if isinstance(p, Example)):
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
        if job.kind in ("sft", "dpo"):
            mask = np.fromiter(chain.from_iterable(doc_mask for _ids, doc_mask, _record in documents),
                               dtype=np.uint8, count=int(lengths.sum()))
        kept_records = [record for _ids, _mask, record in documents] if job.kind == "rlhf" else None
    nbytes = sum(record_bytes(raw) for _line, raw in records) if chunk.records is not None else len(chunk.block.data)
    encoded = _EncodedChunk(chunk.file_index, chunk.block.end, chunk.block.end_line, nbytes, skips, num_kept, num_cut,
                            num_examples, tokens.astype(job.dtype), lengths, mask, kept_records, dropped)
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
    # Ctrl-C reaches the whole process group: the main process stops the build (keeping what it wrote) and
    # shuts the workers down; a worker of its own would die mid-task and leave the pool broken.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER = (Tokenizer(tokenizer_dir), job)


def _encode_in_worker(chunk: _Chunk) -> _EncodedChunk:
    tokenizer, job = _WORKER
    return _encode_chunk(tokenizer, job, chunk)


@dataclass
class _Position:
    """Where reading stands: file `file`, byte `offset` (a record boundary), line `line`."""

    file: int = 0
    offset: int = 0
    line: int = 1


def _read(files: list[Path], fmts: list[str], start: _Position, columns: list[str] | None
          ) -> Iterator[_Chunk | _FileEnd]:
    """Chunks of every file from `start` on, in order, each file's followed by its `_FileEnd`."""
    for index in range(start.file, len(files)):
        offset, line = (start.offset, start.line) if index == start.file else (0, 1)
        try:
            if fmts[index] == "parquet":
                for chunk in _parquet_chunks(files[index], index, line, columns):
                    yield chunk
                    line = chunk.block.end_line
            else:
                for block in iter_blocks(files[index], offset, line, CHUNK_BYTES):
                    yield _Chunk(index, fmts[index], block)
                    line = block.end_line
        except InputError as err:
            yield _FileEnd(index, line, err)
            continue
        yield _FileEnd(index, line)


def _parquet_chunks(path: Path, index: int, first_row: int, columns: list[str] | None) -> Iterator[_Chunk]:
    """Rows of a Parquet file from `first_row` on (a resumed build passes over the earlier ones undecoded), in
    chunks of CHUNK_RECORDS rows or CHUNK_BYTES of text."""
    records, nbytes = [], 0
    for row, raw in iter_raw_records(path, columns, first_row):
        records.append((row, raw))
        nbytes += record_bytes(raw)
        if len(records) >= CHUNK_RECORDS or nbytes >= CHUNK_BYTES:
            yield _Chunk(index, "parquet", Block(b"", records[0][0], 0, row + 1), records)
            records, nbytes = [], 0
    if records:
        yield _Chunk(index, "parquet", Block(b"", records[0][0], 0, records[-1][0] + 1), records)


def _bounded_ordered_map(pool: ProcessPoolExecutor, items: Iterator[_Chunk | _FileEnd],
                         window: int) -> Iterator[_EncodedChunk | _FileEnd]:
    """`_encode_in_worker` of each chunk (file ends passed through) in order, at most `window` in flight.

    (Pool.imap would read the whole input ahead into its queue; a dead worker raises here
    instead of hanging.)
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(_encode_in_worker, item) if isinstance(item, _Chunk) else item)
        while len(pending) >= window or (pending and not isinstance(pending[0], Future)):
            head = pending.popleft()
            yield head.result() if isinstance(head, Future) else head
    while pending:
        head = pending.popleft()
        yield head.result() if isinstance(head, Future) else head


def _encoded(files: list[Path], stats: list[FileStats], tokenizer: Tokenizer, job: _Job, workers: int,
             start: _Position) -> Iterator[_EncodedChunk | _FileEnd]:
    """Encoded chunks and file ends from `start` on, in input order: in `workers` processes when the input
    is large enough to pay for starting them (`IN_PROCESS_BYTES`), else here."""
    items = _read(files, [s.format for s in stats], start, record_columns(job.kind, job.text_field))
    remaining = sum(s.bytes for s in stats[start.file:]) - start.offset
    if workers <= 1 or remaining < IN_PROCESS_BYTES:
        local = replace(job, threads=max(1, workers))
        yield from (_encode_chunk(tokenizer, local, item) if isinstance(item, _Chunk) else item for item in items)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),  # fork is unsafe
                               initializer=_init_worker, initargs=(str(tokenizer.directory), job))
    try:
        yield from _bounded_ordered_map(pool, items, window=4 * workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Progress:
    """What the staging directory holds so far: saved as progress.json, the resume point of a build."""

    key: str
    position: _Position = field(default_factory=_Position)
    shard: dict | None = None
    """The staging shard's `ShardWriter.sync()` position."""
    examples: list[int] = field(default_factory=list)
    """Examples of each file in the staging shard (a file's examples are consecutive, in file order)."""
    stats: list[dict] = field(default_factory=list)
    done: bool = False
    """Every input was read: what is left is the split."""

    def save(self, directory: Path) -> None:
        atomic_write_text(directory / PROGRESS_FILE, json.dumps(asdict(self), ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: Path) -> _Progress | None:
        try:
            data = json.loads((directory / PROGRESS_FILE).read_text(encoding="utf-8"))
            return cls(**{**data, "position": _Position(**data["position"])})
        except (OSError, ValueError, TypeError, KeyError):
            return None


def _build_key(files: list[Path], tokenizer: Tokenizer, job: _Job, strict: bool) -> str:
    """What the staging shard depends on: each input's path, size and modification time, the tokenizer, the
    kind and its options, cleaning, strict mode and the encoding version (the split's seed and share do not count:
    the split is redone from the staging shard)."""
    inputs = []
    for path in files:
        info = path.stat()
        inputs.append([str(path.resolve()), info.st_size, info.st_mtime_ns])
    key = {"inputs": inputs, "tokenizer": tokenizer.checksum, "kind": job.kind, "text_field": job.text_field,
           "max_prompt_tokens": job.max_prompt_tokens, "strict": strict, "encoding": ENCODING_VERSION,
           "cleaning": job.cleaning.as_dict()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _check(encoded: _EncodedChunk | _FileEnd, stats: list[FileStats], strict: bool) -> None:
    """Count a chunk's skipped records or a file's end in `stats`; under strict mode, raise on the first."""
    file_stats = stats[encoded.file_index]
    if isinstance(encoded, _FileEnd):
        if encoded.error is not None:
            if strict:
                raise DatasetBuildError(_("{error} (strict mode)").format(error=encoded.error)) from encoded.error
            print(_("[minigpt] warning: {error}; kept what was read before").format(error=encoded.error),
                  file=sys.stderr)
            file_stats.skip("unreadable_file", encoded.end_line)
            file_stats.documents_read += 1  # the record cut off (and whatever followed it) is lost
        if file_stats.documents_read == 0 and not file_stats.skipped:
            if strict:
                raise DatasetBuildError(_("{path}: empty file (strict mode)").format(path=file_stats.path))
            file_stats.skip("empty_file", 0)
        return
    if encoded.skips and strict:
        skip = encoded.skips[0]
        where = _("{path}: row {line}") if file_stats.format == "parquet" else "{path}:{line}"
        message = (_("{where}: {reason} ({detail}) (strict mode)") if skip.detail
                   else _("{where}: {reason} (strict mode)"))
        raise DatasetBuildError(message.format(where=where.format(path=file_stats.path, line=skip.line),
                                               reason=skip.reason, detail=skip.detail))
    for skip in encoded.skips:
        file_stats.skip(skip.reason, skip.line)
    for drop in encoded.dropped:
        file_stats.drop(drop.reason, drop.line)
    file_stats.documents_read += len(encoded.skips) + len(encoded.dropped) + encoded.num_kept
    file_stats.documents_kept += encoded.num_kept
    file_stats.documents_cut += encoded.num_cut


def _encode_into(writer: ShardWriter, progress: _Progress, partial: Path, files: list[Path],
                 stats: list[FileStats], tokenizer: Tokenizer, job: _Job, workers: int, strict: bool,
                 show_progress: bool, checkpoint_seconds: float, on_checkpoint: Callable[[_Progress], None] | None
                 ) -> None:
    """Encode the inputs from `progress.position` on into the staging shard `writer`, saving `progress`
    every `checkpoint_seconds` (after syncing the shard, so the record never runs ahead of the files)."""
    # compressed inputs: their records are larger than the files, so no total
    total = None if any(s.path.endswith(".gz") or s.format == "parquet" for s in stats) else sum(s.bytes for s in stats)
    done_bytes = sum(s.bytes for s in stats[:progress.position.file]) + progress.position.offset
    bar = tqdm(total=total, initial=done_bytes if total else 0, unit="B", unit_scale=True,
               desc=_("pretokenize"), disable=not show_progress)
    last = time.monotonic()
    seen = _load_seen(partial, progress) if job.cleaning.dedup else None

    def checkpoint() -> None:
        progress.shard = writer.sync()
        progress.stats = [asdict(s) for s in stats]
        if seen is not None:  # the documents seen so far: a resumed build must still drop their duplicates
            _save_seen(partial, seen)
        progress.save(partial)
        if on_checkpoint is not None:
            on_checkpoint(progress)

    with _ctrl_c_between_blocks() as stop:
        try:
            for encoded in _encoded(files, stats, tokenizer, job, workers, progress.position):
                if seen is not None and isinstance(encoded, _EncodedChunk):
                    _drop_duplicates(encoded, seen, 2 if job.kind == "dpo" else 1)
                _check(encoded, stats, strict)
                if isinstance(encoded, _FileEnd):
                    progress.position = _Position(encoded.file_index + 1)
                else:
                    bar.update(encoded.nbytes)
                    writer.add_many(encoded.tokens, encoded.lengths, encoded.loss_mask, encoded.records)
                    progress.examples[encoded.file_index] += encoded.num_examples
                    progress.position = _Position(encoded.file_index, encoded.end, encoded.end_line)
                if stop or time.monotonic() - last >= checkpoint_seconds:
                    checkpoint()
                    last = time.monotonic()
                if stop:
                    raise KeyboardInterrupt
            progress.done = True
            checkpoint()
        finally:
            bar.close()


SEEN_FILE = "dedup.npy"


def _save_seen(partial: Path, seen: DuplicateFilter) -> None:
    """The de-duplication table beside the progress record (its hash table as it is: written atomically)."""
    def write(handle) -> None:
        np.save(handle, np.append(seen._table, np.uint64(seen.count)))
    atomic_write(partial / SEEN_FILE, write)


def _load_seen(partial: Path, progress: _Progress) -> DuplicateFilter:
    """The de-duplication table an interrupted build saved with its progress, or an empty one."""
    seen = DuplicateFilter()
    if progress.shard and progress.shard["documents"] and (partial / SEEN_FILE).is_file():
        saved = np.load(partial / SEEN_FILE, allow_pickle=False)
        seen._table, seen.count = saved[:-1].copy(), int(saved[-1])
    return seen


@contextlib.contextmanager
def _ctrl_c_between_blocks() -> Iterator[list]:
    """While the block runs, a first Ctrl-C only fills the yielded list (the encode loop then saves its
    progress after the block in hand and stops, so a rerun continues from exactly there); a second one
    interrupts at once. Outside the main thread, or where SIGINT is not Python's default, nothing changes."""
    stop: list = []
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield stop
        return

    def first_then_default(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop.append(signum)

    signal.signal(signal.SIGINT, first_then_default)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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


def build_dataset(inputs: list[str | Path], out_dir: str | Path, tokenizer: Tokenizer, kind: str = "pretrain",
                  val_fraction: float = 0.01, seed: int = 1337, workers: int = 1, text_field: str = "text",
                  strict: bool = False, progress: bool = True, max_prompt_tokens: int | None = None,
                  overwrite: bool = False, cleaning: Cleaning | None = None,
                  checkpoint_seconds: float = CHECKPOINT_SECONDS,
                  on_checkpoint: Callable[[_Progress], None] | None = None) -> Path:
    """Pre-tokenize `inputs` (files or globs) into the dataset directory `out_dir` and return it.

    kind: 'pretrain' (text, EOS after each document), 'sft' (conversations with an assistant loss
    mask), 'dpo' (chosen/rejected pairs, mask on the responses) or 'rlhf' (prompts + references).
    cleaning: de-duplication and document filters (none by default; see minigpt.data.cleaning).
    The split is by example, seeded: the same inputs and seed give the same shards for any
    number of workers, and for a run interrupted and run again. `on_checkpoint` is called after each
    progress record is saved. See docs/data.md for the input schemas and the files written.
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
    job = _Job(kind, text_field, max_prompt_tokens, token_dtype(tokenizer.vocab_size).name, cleaning=cleaning)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    if in_use(partial):
        raise DatasetBuildError(_("{path}: another pretokenize is writing {out} now").format(path=partial,
                                                                                             out=out_dir))
    common = {"vocab_size": tokenizer.vocab_size, "kind": kind, "tokenizer_checksum": tokenizer.checksum,
              "sources": [s.path for s in stats]}
    state, writer = _resume_or_start(partial, _build_key(files, tokenizer, job, strict), len(files), common)
    if state.stats:  # continue an interrupted build
        stats = [FileStats(**s) for s in state.stats]
    with held(partial):
        try:
            if not state.done:
                _encode_into(writer, state, partial, files, stats, tokenizer, job, workers, strict, progress,
                             checkpoint_seconds, on_checkpoint)
        except DatasetBuildError:  # the input must change: nothing to resume
            writer.abandon()
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except BaseException:
            writer.abandon()  # kept, with the progress record, for the next run of the same command
            raise
        writer.abandon()
        try:
            _finish(partial, out_dir, state, stats, common, kind, val_fraction, seed, text_field, cleaning, started)
        except DatasetBuildError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def _resume_or_start(partial: Path, key: str, num_files: int, common: dict) -> tuple[_Progress, ShardWriter]:
    """The progress of an interrupted build of the same inputs and options in `partial` and its staging shard
    reopened there, or a fresh start (a staging directory of other inputs or options, or one whose files do
    not match its progress record, is removed, with a message)."""
    if partial.exists():
        found = _Progress.load(partial)
        if found is not None and found.key == key and found.shard is not None:
            try:
                writer = ShardWriter(partial / "all", **common, resume=found.shard)
            except (OSError, ShardError):
                pass
            else:
                position = found.position
                print(_("[minigpt] resuming the interrupted build in {path} (file {file} of {files}, line {line})")
                      .format(path=partial, file=min(position.file + 1, num_files), files=num_files,
                              line=position.line), file=sys.stderr)
                return found, writer
        print(_("[minigpt] {path}: left by an interrupted build of other inputs or options; starting over").format(
            path=partial), file=sys.stderr)
        shutil.rmtree(partial)
    partial.mkdir()
    progress, writer = _Progress(key, examples=[0] * num_files), ShardWriter(partial / "all", **common)
    progress.shard = writer.sync()
    progress.save(partial)  # from the start: a run stopped before its first checkpoint resumes too
    return progress, writer


def _finish(partial: Path, out_dir: Path, state: _Progress, stats: list[FileStats], common: dict, kind: str,
            val_fraction: float, seed: int, text_field: str, cleaning: Cleaning, started: float) -> None:
    """Split the staging shard into train/ and val/, write the stats and move the dataset into place."""
    for file_stats in stats:
        if file_stats.skipped:
            print(_("[minigpt] {note}").format(note=file_stats.summary()), file=sys.stderr)
    _print_cleaning(stats)
    num_examples = sum(state.examples)
    if not num_examples:
        raise DatasetBuildError(_("no usable {kind} examples in {paths} (see the skip reasons above and {docs} "
                                  "for the formats)").format(kind=kind, paths=", ".join(s.path for s in stats),
                                                             docs=docs_page("data.md")))
    final = partial / "dataset"
    shutil.rmtree(final, ignore_errors=True)  # a split an earlier run did not finish
    final.mkdir()
    is_val = split_examples(num_examples, val_fraction, seed)
    split_meta = {"seed": seed, "val_fraction": val_fraction}
    writers = {split: ShardWriter(final / split, **common) for split in ("train", "val")}
    per_file = _write_splits(partial / "all", common, 2 if kind == "dpo" else 1, is_val, writers, state.examples)
    for split, select in (("train", ~is_val), ("val", is_val)):
        writers[split].close({**split_meta, "split": split, "num_examples": int(select.sum())})
    _fill_split_stats(stats, state.examples, is_val, *per_file)
    _write_stats(final / STATS_FILE, stats, common, {**split_meta, "cleaning": cleaning.as_dict()}, text_field,
                 time.monotonic() - started)
    fsync_dir(final)
    replace_dir(final, out_dir)


def _write_splits(staging: Path, common: dict, docs_per_example: int, is_val: np.ndarray,
                  writers: dict[str, ShardWriter], examples_per_file: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Copy the staging shard's examples to the train or val writer (`is_val`), keeping their order, reading
    it in blocks of about SPLIT_BLOCK_TOKENS tokens (plain reads: a memory map would count its pages as the
    process's memory); returns the tokens of each file's examples, and of its validation examples."""
    dtype = token_dtype(common["vocab_size"])
    num_documents = len(is_val) * docs_per_example
    file_ends = np.cumsum(examples_per_file)
    tokens_per_file, val_per_file = np.zeros(len(file_ends), np.int64), np.zeros(len(file_ends), np.int64)
    handles = {name: open(staging / name, "rb") for name in (OFFSETS, TOKENS, LOSS_MASK, RECORDS)
               if (staging / name).exists()}
    try:
        first, window = 0, np.fromfile(handles[OFFSETS], dtype=np.int64, count=SPLIT_BLOCK_DOCUMENTS + 1)
        while first < num_documents:
            # documents [first, end): whole examples, about SPLIT_BLOCK_TOKENS tokens (one example at least)
            end = first + int(np.searchsorted(window, window[0] + SPLIT_BLOCK_TOKENS, side="right")) - 1
            end = min(num_documents, max(end - end % docs_per_example, first + docs_per_example))
            offsets = window[:end - first + 1]
            count = int(offsets[-1] - offsets[0])
            tokens = np.fromfile(handles[TOKENS], dtype=dtype, count=count)
            mask = np.fromfile(handles[LOSS_MASK], dtype=np.uint8, count=count) if LOSS_MASK in handles else None
            records = ([json.loads(handles[RECORDS].readline()) for _doc in range(end - first)]
                       if RECORDS in handles else None)
            lengths = np.diff(offsets)
            examples = slice(first // docs_per_example, end // docs_per_example)
            val = np.repeat(is_val[examples], docs_per_example)
            for name, select in (("train", ~val), ("val", val)):
                if select.any():
                    keep = np.repeat(select, lengths)
                    writers[name].add_many(tokens[keep], lengths[select], None if mask is None else mask[keep],
                                           None if records is None else [r for r, s in zip(records, select,
                                                                                           strict=True) if s])
            example_tokens = np.diff(offsets[::docs_per_example])
            files = np.searchsorted(file_ends, np.arange(examples.start, examples.stop), side="right")
            np.add.at(tokens_per_file, files, example_tokens)
            np.add.at(val_per_file, files, np.where(is_val[examples], example_tokens, 0))
            window = _next_window(window, end - first, handles[OFFSETS])
            first = end
    finally:
        for handle in handles.values():
            handle.close()
    return tokens_per_file, val_per_file


def _next_window(window: np.ndarray, used: int, handle) -> np.ndarray:
    """The offsets window moved on by `used` documents, topped up from the offsets file."""
    return np.concatenate([window[used:], np.fromfile(handle, dtype=np.int64, count=used)])


def _fill_split_stats(stats: list[FileStats], examples_per_file: list[int], is_val: np.ndarray,
                      tokens_per_file: np.ndarray, val_per_file: np.ndarray) -> None:
    ends = np.cumsum(examples_per_file)
    for index, file_stats in enumerate(stats):
        examples = int(examples_per_file[index])
        file_stats.tokens = int(tokens_per_file[index])
        file_stats.val_documents = int(is_val[int(ends[index]) - examples:int(ends[index])].sum())
        file_stats.train_documents = examples - file_stats.val_documents
        file_stats.val_tokens = int(val_per_file[index])
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
