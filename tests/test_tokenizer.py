"""Tokenizer training: lossless round trips, byte fallback, fixed special ids, the chat mask, the directory."""

from __future__ import annotations

import json
import os
import random
import stat

import pytest
from conftest import shared_file

from minigpt.cli import train_tokenizer as train_tokenizer_cli
from minigpt.tokenizer import (
    IM_END,
    IM_START,
    META_FILE,
    MODEL_FILE,
    Tokenizer,
    TokenizerError,
    file_checksum,
)
from minigpt.tokenizer_training import train_tokenizer

TRICKY_TEXTS = [
    "Hello, world!", " leading space", "trailing space ", "  two  spaces\tand a tab\n\nnew lines\n",
    "def f(x):\n    return x ** 2  # indented code\n", "12345 + 678 = 13023", "",
    "学而时习之，不亦说乎？", "中文 mixed with English, and 数字 42.", "emoji 😀🚀 and rare 𠀀 𪚥 ǅ ﬁ",
    "Ünïcödé àccents — “quotes” … ½",
]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_is_lossless(data_tokenizer, text):
    assert data_tokenizer.decode(data_tokenizer.encode(text)) == text


def test_rare_characters_and_emoji_fall_back_to_bytes(data_tokenizer):
    for char in ("😀", "𠀀", "𪚥"):
        ids = data_tokenizer.encode(char)
        pieces = [data_tokenizer.id_to_piece(i) for i in ids]
        assert data_tokenizer.unk_id not in ids
        assert pieces == [f"<0x{b:02X}>" for b in char.encode("utf-8")]


def test_special_ids_are_fixed_and_chat_markers_cannot_be_typed(data_tokenizer):
    sp = data_tokenizer.sp
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert sp.id_to_piece(data_tokenizer.im_start_id) == IM_START
    assert sp.id_to_piece(data_tokenizer.im_end_id) == IM_END
    assert data_tokenizer.stop_ids == (3, data_tokenizer.im_end_id)
    # A user typing the marker gets plain text, never the control token (no prompt injection) ...
    typed = data_tokenizer.encode(f"hi {IM_START}system")
    assert data_tokenizer.im_start_id not in typed
    assert data_tokenizer.decode(typed) == f"hi {IM_START}system"
    # ... and decoding real markers drops them.
    chat = data_tokenizer.encode_chat([{"role": "user", "content": "hey"}])
    assert data_tokenizer.decode(chat.ids) == "user\nhey\n"


def test_directory_records_checksum_vocab_and_inputs(data_tokenizer, demo_corpus):
    meta = json.loads((data_tokenizer.directory / META_FILE).read_text())
    assert meta["checksum"] == file_checksum(data_tokenizer.directory / MODEL_FILE)
    assert meta["vocab_size"] == data_tokenizer.vocab_size == 600
    assert meta["chat_template"] == "chatml"
    assert meta["special_tokens"] == {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    assert str(demo_corpus) in [source["path"] for source in meta["training"]["inputs"]]
    assert sorted(p.name for p in data_tokenizer.directory.iterdir()) == [META_FILE, MODEL_FILE]


def test_modified_model_file_is_refused(data_tokenizer, tmp_path):
    copy = tmp_path / "tok"
    copy.mkdir()
    (copy / META_FILE).write_bytes((data_tokenizer.directory / META_FILE).read_bytes())
    (copy / MODEL_FILE).write_bytes((data_tokenizer.directory / MODEL_FILE).read_bytes() + b"\0")
    with pytest.raises(TokenizerError, match="checksum"):
        Tokenizer(copy)


def test_assistant_mask_covers_exactly_the_assistant_turns(data_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2+3"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "和 3+4？"},
                {"role": "assistant", "content": "七 (seven)"}]
    chat = data_tokenizer.encode_chat(messages)
    assert len(chat.ids) == len(chat.assistant_mask)
    spans, current = [], []
    for token, masked in zip(chat.ids, chat.assistant_mask, strict=True):
        if masked:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    assert [span[-1] for span in spans] == [data_tokenizer.im_end_id] * 2
    assert [data_tokenizer.decode(span[:-1]) for span in spans] == ["5", "七 (seven)"]
    rendered = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 2+3<|im_end|>\n"
                "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\n和 3+4？<|im_end|>\n"
                "<|im_start|>assistant\n七 (seven)<|im_end|>\n")
    assert data_tokenizer.render(chat.ids) == rendered


