"""`decode(encode(x)) == x` for any text, with tokenizers trained on Chinese-only, English-only and mixed
corpora (property-tested), and the coverage report of tokenizer training."""

from __future__ import annotations

import pytest
import sentencepiece as spm
from conftest import CHINESE_LINES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt.cli import train_tokenizer as train_tokenizer_cli
from minigpt.tokenizer import SPACE_SYMBOL, Tokenizer
from minigpt.tokenizer_training import train_tokenizer

ENGLISH_LINES = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be: that is the question.",
                 "def add(a, b):\n    return a + b", "Hello world, hello again."]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("roundtrip")
    corpora = {"chinese": CHINESE_LINES * 30, "english": ENGLISH_LINES * 30,
               "mixed": (CHINESE_LINES + ENGLISH_LINES) * 20}
    result = {}
    for name, lines in corpora.items():
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        result[name] = train_tokenizer([root / f"{name}.txt"], root / name, vocab_size=400)
    return result


# Any Unicode text Python can encode as UTF-8 (no lone surrogates), weighted towards what breaks tokenizers:
# spaces, tabs, newlines, the `▁` meta symbol itself, Chinese, emoji.
TEXTS = st.text(st.one_of(st.characters(blacklist_categories=("Cs",)),
                          st.sampled_from([" ", "\t", "\n", "\r", SPACE_SYMBOL, "\u3000", "学", "天", "😀", "a"])),
                max_size=40)


@pytest.mark.parametrize("corpus", ["chinese", "english", "mixed"])
def test_space_free_training_text_still_round_trips_english_spaces(tokenizers, corpus):
    tokenizer = tokenizers[corpus]
    for text in ("hello world", " 😀 中文 ", "a\tb\nc", "\u2581x y\u2581", "  \n\n\t "):
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("corpus", ["chinese", "english", "mixed"])
def test_whitespace_pieces_are_always_in_the_vocabulary(tokenizers, corpus):
    for piece in (SPACE_SYMBOL, "\t", "\n"):
        assert tokenizers[corpus].sp.piece_to_id(piece) != tokenizers[corpus].unk_id, piece


@pytest.mark.parametrize("corpus", ["chinese", "english", "mixed"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_any_text_round_trips(tokenizers, corpus, text):
    tokenizer = tokenizers[corpus]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_batch([text, "x"]) == [tokenizer.encode(text), tokenizer.encode("x")]


def test_a_tokenizer_without_the_space_piece_still_round_trips_spaces(tmp_path):
    """Tokenizers trained before the whitespace pieces were required: the fix is in encode."""
    lines = CHINESE_LINES * 30
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"), vocab_size=320, model_type="bpe",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, control_symbols=["<|im_start|>", "<|im_end|>"],
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, hard_vocab_limit=False, minloglevel=2)
    import json

    from minigpt.tokenizer import file_checksum

    (tmp_path / "tokenizer.json").write_text(json.dumps({"checksum": file_checksum(tmp_path / "tokenizer.model")}))
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.sp.piece_to_id(SPACE_SYMBOL) == tokenizer.unk_id
    for text in ("hello world", f"a{SPACE_SYMBOL}b c", " "):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_training_reports_character_coverage_and_byte_fallback(tmp_path, capsys):
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(CHINESE_LINES * 30) + "\n", encoding="utf-8")
    assert train_tokenizer_cli.main(["--input", str(corpus), "--out", str(tmp_path / "tok"),
                                     "--vocab-size", "320"]) == 0
    out = capsys.readouterr().out
    assert "character coverage" in out and "distinct characters fall back to UTF-8 bytes" in out
    coverage = Tokenizer(tmp_path / "tok").meta["training"]["coverage"]
    assert 0 < coverage["byte_fallback_chars"] < coverage["distinct_chars"]
    assert 0.5 < coverage["char_coverage"] < 1.0
    assert "--vocab-size" in out  # thin coverage: advice to raise it
