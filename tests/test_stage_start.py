"""A run says what it starts from, refuses a tokenizer that cannot spell its data, and does not land in the
quick start's run directory when it trains on one's own data."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from spm_fixture import _ENGLISH

from minigpt.config import PRESETS, ConfigError, TrainConfig
from minigpt.tokenizer_training import train_tokenizer
from minigpt.train.loop import Trainer, find_starting_weights
from minigpt.train.run_data import MIN_COVERAGE, character_coverage

SMALL = dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            ffn_hidden_size=64, max_seq_len=64)
QUICK = dict(seq_len=32, batch_size=2, max_steps=1, warmup_steps=0, eval_interval=0, log_interval=100)


@pytest.fixture(scope="module")
def english_tokenizer(tmp_path_factory):
    """A tokenizer that never saw a Chinese character: the quick start's, as a Chinese user inherits it."""
    root = tmp_path_factory.mktemp("english")
    (root / "en.txt").write_text("\n".join(_ENGLISH * 40), encoding="utf-8")
    return train_tokenizer([root / "en.txt"], root / "tokenizer", vocab_size=400)


@pytest.fixture
def small_tiny(monkeypatch, tmp_path):
    monkeypatch.setitem(PRESETS, "tiny", SMALL)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_default_run_directory_is_named_after_the_data():
    assert TrainConfig().run_dir == Path("checkpoints/pretrain_tiny")  # the quick start's, on the demo data
    assert TrainConfig.of(mode="sft", data=["../shared/data/zh_classics.jsonl"]).run_dir == \
        Path("checkpoints/sft_tiny_zh_classics")
    assert TrainConfig.of(data=["shards/mycorpus/", "more.txt"], config="small").run_dir == \
        Path("checkpoints/pretrain_small_mycorpus+1")
    assert TrainConfig.of(data=["a.txt"], out="runs/x").run_dir == Path("runs/x")


def make_final(run_dir: str, age: int = 0) -> Path:
    final = Path(run_dir) / "final"
    final.mkdir(parents=True)
    (final / "model.pt").write_bytes(b"")
    os.utime(final / "model.pt", (1e9 + age, 1e9 + age))
    return final


def test_a_stage_starts_from_the_run_on_its_own_data_before_the_quick_starts(small_tiny):
    make_final("checkpoints/pretrain_tiny")
    make_final("checkpoints/pretrain_tiny_old", age=1)
    make_final("checkpoints/pretrain_tiny_zh", age=2)
    make_final("checkpoints/pretrain_small_30m_zh", age=3)
    start = find_starting_weights
    assert start(TrainConfig.of(mode="sft")).source == "checkpoints/pretrain_tiny/final"
    assert start(TrainConfig.of(mode="sft", data=["zh_chat.jsonl"])).source == "checkpoints/pretrain_tiny_zh/final"
    make_final("checkpoints/pretrain_tiny_zh_chat")
    assert start(TrainConfig.of(mode="sft", data=["zh_chat.jsonl"])).source == "checkpoints/pretrain_tiny_zh_chat/final"
    assert start(TrainConfig.of(mode="sft", config="small", data=["zh.jsonl"])).source.startswith("random init")


def test_coverage_counts_characters_the_tokenizer_only_spells_as_bytes(english_tokenizer, data_tokenizer, shards):
    assert character_coverage(data_tokenizer, [shards])[0] > 0.99
    total, uncovered = english_tokenizer.character_counts("abc 天天地")
    assert total == 6 and uncovered == {"天": 2, "地": 1}


def test_a_tokenizer_that_cannot_spell_the_data_stops_the_run_with_how_to_train_one(
        small_tiny, english_tokenizer, chinese_jsonl, capsys):
    cfg = TrainConfig.of(data=[str(chinese_jsonl)], tokenizer=str(english_tokenizer.directory), **QUICK)
    with pytest.raises(ConfigError) as refused:
        Trainer(cfg)
    message = str(refused.value)
    assert f"tokenizer {english_tokenizer.directory} has pieces for only" in message
    assert f"python data_tools/train_tokenizer.py --input {chinese_jsonl} --out tokenizers/zh" in message
    assert "--allow-low-coverage" in message and f"{MIN_COVERAGE:.0%}" in message
    assert not (small_tiny / "checkpoints").exists()  # nothing written before the refusal

    Trainer(cfg.replace(allow_low_coverage=True))
    line = next(x for x in capsys.readouterr().out.splitlines() if " run checkpoints/pretrain_tiny_zh:" in x)
    assert "weights from random init" in line and f"tokenizer {english_tokenizer.directory} (--tokenizer" in line


def test_the_start_line_names_the_inherited_weights_and_tokenizer(small_tiny, data_tokenizer, shards, capsys):
    pretrain = TrainConfig.of(data=[str(shards)], tokenizer=str(data_tokenizer.directory), out="checkpoints/pretrain_tiny",
                           **QUICK)
    Trainer(pretrain).run()
    capsys.readouterr()
    Trainer(TrainConfig.of(mode="sft", **QUICK))  # the built-in demo chats, from the quick start's pretraining
    line = next(x for x in capsys.readouterr().out.splitlines() if "sft run checkpoints/sft_tiny:" in x)
    assert "weights from checkpoints/pretrain_tiny/final; tokenizer checkpoints/pretrain_tiny/final " \
           "(the starting weights'" in line and "% of the training data's characters" in line


def test_coverage_counts_the_datas_text_not_the_chat_templates_role_names(english_tokenizer):
    from minigpt.train.run_data import document_text

    conversation = english_tokenizer.encode_chat([{"role": "user", "content": "天地"},
                                                  {"role": "assistant", "content": "ok"}]).ids
    assert document_text(english_tokenizer, np.array(conversation)).split() == ["天地", "ok"]
