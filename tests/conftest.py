"""Shared fixtures: a tokenizer trained once per session on the demo corpus plus some Chinese."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from minigpt.data.build import build_dataset
from minigpt.data.demo import write_demo_corpus
from minigpt.tokenizer import Tokenizer
from minigpt.tokenizer_training import train_tokenizer

# A rank or run that the C++ runtime aborts prints its Python stack (subprocesses inherit this).
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
# Messages are asserted in English; tests of the Chinese ones set MINIGPT_LANG themselves.
os.environ["MINIGPT_LANG"] = "en"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHINESE_LINES = ["学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？",
                 "天下大势，分久必合，合久必分。", "道可道，非常道；名可名，非常名。", "你好，世界。"]


def shared_file(name: str) -> Path:
    """A corpus from ../shared/data beside the repository, or skip the test that needs it."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present (shared corpora live beside the repository)")
    return path


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    return write_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus.txt")


@pytest.fixture(scope="session")
def chinese_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zh") / "zh.jsonl"
    path.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in CHINESE_LINES * 20),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shards(tmp_path_factory, demo_corpus, data_tokenizer) -> Path:
    """Pretraining shards of the demo corpus in `data_tokenizer`'s vocabulary (the end-to-end runs' data)."""
    out = tmp_path_factory.mktemp("shards") / "demo"
    build_dataset([demo_corpus], out, data_tokenizer, kind="pretrain", val_fraction=0.05, seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def data_tokenizer(tmp_path_factory, demo_corpus, chinese_jsonl) -> Tokenizer:
    """A 600-token MiniGPT tokenizer trained by `train_tokenizer` (English demo text + Chinese)."""
    return train_tokenizer([demo_corpus, chinese_jsonl], tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=600)


def pytest_addoption(parser):
    parser.addoption("--integration", action="store_true", default=False,
                     help="also run the tests marked `integration` (multi-rank DeepSpeed, Slurm, end-to-end runs)")


def pytest_collection_modifyitems(config, items):
    """Fast unit tests by default; `--integration` (what CI runs) adds the slow tiers."""
    if config.getoption("--integration") or config.getoption("-m"):
        return
    kept = [item for item in items if "integration" not in item.keywords]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if "integration" in item.keywords])
        items[:] = kept
