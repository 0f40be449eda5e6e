"""The tinyshakespeare split of the quality benchmark: tokenizer and shards, split by position.

The baseline (the minimal GPT trainer's CPU recipe) trains on the first 90% of the characters and
validates on the last 10%. This module reproduces that split exactly: the tokenizer is trained on the
training text only, each split is encoded as one document (no EOS, nothing dropped), so the bytes of
the validation labels are the validation text's bytes and bits per byte is comparable to any
tokenizer's. The result is a normal dataset directory that `launch/train.py --data DIR` reads.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minigpt.data.shards import ShardWriter
from minigpt.tokenizer import Tokenizer
from minigpt.tokenizer_training import train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TRAIN_SHARE = 0.9


@dataclass
class PreparedData:
    """Where the tokenizer and the dataset directory are, and what preparing them cost."""

    tokenizer_dir: Path
    dataset_dir: Path
    tokenizer_seconds: float
    pretokenize_seconds: float
    vocab_size: int
    train_tokens: int
    val_tokens: int
    val_bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.val_bytes / self.val_tokens


def split_text(path: Path) -> tuple[str, str]:
    """(first 90%, last 10%) of the characters of `path`, as the baseline splits it."""
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * TRAIN_SHARE)
    return text[:cut], text[cut:]


def prepare(out: Path, vocab_size: int, source: Path = SHAKESPEARE) -> PreparedData:
    """Train the tokenizer on the training text and write `out/data/{train,val}` shards (timed apart)."""
    if not source.is_file():
        raise FileNotFoundError(f"{source}: the tinyshakespeare corpus is missing (expected in ../shared/data)")
    train_text, val_text = split_text(source)
    return prepare_texts(out, vocab_size, train_text, val_text, f"{source}", ("first 90%", "last 10%"))


def prepare_texts(out: Path, vocab_size: int, train_text: str, val_text: str, source: str,
                  described: tuple[str, str]) -> PreparedData:
    """The tokenizer (trained on `train_text` only) and `out/data/{train,val}`, each split one document;
    `described`: how each split was taken from `source`, for the dataset's records."""
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / "train.txt"
    train_file.write_text(train_text, encoding="utf-8")

    start = time.perf_counter()
    tokenizer = train_tokenizer([train_file], out / "tokenizer", vocab_size=vocab_size)
    tokenizer_seconds = time.perf_counter() - start

    start = time.perf_counter()
    dataset = out / "data"
    shutil.rmtree(dataset, ignore_errors=True)  # rebuilt every time: it must match this tokenizer
    counts = {}
    for (split, text), how in zip((("train", train_text), ("val", val_text)), described, strict=True):
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if split == "val" and tokenizer.decode(ids.tolist()) != text:
            raise RuntimeError(f"{tokenizer.directory}: the validation text does not round-trip")
        writer = ShardWriter(dataset / split, tokenizer.vocab_size, "pretrain", tokenizer.checksum,
                             sources=[f"{source} ({split}: {how})"])
        writer.add(ids)
        writer.close()
        counts[split] = len(ids)
    (dataset / "dataset_stats.json").write_text(json.dumps(
        {"source": source, "split": f"train: {described[0]}, val: {described[1]}",
         "train_tokens": counts["train"], "val_tokens": counts["val"],
         "val_bytes": len(val_text.encode("utf-8"))}, indent=2, ensure_ascii=False) + "\n")
    pretokenize_seconds = time.perf_counter() - start
    return PreparedData(out / "tokenizer", dataset, tokenizer_seconds, pretokenize_seconds, tokenizer.vocab_size,
                        counts["train"], counts["val"], len(val_text.encode("utf-8")))


def load_tokenizer(prepared: PreparedData) -> Tokenizer:
    return Tokenizer(prepared.tokenizer_dir)
