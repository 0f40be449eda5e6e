"""The tokenizer: a sentencepiece model plus MiniGPT's special tokens and its one chat template.

A tokenizer directory holds `tokenizer.model` (sentencepiece) and `tokenizer.json` (special tokens,
chat template name, and the sha256 checksum of `tokenizer.model`). Shards and checkpoints record the
checksum so that data or weights built with another tokenizer are refused. Training a tokenizer lives in
`minigpt.tokenizer_training`, which reads raw corpora; this module only loads one.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from minigpt.i18n import _

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Ids are fixed so that every MiniGPT tokenizer agrees on them.
SPECIAL_IDS = {PAD: 0, UNK: 1, BOS: 2, EOS: 3}
CHAT_SYMBOLS = (IM_START, IM_END)
CHAT_ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = "chatml"
SPACE_SYMBOL = "\u2581"
"""sentencepiece's whitespace meta symbol `▁`: spaces become it before pieces are matched."""
_ARRAY_ENCODE = hasattr(spm.SentencePieceProcessor, "EncodeAsNumpy")
"""sentencepiece 0.2.1 and later return ids as arrays (`out_type="numpy"`)."""


class TokenizerError(ValueError):
    """A tokenizer directory that is missing, corrupt, or not the one the data/weights were built with."""


def is_utf8_text(text: str) -> bool:
    """False when `text` holds lone surrogates (bytes that were not UTF-8, kept by `surrogateescape` or a
    JSON `\\ud800` escape): no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def file_checksum(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class ChatEncoding:
    """Token ids of a rendered conversation and a parallel 0/1 mask of assistant-output tokens."""

    ids: list[int]
    assistant_mask: list[int]


def _spread(items: list, indices: list[int], length: int) -> list:
    """A list of `length` with `items` at `indices` and None elsewhere."""
    spread = [None] * length
    for index, item in zip(indices, items, strict=True):
        spread[index] = item
    return spread


class Tokenizer:
    """Encode/decode text and conversations with a MiniGPT sentencepiece model."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        model_path, meta_path = self.directory / MODEL_FILE, self.directory / META_FILE
        for path in (model_path, meta_path):
            if not path.is_file():
                raise TokenizerError(_("tokenizer file missing: {path}").format(path=path))
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise TokenizerError(_("{path}: not valid JSON ({error})").format(path=meta_path, error=err)) from err
        self.checksum = file_checksum(model_path)
        if self.meta.get("checksum") != self.checksum:
            raise TokenizerError(_(
                "{path}: checksum {checksum} does not match {meta_path} ({recorded}); the directory was modified "
                "after training").format(path=model_path, checksum=self.checksum[:12], meta_path=meta_path,
                                         recorded=str(self.meta.get("checksum"))[:12]))
        self._load_model(model_path)

    @classmethod
    def from_model_file(cls, model_path: str | Path) -> Tokenizer:
        """A tokenizer from a bare `tokenizer.model` (e.g. in a Hugging Face directory, whose
        tokenizer.json is not MiniGPT's); the special ids and chat symbols are checked all the same."""
        model_path = Path(model_path)
        if not model_path.is_file():
            raise TokenizerError(_("tokenizer file missing: {path}").format(path=model_path))
        tokenizer = cls.__new__(cls)
        tokenizer.directory = model_path.parent
        tokenizer.checksum = file_checksum(model_path)
        tokenizer.meta = {"checksum": tokenizer.checksum, "special_tokens": SPECIAL_IDS,
                          "chat_symbols": list(CHAT_SYMBOLS), "chat_template": CHAT_TEMPLATE}
        tokenizer._load_model(model_path)
        return tokenizer

    @classmethod
    def from_model_proto(cls, proto: bytes, source: str | Path) -> Tokenizer:
        """A tokenizer from a serialized sentencepiece model (e.g. rebuilt from transformers'
        tokenizer.json); `source` names where it came from in messages and is its `directory`."""
        tokenizer = cls.__new__(cls)
        tokenizer.directory = Path(source).parent
        tokenizer.checksum = hashlib.sha256(proto).hexdigest()
        tokenizer.meta = {"checksum": tokenizer.checksum, "special_tokens": SPECIAL_IDS,
                          "chat_symbols": list(CHAT_SYMBOLS), "chat_template": CHAT_TEMPLATE}
        tokenizer._load_model(Path(source), proto)
        return tokenizer

    def _load_model(self, model_path: Path, proto: bytes | None = None) -> None:
        try:
            self.sp = (spm.SentencePieceProcessor(model_proto=proto) if proto is not None
                       else spm.SentencePieceProcessor(model_file=str(model_path)))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(_("{path}: not a sentencepiece model ({error})").format(path=model_path,
                                                                                        error=err)) from err
        for piece, expected in SPECIAL_IDS.items():
            if self.sp.piece_to_id(piece) != expected:
                raise TokenizerError(_("{path}: special token {piece} has id {id}, MiniGPT expects {expected}").format(
                    path=model_path, piece=piece, id=self.sp.piece_to_id(piece), expected=expected))
        self.im_start_id = self._symbol_id(IM_START)
        self.im_end_id = self._symbol_id(IM_END)
        self._space_piece = self.sp.piece_to_id(SPACE_SYMBOL) != self.unk_id
        # A space must reach the model as something decode turns back into a space, and a typed `▁`
        # as something decode keeps: with a `▁` piece the typed one goes as its UTF-8 bytes; without
        # one (a tokenizer trained on space-free text) sentencepiece would byte-encode the space as
        # `▁`'s bytes, which decode returns literally, so the space goes as the byte 0x20 instead.
        if self._space_piece:
            self._escaped, self._escape_ids = SPACE_SYMBOL, self._byte_ids(SPACE_SYMBOL.encode())
        else:
            self._escaped, self._escape_ids = " ", self._byte_ids(b" ")
        self._buffer_batch = self._buffer_batch_works()

    def _eos_buffers(self, texts: list[str], num_threads: int) -> list:
        """sentencepiece's own batch encode to raw id buffers with EOS added (what `encode(out_type="numpy")`
        wraps one `np.frombuffer` per text around): the caller joins them into one array instead."""
        # texts, threads, thread pool, sampling, nbest size, alpha, add_bos, add_eos, reverse
        return self.sp._processor._EncodeAsBufferBatch(texts, num_threads, None, False, 0, 0.0, False, True, False)

    def _buffer_batch_works(self) -> bool:
        """Whether `_eos_buffers` gives what the public call gives, on a probe: it is sentencepiece's private API,
        used only where it does. (A flag rather than the bound method: a Tokenizer stays picklable.)"""
        if not hasattr(getattr(self.sp, "_processor", None), "_EncodeAsBufferBatch") or not _ARRAY_ENCODE \
                or self.sp.eos_id() != self.eos_id:
            return False
        probe = ["Hello world.", "学而时习之", "tabs\tand\nnewlines", "😀"]
        try:
            got = [np.frombuffer(buffer, dtype=np.int32).tolist() for buffer in self._eos_buffers(probe, 1)]
        except (TypeError, ValueError, RuntimeError):
            return False
        expected = [ids.tolist() for ids in self.sp.encode(probe, out_type="numpy", add_eos=True, num_threads=1)]
        return got == expected

    def _symbol_id(self, piece: str) -> int:
        token_id = self.sp.piece_to_id(piece)
        if token_id == self.unk_id:
            raise TokenizerError(_("{path}: tokenizer lacks the chat symbol {piece}").format(path=self.directory,
                                                                                            piece=piece))
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id = (SPECIAL_IDS[t] for t in (PAD, UNK, BOS, EOS))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generated sequence: end of document and end of a chat turn."""
        return (self.eos_id, self.im_end_id)

    def _byte_ids(self, data: bytes) -> list[int]:
        ids = [self.sp.piece_to_id(f"<0x{byte:02X}>") for byte in data]
        if self.unk_id in ids:
            raise TokenizerError(_("{path}: tokenizer lacks byte-fallback pieces; MiniGPT needs them").format(
                path=self.directory))
        return ids

    def _encode_exact(self, text: str) -> list[int]:
        """Ids that `decode` turns back into exactly `text` (see `__init__` for the one character
        sentencepiece alone would not give back)."""
        if self._escaped not in text:
            return self.sp.encode(text)
        ids: list[int] = []
        for index, part in enumerate(text.split(self._escaped)):
            if index:
                ids += self._escape_ids
            if part:
                ids += self.sp.encode(part)
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; `decode(encode(text)) == text` for any text (spaces, tabs, newlines,
        emoji, any script), characters the tokenizer never saw going as UTF-8 bytes."""
        ids = self._encode_exact(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text; texts sentencepiece takes as they are go through it in one call."""
        plain = [index for index, text in enumerate(texts) if self._escaped not in text]
        result: list[list[int]] = [[] for _text in texts]
        for index, ids in zip(plain, self.sp.encode([texts[i] for i in plain], num_threads=1), strict=True):
            result[index] = ids
        for index, text in enumerate(texts):
            if self._escaped in text:
                result[index] = self._encode_exact(text)
        return result

    def encode_documents(self, texts: list[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """`encode(text, eos=True)` of every text back to back as one int32 array, and each one's length.

        sentencepiece hands the ids back as raw buffers (no Python int per token), joined here into one
        array (`_eos_buffers`, where the probe at load passed; else one array per text, concatenated), and
        encodes on `num_threads` threads of its own; a sentencepiece too old for arrays goes through lists.
        """
        if not texts:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
        # one search of the joined texts: `_escaped` is one character, so no two texts make it together
        all_plain = self._escaped not in "".join(texts)
        if all_plain and self._buffer_batch:
            buffers = self._eos_buffers(texts, num_threads)
            lengths = np.fromiter(map(len, map(memoryview, buffers)), dtype=np.int64, count=len(buffers))
            return np.frombuffer(bytearray().join(buffers), dtype=np.int32), lengths  # writable, as before
        plain = list(range(len(texts))) if all_plain else \
            [index for index, text in enumerate(texts) if self._escaped not in text]
        if all_plain and _ARRAY_ENCODE and self.sp.eos_id() == self.eos_id:
            arrays = self.sp.encode(texts, out_type="numpy", add_eos=True, num_threads=num_threads)
            return np.concatenate(arrays), np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        batch = texts if len(plain) == len(texts) else [texts[i] for i in plain]
        if _ARRAY_ENCODE:
            encoded = self.sp.encode(batch, out_type="numpy", num_threads=num_threads)
        else:
            encoded = [np.asarray(ids, dtype=np.int32) for ids in self.sp.encode(batch, num_threads=num_threads)]
        if len(plain) == len(texts):
            arrays = encoded
        else:  # texts holding a typed `▁` (see `_encode_exact`)
            arrays = [ids if self._escaped not in text else np.asarray(self._encode_exact(text), dtype=np.int32)
                      for text, ids in zip(texts, _spread(encoded, plain, len(texts)), strict=True)]
        eos = np.array([self.eos_id], dtype=np.int32)
        lengths = np.fromiter((len(ids) + 1 for ids in arrays), dtype=np.int64, count=len(arrays))
        if not arrays:
            return np.zeros(0, dtype=np.int32), lengths
        return np.concatenate([part for ids in arrays for part in (ids, eos)]), lengths

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

    def unseen_characters(self, text: str) -> str:
        """The distinct characters of `text` that have no piece of their own: the tokenizer never saw them
        in training and passes them as UTF-8 bytes, which an untrained-on-them model cannot continue."""
        seen, unseen = set(), []
        for char in text:
            if char in seen or char.isspace():
                continue
            seen.add(char)
            if self.sp.piece_to_id(char) == self.unk_id:
                unseen.append(char)
        return "".join(unseen)

    def character_counts(self, text: str) -> tuple[int, collections.Counter]:
        """How many non-space characters `text` has, and of those the ones with no piece of their own (the
        tokenizer can only spell them as UTF-8 bytes), counted by occurrence."""
        counts = collections.Counter(char for char in text if not char.isspace())
        uncovered = collections.Counter({char: n for char, n in counts.items()
                                         if self.sp.piece_to_id(char) == self.unk_id})
        return counts.total(), uncovered

    @functools.cached_property
    def byte_values(self) -> list[int]:
        """Per id, the byte a byte-fallback piece (`<0xE5>`) stands for, or -1 for any other piece."""
        return [int(self.sp.id_to_piece(i)[3:5], 16) if self.sp.is_byte(i) else -1 for i in range(self.vocab_size)]

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
                raise ValueError(_("message {index}: role {role!r} is not one of {roles}").format(
                    index=index, role=role, roles=CHAT_ROLES))
            if not isinstance(content, str):
                raise ValueError(_("message {index}: content must be a string, got {type}").format(
                    index=index, type=type(content).__name__))
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
