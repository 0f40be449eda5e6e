"""The built-in demo corpus: CPython's own documentation topics, so the quick start needs no download."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from pydoc_data.topics import topics


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
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(demo_text())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
