"""The small MiniGPT shape the unit tests build models from (2 layers, width 64, GQA 4/2 heads)."""

import torch

from minigpt.config import MiniGPTConfig
from minigpt.model import MiniGPT


def small_test_config(vocab_size: int, **overrides) -> MiniGPTConfig:
    base = dict(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=128, max_seq_len=64)
    return MiniGPTConfig(**{**base, **overrides})


def seeded_model(config: MiniGPTConfig, seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(config)
