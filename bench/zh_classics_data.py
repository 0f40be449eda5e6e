"""The zh_classics split of the Chinese quality benchmark: whole documents held out.

`../shared/data/zh_classics.jsonl` holds 34,438 classical Chinese texts (poems, ci, qu, one per line).
Every 20th document (index 0, 20, 40, ...) is held out for validation, the rest train; each split is the
documents in corpus order joined by a blank line, so the line structure of the poems is what a model
learns and is scored on. Both the recipe and the character-level baseline train on the same training text
and are scored in bits per UTF-8 byte of the same validation text.
"""

from __future__ import annotations

import json
from pathlib import Path

from shakespeare_data import PreparedData, prepare_texts

ZH_CLASSICS = Path(__file__).resolve().parents[2] / "shared" / "data" / "zh_classics.jsonl"
HELD_OUT_EVERY = 20
SEPARATOR = "\n\n"


def split_documents(path: Path = ZH_CLASSICS, limit: int | None = None) -> tuple[str, str]:
    """(training text, validation text): documents whose index is a multiple of 20 are held out.
    `limit`: only the first `limit` documents (quick runs)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the zh_classics corpus is missing (expected in ../shared/data)")
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = texts[:limit] if limit else texts
    held_out = [text for i, text in enumerate(texts) if i % HELD_OUT_EVERY == 0]
    kept = [text for i, text in enumerate(texts) if i % HELD_OUT_EVERY != 0]
    return SEPARATOR.join(kept) + SEPARATOR, SEPARATOR.join(held_out) + SEPARATOR


def prepare(out: Path, vocab_size: int, source: Path = ZH_CLASSICS, limit: int | None = None) -> PreparedData:
    """The tokenizer and shards of the zh_classics split under `out`."""
    train_text, val_text = split_documents(source, limit)
    return prepare_texts(out, vocab_size, train_text, val_text, str(source),
                         (f"documents not a multiple of {HELD_OUT_EVERY}", f"every {HELD_OUT_EVERY}th document"))
