"""The built-in demo corpora: the Chinese one ships inside the package (no download, attribution kept)."""

import json
from pathlib import Path

import pytest

from minigpt.config import TrainConfig
from minigpt.data.demo import CORPORA, chinese_demo_jsonl, demo_language, write_demo_corpus
from minigpt.runtime import Runtime
from minigpt.train.run_data import DataError, planned_inputs, resolve_run_data

ROOT = Path(__file__).resolve().parent.parent


def test_chinese_demo_corpus_is_classical_poetry_with_its_licence_beside_it():
    records = [json.loads(line) for line in chinese_demo_jsonl().splitlines()]
    texts = [record["text"] for record in records]
    assert len(texts) > 3000 and all(text.strip() for text in texts)
    assert any(text.startswith("靜夜思（李白）\n床前明月光") for text in texts)
    chinese = sum("\u4e00" <= char <= "\u9fff" for text in texts for char in text)
    assert chinese / sum(map(len, texts)) > 0.7
    notice = (ROOT / "minigpt" / "data" / "zh_classics_demo.NOTICE").read_text(encoding="utf-8")
    assert "chinese-poetry" in notice and "MIT License" in notice and "JackeyGao" in notice


def test_the_package_declares_the_corpus_and_its_notice_as_package_data():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"zh_classics_demo.jsonl.xz"' in pyproject and '"zh_classics_demo.NOTICE"' in pyproject


@pytest.mark.parametrize("language", sorted(CORPORA))
def test_demo_corpora_are_written_whole_under_their_own_names(tmp_path, language):
    path = write_demo_corpus(tmp_path / CORPORA[language], language)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and len(text) > 100_000
    if language == "zh":
        assert all(json.loads(line)["text"] for line in text.splitlines())


def test_an_unknown_built_in_corpus_is_refused_with_the_choices():
    assert demo_language("shards/web") is None
    with pytest.raises(ValueError, match="demo:fr: no such built-in corpus; choose demo:en or demo:zh"):
        demo_language("demo:fr")
    with pytest.raises(DataError, match="--data demo:fr"):
        planned_inputs(TrainConfig.of(data=["demo:fr"]))


def test_a_pretraining_corpus_is_refused_for_a_post_training_mode(tmp_path):
    cfg = TrainConfig.of(mode="sft", data=["demo:zh"], data_dir=str(tmp_path))
    with pytest.raises(DataError, match="demo:zh is a pretraining corpus; --mode sft needs sft records"):
        resolve_run_data(cfg, Runtime(), None, "sft")
    assert not (tmp_path / "cache").exists()


def test_data_demo_zh_trains_a_tokenizer_on_chinese_and_tokenizes_the_poems(tmp_path):
    cfg = TrainConfig.of(data=["demo:zh"], data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"),
                      vocab_size=2000)
    run = resolve_run_data(cfg, Runtime(), None, "pretrain")
    assert (tmp_path / "data" / "cache" / "demo" / "zh_classics.jsonl").is_file()
    assert run.tokenizer.meta["training"]["coverage"]["char_coverage"] > 0.7
    assert run.tokenizer.decode(run.tokenizer.encode("床前明月光")) == "床前明月光"
    assert planned_inputs(cfg) == ["<built-in Chinese demo corpus (demo:zh)>"]


@pytest.mark.parametrize("corpus,vocab", [("demo:zh", 8000), ("demo:en", 4096)])  # the READMEs' quick starts
def test_a_demo_corpus_tokenizer_covers_the_built_in_post_training_data(tmp_path, corpus, vocab):
    """The documented chain (pretrain on a built-in corpus, then sft/dpo/rlhf on the built-in bilingual data)
    inherits the pretraining tokenizer: it must have pieces for the tasks' letters, digits and Chinese verbs,
    or every later stage warns that it spells its data as bytes."""
    from minigpt.data.demo import CONVERSATIONS, demo_post_training_records
    cfg = TrainConfig.of(data=[corpus], data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"), vocab_size=vocab)
    tokenizer = resolve_run_data(cfg, Runtime(), None, "pretrain").tokenizer
    def strings(value):
        if isinstance(value, dict):
            return [s for key, v in value.items() if key not in ("role", "task") for s in strings(v)]
        return [s for v in value for s in strings(v)] if isinstance(value, list) else [value]
    text = "\n".join(s for kind in ("sft", "dpo", "rlhf") for r in demo_post_training_records(kind) for s in strings(r))
    total, uncovered = tokenizer.character_counts(text)
    assert 1 - uncovered.total() / total >= 0.99, uncovered.most_common(10)
    # The tasks' letters stay single pieces in the Chinese tokenizer (no "bh" learned from random letter strings),
    # so reversing and sorting are over the tokens the model sees; the verbs are one piece each.
    if corpus == "demo:zh":
        letter_pairs = [a + b for a in "abcdefgh" for b in "abcdefgh"]
        vocabulary = {tokenizer.sp.id_to_piece(i).lstrip("▁") for i in range(tokenizer.vocab_size)}
        assert len(set(letter_pairs) & vocabulary) <= 8  # of 64: only what the chats' English words bring
        for prompt in ("倒序写出 ebhdg", "按字母排序 fbhdg"):
            verb, letters = prompt.split(" ")
            pieces = [tokenizer.sp.id_to_piece(i) for i in tokenizer.encode(prompt)]
            assert pieces == [verb, "▁" + letters[0], *letters[1:]], pieces
        # ...and the chats fit the Chinese chat recipe's --seq-len 48 (tests a tokenizer of spelled-out English)
        longest = max(len(tokenizer.encode_chat([{"role": "user", "content": user},
                                                 {"role": "assistant", "content": good}]).ids)
                      for user, good, _poor in CONVERSATIONS)
        assert longest <= 49, longest
