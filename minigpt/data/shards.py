"""The shard format: flat memory-mapped tokens, a document-offsets index and meta.json.

A shard directory (one split of a dataset) holds

    tokens.bin      all documents' token ids back to back (uint16 when vocab < 65,536, else uint32)
    offsets.bin     int64, num_documents + 1 entries: document i is tokens[offsets[i]:offsets[i+1]]
    loss_mask.bin   uint8, one per token, 1 where the token is trained on (sft and dpo only)
    records.jsonl   one JSON object per document: reference answers and other fields (rlhf only)
    meta.json       format version, dtype, vocab size, tokenizer checksum, counts, kind, sources

A dataset directory holds `train/` and `val/` shards and `dataset_stats.json`. The reader maps the
files read-only and refuses, with a `ShardError` naming the file, anything that does not match.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from minigpt.fsutil import fsync_file
from minigpt.i18n import _

__all__ = ["FORMAT_VERSION", "ShardError", "ShardReader", "ShardWriter", "open_shard", "token_dtype"]

FORMAT_VERSION = 1
TOKENS, OFFSETS, LOSS_MASK, RECORDS, META = "tokens.bin", "offsets.bin", "loss_mask.bin", "records.jsonl", "meta.json"
KINDS = ("pretrain", "sft", "dpo", "rlhf")
"""What a dataset holds (`meta.json` "kind"): each mode trains on one (`Objective.dataset_kind`)."""
MASKED_KINDS = ("sft", "dpo")


class ShardError(ValueError):
    """A shard that is missing, truncated, or built for another format, tokenizer or mode."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


