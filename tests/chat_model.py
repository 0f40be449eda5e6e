"""A tiny chat model overfitted on a few conversations, saved as a consolidated directory, so chat and
serving tests see real, predictable answers: one that depends on the history, one on the system prompt,
one in Chinese, and a plain text continuation."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from model_factory import small_test_config
from spm_fixture import build_tokenizer

from minigpt.model import MiniGPT
from minigpt.tokenizer import Tokenizer
from minigpt.weights import save_consolidated

PLAIN_TEXT = "First Citizen: Before we proceed any further, hear me speak."


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


CONVERSATIONS = [
    [_user("Hi"), _assistant("Hello there, how are you?")],
    # "All" after the greeting is answered differently from "All" alone: the history matters.
    [_user("Hi"), _assistant("Hello there, how are you?"), _user("All"), _assistant("Speak, speak.")],
    [_user("All"), _assistant("We are accounted poor citizens.")],
    [{"role": "system", "content": "Be brief."}, _user("Hi"), _assistant("Hi.")],
    [_user("你好"), _assistant("你好，世界。天下大势，分久必合。")],
]


_built: list[Path] = []


def shared_chat_model(tmp_path_factory) -> Path:
    """The model, built once per test session and shared by the chat, serving and web tests."""
    if not _built or not (_built[0] / "model.pt").exists():
        _built[:] = [build_chat_model(tmp_path_factory.mktemp("chat_model"))]
    return _built[0]


def build_chat_model(directory: Path, steps: int = 200, max_seq_len: int = 96) -> Path:
    """Train the model (about a second of CPU) and save it with its tokenizer under `directory`."""
    tokenizer = Tokenizer(build_tokenizer(directory / "tokenizer"))
    docs = [tokenizer.encode(PLAIN_TEXT, eos=True)] + [tokenizer.encode_chat(c).ids for c in CONVERSATIONS]
    width = max(len(d) for d in docs)
    assert width <= max_seq_len, width
    ids = torch.full((len(docs), width), tokenizer.pad_id)
    targets = torch.full((len(docs), width), -100)
    for row, doc in enumerate(docs):
        ids[row, :len(doc)] = torch.tensor(doc)
        targets[row, :len(doc) - 1] = torch.tensor(doc[1:])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared CI machine
    torch.manual_seed(0)
    model = MiniGPT(small_test_config(vocab_size=384, max_seq_len=max_seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return save_consolidated(directory / "model", model.state_dict(), model.config, tokenizer.directory)
