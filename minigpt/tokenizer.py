"""The tokenizer: a sentencepiece model plus MiniGPT's special tokens and its one chat template.

A tokenizer directory holds `tokenizer.model` (sentencepiece) and `tokenizer.json` (special tokens,
chat template name, and the sha256 checksum of `tokenizer.model`). Shards and checkpoints record the
checksum so that data or weights built with another tokenizer are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from minigpt.fsutil import make_staging_dir

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Ids are fixed so that every MiniGPT tokenizer agrees on them.
SPECIAL_IDS = {PAD: 0, UNK: 1, BOS: 2, EOS: 3}
CHAT_SYMBOLS = (IM_START, IM_END)
CHAT_ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = "chatml"


class TokenizerError(ValueError):
    """A tokenizer directory that is missing, corrupt, or not the one the data/weights were built with."""


def file_checksum(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class ChatEncoding:
    """Token ids of a rendered conversation and a parallel 0/1 mask of assistant-output tokens."""

    ids: list[int]
    assistant_mask: list[int]


class Tokenizer:
    """Encode/decode text and conversations with a MiniGPT sentencepiece model."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        model_path, meta_path = self.directory / MODEL_FILE, self.directory / META_FILE
        for path in (model_path, meta_path):
            if not path.is_file():
                raise TokenizerError(f"tokenizer file missing: {path}")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise TokenizerError(f"{meta_path}: not valid JSON ({err})") from err
        self.checksum = file_checksum(model_path)
        if self.meta.get("checksum") != self.checksum:
            raise TokenizerError(
                f"{model_path}: checksum {self.checksum[:12]} does not match {meta_path} "
                f"({str(self.meta.get('checksum'))[:12]}); the directory was modified after training")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        for piece, expected in SPECIAL_IDS.items():
            if self.sp.piece_to_id(piece) != expected:
                raise TokenizerError(f"{model_path}: special token {piece} has id "
                                     f"{self.sp.piece_to_id(piece)}, MiniGPT expects {expected}")
        self.im_start_id = self._symbol_id(IM_START)
        self.im_end_id = self._symbol_id(IM_END)

    def _symbol_id(self, piece: str) -> int:
        token_id = self.sp.piece_to_id(piece)
        if token_id == self.unk_id:
            raise TokenizerError(f"{self.directory}: tokenizer lacks the chat symbol {piece}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id = (SPECIAL_IDS[t] for t in (PAD, UNK, BOS, EOS))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generated sequence: end of document and end of a chat turn."""
        return (self.eos_id, self.im_end_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens (pad, bos, eos, chat markers) are dropped.

        The chat markers are sentencepiece control symbols: text never encodes to them (no prompt
        injection through a typed "<|im_start|>") and decoding drops them."""
        return self.sp.decode([int(i) for i in ids])

    def render(self, ids: list[int]) -> str:
        """Text of `ids` with special tokens shown as their pieces (for debugging and tests)."""
        special = {self.bos_id, self.eos_id, self.pad_id, self.im_start_id, self.im_end_id}
        parts, run = [], []
        for token_id in (int(i) for i in ids):
            if token_id in special:
                parts += [self.sp.decode(run), self.id_to_piece(token_id)]
                run = []
            else:
                run.append(token_id)
        return "".join(parts + [self.sp.decode(run)])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> ChatEncoding:
        """Render `messages` ([{"role", "content"}]) with the ChatML template.

        Each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`. The mask marks the assistant's
        content and its `<|im_end|>` (the model must learn to stop); with `add_generation_prompt`
        the ids end with an open `<|im_start|>assistant\\n` header for the generator to continue.
        """
        ids: list[int] = []
        mask: list[int] = []
        for index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in CHAT_ROLES:
                raise ValueError(f"message {index}: role {role!r} is not one of {CHAT_ROLES}")
            if not isinstance(content, str):
                raise ValueError(f"message {index}: content must be a string, got {type(content).__name__}")
            header = [self.im_start_id] + self.encode(f"{role}\n")
            body = self.encode(content) + [self.im_end_id]
            trailer = self.encode("\n")
            is_assistant = int(role == "assistant")
            ids += header + body + trailer
            mask += [0] * len(header) + [is_assistant] * len(body) + [0] * len(trailer)
        if add_generation_prompt:
            header = [self.im_start_id] + self.encode("assistant\n")
            ids += header
            mask += [0] * len(header)
        return ChatEncoding(ids, mask)


MIN_VOCAB_SIZE = 320
"""Smallest vocabulary worth training: 4 specials + 2 chat symbols + 256 byte pieces + some merges."""


def _training_sentences(inputs: list[str | Path], text_field: str, input_sentence_size: int,
                        max_sentence_length: int) -> tuple[list[str], list[dict]]:
    """Lines of text to train on (split at newlines, capped in count and length) and a record of the inputs."""
    from minigpt.data.sources import expand_inputs, input_format, iter_raw_records, training_texts

    sentences: list[str] = []
    sources = []
    for path in expand_inputs(inputs):
        fmt = input_format(path)
        for _, raw in iter_raw_records(path):
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
    keep = {char for char, _ in counts.most_common(max_chars)}
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
    """Train a byte-fallback BPE tokenizer on .txt/.jsonl(.gz) files (globs allowed) into `out_dir`.

    Lossless by construction: identity normalization, no dummy prefix, whitespace kept, digits
    split one per token, unseen characters as UTF-8 bytes. The vocabulary is at most
    `vocab_size`: a corpus too small for it gives a smaller one (the real size is in tokenizer.json).
    The directory appears complete or not at all; an existing tokenizer directory is replaced.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size {vocab_size} is too small; MiniGPT tokenizers need at least "
                             f"{MIN_VOCAB_SIZE} (262 reserved special and byte pieces)")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(p.name not in (MODEL_FILE, META_FILE) for p in out_dir.iterdir()):
        raise TokenizerError(f"{out_dir}: exists and holds files other than a tokenizer; choose another --out")
    started = time.monotonic()
    sentences, sources = _training_sentences(inputs, text_field, input_sentence_size, max_sentence_length)
    if not sentences:
        raise TokenizerError(f"no text to train on in {', '.join(s['path'] for s in sources)} "
                             f"(JSONL records need a string field {text_field!r} or chat fields)")
    reserved = len(SPECIAL_IDS) + len(CHAT_SYMBOLS) + 256
    sentences, dropped_chars = _keep_frequent_chars(sentences, (vocab_size - reserved) // 2)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(out_dir.parent, prefix=f".{out_dir.name}.")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=str(staging / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", pad_id=SPECIAL_IDS[PAD], unk_id=SPECIAL_IDS[UNK], bos_id=SPECIAL_IDS[BOS],
            eos_id=SPECIAL_IDS[EOS], control_symbols=list(CHAT_SYMBOLS), byte_fallback=True,
            character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
            hard_vocab_limit=False, max_sentence_length=max_sentence_length * 4, num_threads=os.cpu_count() or 1,
            minloglevel=2)
        (staging / "tokenizer.vocab").unlink(missing_ok=True)
        _drop_training_paths(staging / MODEL_FILE)
        model = spm.SentencePieceProcessor(model_file=str(staging / MODEL_FILE))
        meta = {"checksum": file_checksum(staging / MODEL_FILE), "vocab_size": model.get_piece_size(),
                "special_tokens": SPECIAL_IDS, "chat_symbols": list(CHAT_SYMBOLS), "chat_template": CHAT_TEMPLATE,
                "model_type": "bpe", "byte_fallback": True,
                "training": {"inputs": sources, "text_field": text_field, "requested_vocab_size": vocab_size,
                             "sentences": len(sentences), "dropped_rare_characters": dropped_chars,
                             "max_sentence_length": max_sentence_length,
                             "input_sentence_size": input_sentence_size,
                             "seconds": round(time.monotonic() - started, 2)}}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Tokenizer(out_dir)


def _replace_dir(staging: Path, target: Path) -> None:
    """Move `staging` to `target` by rename; an existing `target` is moved aside first, then removed."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