class ShardWriter:
    """Append documents to a new shard directory; `close()` writes meta.json last.

    Used inside a staging directory that the builder renames into place, so a shard is never
    seen half-written. Every file is written as documents come (memory does not grow with the
    shard); `sync()` makes what was added durable and returns the position a later writer can
    `resume` from (the files cut back to it), which is how an interrupted build continues.
    """

    def __init__(self, directory: str | Path, vocab_size: int, kind: str, tokenizer_checksum: str,
                 sources: list[str] | None = None, resume: dict | None = None):
        if kind not in KINDS:
            raise ValueError(_("kind {kind!r} is not one of {kinds}").format(kind=kind, kinds=KINDS))
        self.directory = Path(directory)
        if resume is None:
            self.directory.mkdir(parents=True, exist_ok=False)
        self.vocab_size, self.kind, self.checksum = vocab_size, kind, tokenizer_checksum
        self.sources = list(sources or [])
        self.dtype = token_dtype(vocab_size)
        position = resume or {"documents": 0, "tokens": 0, "records_bytes": 0}
        self.num_documents, self.num_tokens = int(position["documents"]), int(position["tokens"])
        self.records_bytes = int(position["records_bytes"])
        sizes = {TOKENS: self.num_tokens * self.dtype.itemsize, OFFSETS: (self.num_documents + 1) * 8,
                 LOSS_MASK: self.num_tokens, RECORDS: self.records_bytes}
        self._tokens = self._open(TOKENS, sizes, resume, 1 << 22)
        self._offsets = self._open(OFFSETS, sizes, resume, 1 << 20)
        self._mask = self._open(LOSS_MASK, sizes, resume, 1 << 20) if kind in MASKED_KINDS else None
        self._records = self._open(RECORDS, sizes, resume, 1 << 16) if kind == "rlhf" else None
        if resume is None:
            self._offsets.write(np.zeros(1, dtype=np.int64).tobytes())

    def _open(self, name: str, sizes: dict, resume: dict | None, buffering: int):
        """A new file, or (resuming) the file cut back to the size the position gives."""
        path = self.directory / name
        if resume is None:
            return open(path, "wb", buffering=buffering)
        if not path.is_file() or path.stat().st_size < sizes[name]:
            raise ShardError(_("{path}: shorter than the {size} bytes an earlier run recorded").format(
                path=path, size=sizes[name]))
        handle = open(path, "r+b", buffering=buffering)
        handle.truncate(sizes[name])
        handle.seek(sizes[name])
        return handle

    def add(self, ids, loss_mask=None, record: dict | None = None) -> None:
        """Append one document (its token ids; its 0/1 loss mask for sft/dpo; its record for rlhf)."""
        ids = np.asarray(ids, dtype=np.int64)
        self.add_many(ids, np.array([len(ids)]), None if loss_mask is None else np.asarray(loss_mask),
                      None if self._records is None else [record or {}])

    def add_many(self, tokens: np.ndarray, lengths: np.ndarray, loss_mask: np.ndarray | None = None,
                 records: list[dict] | None = None) -> None:
        """Append consecutive documents given as one token array and their lengths (same for the mask)."""
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ShardError(_("{path}: token ids outside the vocabulary of {vocab_size} (min {low}, max {high})")
                             .format(path=self.directory, vocab_size=self.vocab_size, low=int(tokens.min()),
                                     high=int(tokens.max())))
        if int(np.sum(lengths)) != len(tokens):
            raise ShardError(_("{path}: document lengths add up to {total}, not the {tokens} tokens given").format(
                path=self.directory, total=int(np.sum(lengths)), tokens=len(tokens)))
        if self._mask is not None and (loss_mask is None or len(loss_mask) != len(tokens)):
            raise ShardError(_("{path}: {kind} documents need a loss mask as long as their ids").format(
                path=self.directory, kind=self.kind))
        if self._records is not None and (records is None or len(records) != len(lengths)):
            raise ShardError(_("{path}: rlhf documents need one record each").format(path=self.directory))
        self._tokens.write(np.ascontiguousarray(tokens, dtype=self.dtype))  # no bytes copy
        if self._mask is not None:
            self._mask.write(np.ascontiguousarray(loss_mask, dtype=np.uint8))
        if self._records is not None:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
            self._records.write(text)
            self.records_bytes += len(text)
        self._offsets.write(self.num_tokens + np.cumsum(lengths, dtype=np.int64))
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def _handles(self) -> list:
        return [h for h in (self._tokens, self._offsets, self._mask, self._records) if h is not None]

    def sync(self) -> dict:
        """Flush and fsync what was added; returns the position to `resume` from."""
        for handle in self._handles():
            handle.flush()
            os.fsync(handle.fileno())
        return {"documents": self.num_documents, "tokens": self.num_tokens, "records_bytes": self.records_bytes}

    def abandon(self) -> None:
        """Close the files without meta.json (an interrupted build keeps them to resume from)."""
        for handle in self._handles():
            handle.close()

    def close(self, extra_meta: dict | None = None) -> Path:
        """Flush and fsync the data files, then write meta.json; returns the shard directory."""
        self.abandon()
        files = [TOKENS, OFFSETS] + ([LOSS_MASK] if self._mask else []) + ([RECORDS] if self._records else [])
        for name in files:
            fsync_file(self.directory / name)
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "dtype": self.dtype.name,
                "vocab_size": self.vocab_size, "tokenizer_checksum": self.checksum,
                "num_documents": self.num_documents, "num_tokens": self.num_tokens,
                "files": files, "sources": self.sources, **(extra_meta or {})}
        (self.directory / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        fsync_file(self.directory / META)
        return self.directory


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """Read-only memmap of `count` items; refuses a file of another size (truncated or padded)."""
    if not path.is_file():
        raise ShardError(_("{path}: missing (the shard is incomplete)").format(path=path))
    expected = count * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise ShardError(_("{path}: {actual} bytes, meta.json promises {expected} ({count} x {dtype}); the shard is "
                           "truncated or corrupt, rebuild it").format(path=path, actual=actual, expected=expected,
                                                                       count=count, dtype=dtype.name))
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class ShardReader:
    """Read-only view of one shard directory: tokens, offsets, optional loss mask and records."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / META
        if not meta_path.is_file():
            raise ShardError(_("{path}: missing; {directory} is not a complete shard (build it with "
                               "data_tools/pretokenize.py)").format(path=meta_path, directory=self.directory))
        try:
            self.meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ShardError(_("{path}: not valid JSON ({error})").format(path=meta_path, error=err)) from err
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ShardError(_("{path}: shard format version {version!r}, this MiniGPT reads version {supported}; "
                               "rebuild the shards with this version's pretokenize").format(
                path=meta_path, version=version, supported=FORMAT_VERSION))
        for key in ("kind", "dtype", "vocab_size", "tokenizer_checksum", "num_documents", "num_tokens"):
            if key not in self.meta:
                raise ShardError(_("{path}: field {field!r} missing").format(path=meta_path, field=key))
        self.kind = self.meta["kind"]
        if self.kind not in KINDS:
            raise ShardError(_("{path}: kind {kind!r} is not one of {kinds}").format(path=meta_path, kind=self.kind,
                                                                                      kinds=KINDS))
        self.num_documents, self.num_tokens = int(self.meta["num_documents"]), int(self.meta["num_tokens"])
        self.vocab_size = int(self.meta["vocab_size"])
        expected_dtype = token_dtype(self.vocab_size)
        if self.meta["dtype"] != expected_dtype.name:
            raise ShardError(_("{path}: dtype {dtype!r}, a vocabulary of {vocab_size} is stored as {expected}").format(
                path=meta_path, dtype=self.meta["dtype"], vocab_size=self.vocab_size, expected=expected_dtype.name))
        self.tokens = _map(self.directory / TOKENS, expected_dtype, self.num_tokens)
        self.offsets = _map(self.directory / OFFSETS, np.dtype(np.int64), self.num_documents + 1)
        if self.offsets[0] != 0 or self.offsets[-1] != self.num_tokens or np.any(np.diff(self.offsets) < 0):
            raise ShardError(_("{path}: offsets do not index {tokens} tokens; the shard is corrupt, rebuild it").format(
                path=self.directory / OFFSETS, tokens=self.num_tokens))
        self.loss_mask = None
        if self.kind in MASKED_KINDS:
            self.loss_mask = _map(self.directory / LOSS_MASK, np.dtype(np.uint8), self.num_tokens)
        self.records: list[dict] | None = None
        if self.kind == "rlhf":
            self.records = self._read_records()

    def _read_records(self) -> list[dict]:
        path = self.directory / RECORDS
        if not path.is_file():
            raise ShardError(_("{path}: missing (the shard is incomplete)").format(path=path))
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) != self.num_documents:
            raise ShardError(_("{path}: {records} records for {documents} documents; rebuild the shard").format(
                path=path, records=len(lines), documents=self.num_documents))
        return [json.loads(line) for line in lines]

    @property
    def checksum(self) -> str:
        return self.meta["tokenizer_checksum"]

    def document(self, index: int) -> np.ndarray:
        """Token ids of document `index` as a view into the memmap."""
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]

    def document_mask(self, index: int) -> np.ndarray:
        """Loss mask of document `index` (sft/dpo shards)."""
        if self.loss_mask is None:
            raise ShardError(_("{path}: a {kind} shard has no loss mask").format(path=self.directory, kind=self.kind))
        return self.loss_mask[self.offsets[index]:self.offsets[index + 1]]

    def document_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def window(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the flat stream from `start` (documents separated by EOS)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(_("window [{start}, {end}) outside {tokens} tokens").format(
                start=start, end=start + length, tokens=self.num_tokens))
        return self.tokens[start:start + length]


def open_shard(dataset_dir: str | Path, split: str = "train", tokenizer_checksum: str | None = None,
               vocab_size: int | None = None, kind: str | None = None) -> ShardReader:
    """Open `dataset_dir/split` read-only, refusing a shard of another tokenizer, vocabulary or kind."""
    directory = Path(dataset_dir) / split
    if not directory.is_dir():
        raise ShardError(_("{path}: no such shard directory (is {dataset} a dataset built by pretokenize?)").format(
            path=directory, dataset=dataset_dir))
    reader = ShardReader(directory)
    meta_path = directory / META
    if tokenizer_checksum is not None and reader.checksum != tokenizer_checksum:
        raise ShardError(_("{path}: built with tokenizer {built}, this run uses {used}; re-run pretokenize with this "
                           "run's tokenizer").format(path=meta_path, built=reader.checksum[:12],
                                                     used=tokenizer_checksum[:12]))
    if vocab_size is not None and reader.vocab_size != vocab_size:
        raise ShardError(_("{path}: vocabulary of {built} tokens, this run uses {used}").format(
            path=meta_path, built=reader.vocab_size, used=vocab_size))
    if kind is not None and reader.kind != kind:
        raise ShardError(_("{path}: shards of kind {built!r}, this run needs {kind!r} (pretokenize --kind {kind})")
                         .format(path=meta_path, built=reader.kind, kind=kind))
    return reader
