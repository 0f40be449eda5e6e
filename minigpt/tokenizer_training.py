"""Training a MiniGPT tokenizer: byte-fallback BPE with sentencepiece over raw .txt/.jsonl/.parquet corpora.

Kept apart from `minigpt.tokenizer` (the runtime class every stage loads) because training reads raw
corpora through `minigpt.data.sources`, which itself needs the tokenizer's chat roles: one module for
both made a two-way import.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import sentencepiece as spm

from minigpt.data.sources import expand_inputs, input_format, iter_raw_records, record_columns, training_texts
from minigpt.fsutil import staged_directory
from minigpt.i18n import _
from minigpt.tokenizer import (
    BOS,
    CHAT_SYMBOLS,
    CHAT_TEMPLATE,
    EOS,
    META_FILE,
    MODEL_FILE,
    PAD,
    SPACE_SYMBOL,
    SPECIAL_IDS,
    UNK,
    Tokenizer,
    TokenizerError,
    file_checksum,
)

MIN_VOCAB_SIZE = 320
"""Smallest vocabulary worth training: 4 specials + 2 chat symbols + 256 byte pieces + some merges."""
WHITESPACE_PIECES = SPACE_SYMBOL + "\t\n"
"""Always pieces of their own, whatever the corpus: space (as `▁`), tab and newline. A tokenizer trained
on space-free Chinese still encodes English spaces compactly and gives them back."""


def coverage_report(model: spm.SentencePieceProcessor, sentences: list[str]) -> dict:
    """How well the vocabulary covers the training text's characters.

    `char_coverage`: share of character occurrences that are a piece of their own (or part of one);
    `byte_fallback_chars`: distinct characters only reachable as UTF-8 bytes, most frequent first
    (`byte_fallback_examples`)."""
    counts = Counter(char for sentence in sentences for char in sentence)
    total = sum(counts.values()) or 1
    missing = [(char, n) for char, n in counts.most_common()
               if model.piece_to_id(SPACE_SYMBOL if char == " " else char) == model.unk_id()]
    return {"distinct_chars": len(counts), "byte_fallback_chars": len(missing),
            "char_coverage": round(1.0 - sum(n for _char, n in missing) / total, 4),
            "byte_fallback_examples": "".join(char for char, _count in missing[:20])}


def _training_sentences(inputs: list[str | Path], text_field: str, input_sentence_size: int,
                        max_sentence_length: int) -> tuple[list[str], list[dict]]:
    """Lines of text to train on (split at newlines, capped in count and length) and a record of the inputs."""
    sentences: list[str] = []
    sources = []
    for path in expand_inputs(inputs):
        fmt = input_format(path)
        for _line, raw in iter_raw_records(path, record_columns(None, text_field)):
            for text in training_texts(fmt, raw, text_field):
                sentences += [line[:max_sentence_length] for line in text.split("\n") if line.strip()]
            if len(sentences) >= input_sentence_size:
                break
        sources.append({"path": str(path), "bytes": path.stat().st_size, "sha256": file_checksum(path)})
    return sentences[:input_sentence_size], sources


def _keep_frequent_chars(sentences: list[str], max_chars: int) -> tuple[list[str], int]:
    """Drop characters outside the `max_chars` most frequent ones from the training text.

    SentencePiece must give every kept character its own piece; a corpus with more distinct
    characters than the vocabulary allows (Chinese at a small vocab) would fail to train.
    Dropped characters still round-trip through byte fallback.
    """
    counts = Counter(char for sentence in sentences for char in sentence)
    if len(counts) <= max_chars:
        return sentences, 0
    keep = {char for char, _count in counts.most_common(max_chars)}
    return ["".join(c for c in s if c in keep) for s in sentences], len(counts) - max_chars


def _drop_training_paths(model_path: Path) -> None:
    """Blank the temporary output path sentencepiece records in the model, so the same corpus and
    settings give a byte-identical tokenizer (and checksum) wherever it is trained."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    proto.trainer_spec.model_prefix = ""
    model_path.write_bytes(proto.SerializeToString())


def train_tokenizer(inputs: list[str | Path], out_dir: str | Path, vocab_size: int, text_field: str = "text",
                    max_sentence_length: int = 4096, input_sentence_size: int = 2_000_000) -> Tokenizer:
    """Train a byte-fallback BPE tokenizer on .txt/.jsonl(.gz)/.parquet files (globs allowed) into `out_dir`.

    Lossless by construction: identity normalization, no dummy prefix, whitespace kept, digits
    split one per token, unseen characters as UTF-8 bytes. The vocabulary is at most
    `vocab_size`: a corpus too small for it gives a smaller one (the real size is in tokenizer.json).
    The directory appears complete or not at all; an existing tokenizer directory is replaced.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(_("vocab_size {vocab_size} is too small; MiniGPT tokenizers need at least {minimum} "
                               "(262 reserved special and byte pieces)").format(vocab_size=vocab_size,
                                                                                minimum=MIN_VOCAB_SIZE))
    out_dir = Path(out_dir)
    if out_dir.exists() and any(p.name not in (MODEL_FILE, META_FILE) for p in out_dir.iterdir()):
        raise TokenizerError(_("{path}: exists and holds files other than a tokenizer; choose another --out").format(
            path=out_dir))
    started = time.monotonic()
    sentences, sources = _training_sentences(inputs, text_field, input_sentence_size, max_sentence_length)
    if not sentences:
        raise TokenizerError(_("no text to train on in {paths} (JSONL records need a string field {field!r} or chat "
                               "fields)").format(paths=", ".join(s["path"] for s in sources), field=text_field))
    reserved = len(SPECIAL_IDS) + len(CHAT_SYMBOLS) + 256
    original_sentences = sentences
    sentences, dropped_chars = _keep_frequent_chars(sentences, (vocab_size - reserved) // 2)
    with staged_directory(out_dir) as staging:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=str(staging / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", pad_id=SPECIAL_IDS[PAD], unk_id=SPECIAL_IDS[UNK], bos_id=SPECIAL_IDS[BOS],
            eos_id=SPECIAL_IDS[EOS], control_symbols=list(CHAT_SYMBOLS), byte_fallback=True,
            character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
            required_chars=WHITESPACE_PIECES,
            hard_vocab_limit=False, max_sentence_length=max_sentence_length * 4, num_threads=os.cpu_count() or 1,
            minloglevel=2)
        (staging / "tokenizer.vocab").unlink(missing_ok=True)
        _drop_training_paths(staging / MODEL_FILE)
        model = spm.SentencePieceProcessor(model_file=str(staging / MODEL_FILE))
        coverage = coverage_report(model, original_sentences)
        meta = {"checksum": file_checksum(staging / MODEL_FILE), "vocab_size": model.get_piece_size(),
                "special_tokens": SPECIAL_IDS, "chat_symbols": list(CHAT_SYMBOLS), "chat_template": CHAT_TEMPLATE,
                "model_type": "bpe", "byte_fallback": True,
                "training": {"inputs": sources, "text_field": text_field, "requested_vocab_size": vocab_size,
                             "sentences": len(sentences), "dropped_rare_characters": dropped_chars,
                             "coverage": coverage,
                             "max_sentence_length": max_sentence_length,
                             "input_sentence_size": input_sentence_size,
                             "seconds": round(time.monotonic() - started, 2)}}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return Tokenizer(out_dir)

