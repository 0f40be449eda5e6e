"""MiniGPT's sentencepiece model rebuilt from transformers' `tokenizer.json`.

A directory that transformers re-saved (`save_pretrained`) holds only its fast tokenizer's
`tokenizer.json`, not the `tokenizer.model` our export wrote. For a byte-fallback BPE that came from
sentencepiece, as every MiniGPT tokenizer does, that file carries everything encoding needs: the pieces in
id order (a sentencepiece BPE vocabulary is sorted by merge score, so the score of a piece is minus its
rank), the special and byte pieces, and the whitespace handling. Anything else (a prefix space, other
normalizers, merges out of vocabulary order) is refused by name: the rebuilt model would encode differently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from minigpt.i18n import _
from minigpt.tokenizer import BOS, CHAT_SYMBOLS, EOS, PAD, SPACE_SYMBOL, SPECIAL_IDS, UNK

HF_TOKENIZER_FILE = "tokenizer.json"
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
DIGIT = re.compile(r"\d")


class TokenizerJsonError(ValueError):
    """A tokenizer.json that cannot become a MiniGPT sentencepiece model; the message names the field."""


def _field(path: Path, where: str, value: Any, accepted: str) -> TokenizerJsonError:
    return TokenizerJsonError(_("{path}: {where} is {value}; MiniGPT needs {accepted} (a sentencepiece "
                                "byte-fallback BPE without a prefix space)")
                              .format(path=path, where=where, value=json.dumps(value)[:120], accepted=accepted))


def _check_whitespace_handling(path: Path, spec: dict) -> None:
    """Spaces must become `▁` with nothing prepended, by the normalizer or the pre-tokenizer."""
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_SYMBOL}
    if normalizer is not None and normalizer != replace:
        raise _field(path, "normalizer", normalizer, _("none, or Replace(' ' -> '▁')"))
    if pre is not None and not (pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE_SYMBOL
                                and pre.get("prepend_scheme") == "never" and not pre.get("split")):
        raise _field(path, "pre_tokenizer", pre, _("none, or Metaspace('▁', prepend_scheme 'never', no split)"))
    if normalizer is None and pre is None:
        raise _field(path, _("normalizer and pre_tokenizer"), None, _("spaces mapped to '▁'"))


def _pieces(path: Path, model: dict) -> list[str]:
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise _field(path, "model.vocab", type(vocab).__name__, _("a piece -> id mapping"))
    by_id = {token_id: piece for piece, token_id in vocab.items() if isinstance(token_id, int)}
    if sorted(by_id) != list(range(len(vocab))):
        raise TokenizerJsonError(_("{path}: model.vocab ids are not 0..{last}").format(path=path, last=len(vocab) - 1))
    pieces = [by_id[i] for i in range(len(vocab))]
    for piece, expected in SPECIAL_IDS.items():
        if vocab.get(piece) != expected:
            raise _field(path, _("the id of {piece}").format(piece=piece), vocab.get(piece),
                         _("id {expected}").format(expected=expected))
    if sum(bool(BYTE_PIECE.fullmatch(piece)) for piece in pieces) != 256:
        raise TokenizerJsonError(_("{path}: model.vocab lacks the 256 byte pieces <0x00>..<0xFF> of byte fallback")
                                 .format(path=path))
    return pieces


def _check_merge_order(path: Path, model: dict, vocab: dict[str, int]) -> None:
    """Merges must rank pieces in vocabulary order, as sentencepiece's scores do."""
    last = -1
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge if isinstance(merge, list) else str(merge).split(" ", 1)
        merged = vocab.get(left + right)
        if merged is None:
            raise TokenizerJsonError(_("{path}: merge {rank} ({left!r}, {right!r}) makes no vocabulary piece")
                                     .format(path=path, rank=rank, left=left, right=right))
        if merged < last:
            raise TokenizerJsonError(_("{path}: merge {rank} makes piece {merged} after piece {last}; merges out "
                                       "of vocabulary order do not come from sentencepiece")
                                     .format(path=path, rank=rank, merged=merged, last=last))
        last = merged


def sentencepiece_model_from_tokenizer_json(path: str | Path) -> bytes:
    """The serialized sentencepiece ModelProto equivalent to the fast tokenizer in `path`."""
    from sentencepiece import sentencepiece_model_pb2

    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise TokenizerJsonError(_("{path}: cannot be read as JSON ({err})").format(path=path, err=err)) from err
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise _field(path, "model.type", (model or {}).get("type"), "BPE")
    if not model.get("byte_fallback"):
        raise _field(path, "model.byte_fallback", model.get("byte_fallback"), "true")
    _check_whitespace_handling(path, spec)
    pieces = _pieces(path, model)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    _check_merge_order(path, model, vocab)

    proto = sentencepiece_model_pb2.ModelProto()
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    trainer.model_type = trainer.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    trainer.character_coverage = 1.0
    # MiniGPT's trainer splits digits; a vocabulary with multi-digit pieces was trained without it.
    trainer.split_digits = not any(DIGIT.search(piece) and len(piece) > 1 and not BYTE_PIECE.fullmatch(piece)
                                   for piece in pieces)
    trainer.allow_whitespace_only_pieces = True
    trainer.hard_vocab_limit = False
    trainer.pad_id, trainer.unk_id = SPECIAL_IDS[PAD], SPECIAL_IDS[UNK]
    trainer.bos_id, trainer.eos_id = SPECIAL_IDS[BOS], SPECIAL_IDS[EOS]
    trainer.control_symbols.extend(piece for piece in CHAT_SYMBOLS if piece in vocab)
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    first_normal = None
    for i, piece in enumerate(pieces):
        entry = proto.pieces.add(piece=piece, score=0.0)
        if piece == UNK:
            entry.type = entry.UNKNOWN
        elif piece in SPECIAL_IDS or piece in CHAT_SYMBOLS:
            entry.type = entry.CONTROL
        elif BYTE_PIECE.fullmatch(piece):
            entry.type = entry.BYTE
        else:
            first_normal = i if first_normal is None else first_normal
            entry.score = -float(i - first_normal)
    return proto.SerializeToString()
