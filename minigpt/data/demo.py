"""The built-in demo corpus: CPython's own documentation topics, so the quick start needs no download."""

from __future__ import annotations

from pathlib import Path
from pydoc_data.topics import topics

from minigpt.fsutil import atomic_write_text


def demo_text() -> str:
    """Every `pydoc_data` help topic (sorted by name), paragraphs separated by blank lines (~450 KB)."""
    parts = []
    for name in sorted(topics):
        lines = [line.rstrip() for line in topics[name].strip("\n").splitlines()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_demo_corpus(path: str | Path) -> Path:
    """Write the demo corpus as a .txt file at `path` (atomically: complete or absent) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, demo_text())
    return path