def test_corpus_too_small_for_the_vocab_gives_a_smaller_vocab(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("a tiny corpus\n\nwith two paragraphs\n")
    tokenizer = train_tokenizer([corpus], tmp_path / "tok", vocab_size=5000)
    assert 262 < tokenizer.vocab_size < 5000
    assert tokenizer.decode(tokenizer.encode("a tiny corpus, 完")) == "a tiny corpus, 完"


def test_many_distinct_characters_train_at_a_small_vocab(tmp_path):
    rng = random.Random(0)
    lines = ["".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(30)) for _ in range(300)]
    corpus = tmp_path / "cjk.jsonl"
    corpus.write_text("".join(json.dumps({"body": line}, ensure_ascii=False) + "\n" for line in lines))
    tokenizer = train_tokenizer([corpus], tmp_path / "tok", vocab_size=400, text_field="body")
    assert all(tokenizer.decode(tokenizer.encode(line)) == line for line in lines)
    meta = json.loads((tokenizer.directory / META_FILE).read_text())
    assert meta["training"]["dropped_rare_characters"] > 0


def test_bad_requests_fail_clearly(tmp_path, demo_corpus):
    with pytest.raises(TokenizerError, match="vocab_size 100 is too small"):
        train_tokenizer([demo_corpus], tmp_path / "tok", vocab_size=100)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(TokenizerError, match="holds files other than a tokenizer"):
        train_tokenizer([demo_corpus], occupied, vocab_size=400)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"other": 1}\n')
    with pytest.raises(TokenizerError, match="no text to train on"):
        train_tokenizer([empty], tmp_path / "tok", vocab_size=400)


def test_records_with_a_lone_surrogate_are_left_out_of_training(tmp_path, demo_corpus, capsys):
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_text('{"text": "x\\ud800y"}\n{"prompt": "1+1", "chosen": "\\udc00", "rejected": "3"}\n')
    tokenizer = train_tokenizer([demo_corpus, corpus], tmp_path / "tok", vocab_size=400)
    assert tokenizer.decode(tokenizer.encode("x y")) == "x y"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "x\\ud800y"}\n')
    assert train_tokenizer_cli.main(["--input", str(broken), "--out", str(tmp_path / "only"),
                                     "--vocab-size", "400"]) == 2
    assert "no text to train on" in capsys.readouterr().err


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)], ids=["umask022", "umask027"])
def test_tokenizer_directory_gets_the_permissions_of_an_ordinary_mkdir(tmp_path, demo_corpus, umask, mode):
    old = os.umask(umask)
    try:
        tokenizer = train_tokenizer([demo_corpus], tmp_path / "tok", vocab_size=400)
    finally:
        os.umask(old)
    assert stat.S_IMODE(tokenizer.directory.stat().st_mode) == mode


def test_cli_trains_and_retrains_in_place(tmp_path, capsys):
    out = tmp_path / "tok"
    assert train_tokenizer_cli.main(["--demo", "--out", str(out), "--vocab-size", "400"]) == 0
    first = file_checksum(out / MODEL_FILE)
    assert train_tokenizer_cli.main(["--demo", "--out", str(out), "--vocab-size", "500"]) == 0
    assert file_checksum(out / MODEL_FILE) != first and Tokenizer(out).vocab_size == 500
    assert train_tokenizer_cli.main(["--input", str(tmp_path / "missing.txt"), "--out", str(out),
                                     "--vocab-size", "400"]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err


def test_shared_corpora_round_trip(tmp_path):
    english, chinese = shared_file("tinyshakespeare.txt"), shared_file("zh_classics.jsonl")
    tokenizer = train_tokenizer([english, chinese], tmp_path / "tok", vocab_size=1000, input_sentence_size=20000)
    texts = english.read_text(encoding="utf-8").split("\n\n")[:300]
    with open(chinese, encoding="utf-8") as handle:
        texts += [json.loads(next(handle))["text"] for _ in range(300)]
    assert all(tokenizer.decode(tokenizer.encode(text)) == text for text in texts)


def test_same_corpus_and_settings_give_the_same_tokenizer_anywhere(demo_corpus, tmp_path):
    """Runs that train their own tokenizer (e.g. two Slurm jobs) must agree on it, checksum included."""
    from minigpt.tokenizer_training import train_tokenizer

    first = train_tokenizer([demo_corpus], tmp_path / "a" / "tok", vocab_size=400)
    second = train_tokenizer([demo_corpus], tmp_path / "elsewhere" / "tok", vocab_size=400)
    assert first.checksum == second.checksum
