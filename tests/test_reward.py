"""Reward model: Bradley–Terry loss, score positions, save/load round trip and refusal of another tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt.config import ConfigError, MiniGPTConfig
from minigpt.model import MiniGPT
from minigpt.tokenizer import Tokenizer
from minigpt.tokenizer_training import train_tokenizer
from minigpt.train.reward import (
    RewardModel,
    bradley_terry_loss,
    load_reward_model,
    response_end_positions,
    save_reward_model,
    score_sequences,
)
from minigpt.weights import save_consolidated


def build_tokenizer(directory, text: str = "Sort dbca\nReverse cabd\nAdd 27+45\n" * 40,
                    vocab_size: int = 330) -> Tokenizer:
    corpus = directory.parent / f"{directory.name}.txt"
    corpus.write_text(text)
    return train_tokenizer([corpus], directory, vocab_size=vocab_size)


def _backbone(vocab: int) -> MiniGPT:
    torch.manual_seed(0)
    return MiniGPT(MiniGPTConfig(vocab_size=vocab, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                 ffn_hidden_size=32, max_seq_len=32))


def test_bradley_terry_loss_matches_hand_computation():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert math.isclose(loss[0].item(), math.log(1 + math.exp(-1.0)), rel_tol=1e-6)
    assert math.isclose(loss[1].item(), math.log(2), rel_tol=1e-6)


def test_score_is_read_at_the_last_response_token():
    labels = torch.tensor([[-100, -100, 7, 9, -100, -100],   # input 4 holds the response's last token
                           [-100, -100, -100, -100, -100, 5],  # cut at the context end: last position
                           [-100] * 6])                       # no response at all: position 0
    assert response_end_positions(labels).tolist() == [4, 5, 0]


def test_reward_model_scores_one_value_per_row_and_still_gives_logits():
    model = RewardModel(_backbone(40))
    ids = torch.randint(4, 40, (3, 8))
    scores = model(ids, score_positions=torch.tensor([7, 3, 0]))
    assert scores.shape == (3,)
    assert model(ids).shape == (3, 8, 40)
    # A score at position 3 does not depend on later tokens (causal).
    changed = ids.clone()
    changed[1, 5:] = 4
    torch.testing.assert_close(model(changed, score_positions=torch.tensor([7, 3, 0]))[1], scores[1])


def test_saved_reward_model_loads_and_scores_the_same(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tok")
    model = RewardModel(_backbone(tokenizer.vocab_size))
    torch.nn.init.normal_(model.head.weight)
    out = save_reward_model(tmp_path / "rm", model.state_dict(), model.config, tokenizer.directory)
    loaded = load_reward_model(out, tokenizer)
    sequences = [[5, 6, 7, 8], [9, 10]]
    torch.testing.assert_close(score_sequences(loaded, sequences, 0, torch.device("cpu")),
                               score_sequences(model.eval(), sequences, 0, torch.device("cpu")))


def test_reward_model_of_another_tokenizer_is_refused(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tok")
    other = build_tokenizer(tmp_path / "other", text="completely different words, another vocabulary\n" * 50,
                            vocab_size=340)
    model = RewardModel(_backbone(other.vocab_size))
    out = save_reward_model(tmp_path / "rm", model.state_dict(), model.config, other.directory)
    with pytest.raises(ConfigError, match="policy's"):
        load_reward_model(out, tokenizer)


def test_reward_model_of_another_tokenizer_with_the_same_vocab_size_is_refused(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tok")
    other = build_tokenizer(tmp_path / "other", text="Sort dbca\nReverse cabd\nAdd 28+45\n" * 40)
    assert other.vocab_size == tokenizer.vocab_size and other.checksum != tokenizer.checksum
    model = RewardModel(_backbone(other.vocab_size))
    out = save_reward_model(tmp_path / "rm", model.state_dict(), model.config, other.directory)
    with pytest.raises(ConfigError, match="tokenizer .* differs"):
        load_reward_model(out, tokenizer)


def test_plain_language_model_is_not_a_reward_model(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tok")
    backbone = _backbone(tokenizer.vocab_size)
    save_consolidated(tmp_path / "lm", backbone.state_dict(), backbone.config, tokenizer.directory)
    with pytest.raises(ConfigError, match="not a reward model"):
        load_reward_model(tmp_path / "lm", tokenizer)
