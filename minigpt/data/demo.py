"""The built-in demo data, so the quick start needs no download.

Pretraining corpora, named `demo:en` and `demo:zh` wherever a data file is accepted: CPython's own
documentation topics (English, the default when no --data is given) and a subset of classical Chinese
poetry shipped in the package (`zh_classics_demo.jsonl.xz`, from the chinese-poetry collection, MIT
licence: see `zh_classics_demo.NOTICE`). Post-training data is bilingual (Chinese and English) and
generated here: the verifiable tasks of `minigpt.data.tasks` phrased in both languages, plus a few
identity and chat conversations."""

from __future__ import annotations

import json
import lzma
import random
from importlib import resources
from pathlib import Path
from pydoc_data.topics import topics

from minigpt.data.tasks import generate_tasks, phrase
from minigpt.fsutil import atomic_write_text
from minigpt.i18n import _

CONVERSATIONS = [
    ("你好", "你好！我是 MiniGPT，一个小型语言模型。有什么可以帮你？", "嗯。"),
    ("你是谁？", "我是 MiniGPT，用 MiniGPT 项目从头训练的小型语言模型。", "我不知道。"),
    ("你能做什么？", "我会做简单的加法、倒序和排序，比如“计算 12+30”或者“按字母排序 dcba”。", "什么都不会。"),
    ("谢谢！", "不客气！还有什么问题吗？", "哦。"),
    ("Hello!", "Hello! I am MiniGPT, a small language model. How can I help?", "What."),
    ("Who are you?", "I am MiniGPT, a small language model trained from scratch with the MiniGPT project.",
     "I don't know."),
    ("What can you do?", "I can add numbers, reverse and sort letters: try \"Add 12+30\" or \"Sort dcba\".",
     "Nothing."),
    ("Thank you!", "You're welcome! Anything else?", "Ok."),
]
"""(user turn, good answer, poor answer): identity and chat turns in both languages."""


def demo_text() -> str:
    """Every `pydoc_data` help topic (sorted by name), paragraphs separated by blank lines (~450 KB)."""
    parts = []
    for name in sorted(topics):
        lines = [line.rstrip() for line in topics[name].strip("\n").splitlines()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


DEMO_PREFIX = "demo:"
CORPORA = {"en": "corpus.txt", "zh": "zh_classics.jsonl"}
"""Built-in pretraining corpora by language, and the file name each is written under."""
CHINESE_ARCHIVE = "zh_classics_demo.jsonl.xz"


def chinese_demo_jsonl() -> str:
    """The Chinese demo corpus as JSONL ({"text": poem} per line, ~1.8 MB, ~3,800 poems)."""
    archive = resources.files("minigpt.data").joinpath(CHINESE_ARCHIVE)
    return lzma.decompress(archive.read_bytes()).decode("utf-8")


def demo_language(name: str) -> str | None:
    """The language of a `demo:LANG` data name, None for an ordinary path; ValueError for an unknown one."""
    if not name.startswith(DEMO_PREFIX):
        return None
    language = name[len(DEMO_PREFIX):]
    if language not in CORPORA:
        raise ValueError(_("{name}: no such built-in corpus; choose {choices}").format(
            name=name, choices=_(" or ").join(DEMO_PREFIX + known for known in CORPORA)))
    return language


def write_demo_corpus(path: str | Path, language: str = "en") -> Path:
    """Write the `language` demo corpus at `path` (atomically: complete or absent) and return it:
    .txt for English, .jsonl for Chinese (the path's suffix should match `CORPORA[language]`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, demo_text() if language == "en" else chinese_demo_jsonl())
    return path


DEMO_TASKS = {"sft": 20_000, "dpo": 2_000, "rlhf": 2_000}
"""Tasks in each kind's built-in data. SFT needs the most: a `tiny` model answers held-out Chinese tasks with
exact match 0.91 after 7,000 steps of batch 32 over 20,000 of them, and 0.53 over 2,000 (docs/performance.md)."""

TOKENIZER_SAMPLE = 2_000
"""Tasks of the built-in SFT data a tokenizer for a built-in corpus also learns (`tokenizer_text`): enough for
every character, few enough that the corpus keeps its pieces."""


def demo_post_training_records(kind: str, count: int | None = None, seed: int = 0) -> list[dict]:
    """`count` tasks (default `DEMO_TASKS[kind]`; every other one phrased in Chinese) as `kind` ("sft", "dpo"
    or "rlhf") records, with the identity conversations mixed in (not for rlhf: its rule reward needs a
    checkable answer)."""
    if kind not in DEMO_TASKS:
        raise ValueError(_("no demo data for kind {kind!r}; choose sft, dpo or rlhf").format(kind=kind))
    count = DEMO_TASKS[kind] if count is None else count
    records = []
    for index, task in enumerate(generate_tasks(count, seed)):
        prompt = phrase(task["prompt"], "zh" if index % 2 == 1 else "en")
        if kind == "sft":
            records.append({"conversations": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": task["reference"]}]})
        elif kind == "dpo":
            records.append({"prompt": prompt, "chosen": task["reference"], "rejected": task["wrong"]})
        else:
            records.append({"prompt": prompt, "reference": task["reference"], "task": task["task"]})
    if kind != "rlhf":
        for _repeat in range(max(1, count // 100)):  # often enough to be learned
            for user, good, poor in CONVERSATIONS:
                records.append({"conversations": [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": good}]} if kind == "sft"
                               else {"prompt": user, "chosen": good, "rejected": poor})
    random.Random(seed).shuffle(records)
    return records


def write_demo_post_training(path: str | Path, kind: str, count: int | None = None, seed: int = 0) -> Path:
    """Write the bilingual demo `kind` data as JSONL at `path` (atomically) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                    for r in demo_post_training_records(kind, count, seed)))
    return path


def tokenizer_text(count: int = TOKENIZER_SAMPLE, seed: int = 0) -> str:
    """What a tokenizer trained for a built-in corpus learns of the built-in post-training data, as paragraphs:
    the chats as they are, and `count` tasks whose letter strings are spelled one by one ("倒序写出 e b h d g").

    The tasks' letter strings are random: learned as written, they fill the vocabulary with pieces such as "bh"
    and "gd", and a model must then reverse and sort letters hidden inside pieces it never sees spelled out.
    Spelled apart they teach the letters and no merge; the chats' few English words still add some ("ag" of
    "language"), and an English corpus brings its own. Digits are split by the tokenizer anyway. Measured on the
    Chinese chat recipe (docs/performance.md#the-chinese-chat-recipe)."""
    paragraphs = []
    for index, task in enumerate(generate_tasks(count, seed)):
        verb, argument = phrase(task["prompt"], "zh" if index % 2 == 1 else "en").split(" ", 1)
        spelled = task["task"] != "add"
        answer = " ".join(task["reference"]) if spelled else task["reference"]
        paragraphs.append(f"{verb} {' '.join(argument) if spelled else argument}\n{answer}")
    chats = [f"{user}\n{good}\n{poor}" for user, good, poor in CONVERSATIONS]
    paragraphs += chats * max(1, count // 100)  # as often as in the SFT data, so their characters are kept
    return "\n\n".join(paragraphs) + "\n"


def write_tokenizer_text(path: str | Path, count: int = TOKENIZER_SAMPLE) -> Path:
    """Write `tokenizer_text(count)` at `path` (atomically) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tokenizer_text(count))
    return path
