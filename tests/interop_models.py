"""MiniGPT model directories for the export/import tests: random or briefly trained, tied or untied."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from model_factory import seeded_model, small_test_config

from minigpt.model import MiniGPT
from minigpt.tokenizer import Tokenizer
from minigpt.weights import save_consolidated

TEXTS = ["First Citizen: Before we proceed any further, hear me speak.",
         "All: Speak, speak. You are all resolved rather to die than to famish?",
         "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 🦙"},
        {"role": "assistant", "content": "Hello there, how are you?"}]


def random_model(vocab_size: int, seed: int = 0, **overrides) -> MiniGPT:
    """Random weights with a wide init, so logits differ clearly between tokens."""
    model = seeded_model(small_test_config(vocab_size, **overrides), seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)  # not all ones, so a misplaced norm weight shows
            else:
                param.normal_(std=0.15)
    return model.eval()


def trained_model(tokenizer: Tokenizer, steps: int = 60, **overrides) -> MiniGPT:
    """A small model fitted to a few documents and one conversation, so greedy decoding gives real text."""
    torch.manual_seed(0)
    model = MiniGPT(small_test_config(tokenizer.vocab_size, **overrides))
    docs = [tokenizer.encode(t, eos=True) for t in TEXTS] + [tokenizer.encode_chat(CHAT).ids]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        for doc in docs:
            ids = torch.tensor([doc])
            loss = F.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def save_model(directory: Path, model: MiniGPT, tokenizer: Tokenizer) -> Path:
    return save_consolidated(directory, model.state_dict(), model.config, tokenizer.directory)
