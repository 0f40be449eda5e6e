"""A tiny real sentencepiece tokenizer for tests, with the special tokens MiniGPT's Tokenizer expects."""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from minigpt.tokenizer import CHAT_SYMBOLS, CHAT_TEMPLATE, META_FILE, MODEL_FILE, SPECIAL_IDS, file_checksum

_ENGLISH = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak. You are all resolved rather to die than to famish?",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "We are accounted poor citizens, the patricians good.",
    "What authority surfeits on would relieve us: if they would yield us but the superfluity.",
    "user\nassistant\nsystem\nHello there, how are you today? I am fine, thank you.",
]
_CHINESE = ["学而时习之，不亦说乎？有朋自远方来，不亦乐乎？", "天下大势，分久必合，合久必分。", "你好，世界。"]


def build_tokenizer(directory: Path, vocab_size: int = 384) -> Path:
    """Train a byte-fallback BPE model on a small built-in corpus and write tokenizer.json beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = (_ENGLISH * 20) + (_CHINESE * 5)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", pad_id=SPECIAL_IDS["<pad>"], unk_id=SPECIAL_IDS["<unk>"],
        bos_id=SPECIAL_IDS["<s>"], eos_id=SPECIAL_IDS["</s>"], control_symbols=list(CHAT_SYMBOLS),
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
    (directory / "tokenizer.vocab").unlink(missing_ok=True)
    meta = {"checksum": file_checksum(directory / MODEL_FILE), "chat_template": CHAT_TEMPLATE,
            "special_tokens": SPECIAL_IDS, "chat_symbols": list(CHAT_SYMBOLS)}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory
