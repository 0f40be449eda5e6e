"""Rebuild the Chinese demo corpus that ships in the package (`minigpt/data/zh_classics_demo.jsonl.xz`).

    python data_tools/make_zh_demo.py ../shared/data/zh_classics.jsonl

The source is `zh_classics.jsonl` (one {"text": ...} poem per line), built from the chinese-poetry collection
(https://github.com/chinese-poetry/chinese-poetry, MIT licence, copyright (c) 2016 JackeyGao; the texts
themselves are public domain). The subset is deterministic: every record from the Book of Songs onwards
(诗经, 楚辞, 唐诗三百首, 千家诗, 声律启蒙, 花间集: the texts a reader knows, 静夜思 among them) and every
tenth Song ci before the Yuan dramas; the dramas themselves are left out (long prose-like passages), and so
is any text with a `●` (the placeholder of a glyph the source could not show, as in the character
dictionary 文字蒙求, where nearly every entry is one) or longer than 3,000 characters (prose, not poetry).
"""

import json
import lzma
import sys
from pathlib import Path

CLASSICS_START = "甫田/"
"""The Book of Songs poem where the run of well-known classics begins in zh_classics.jsonl."""
SONG_CI_END = 21400
"""Records before this index are Song ci; after it come the Yuan dramas."""
SONG_CI_STRIDE = 10
MISSING_GLYPH = "●"
MAX_CHARS = 3000
OUT = Path(__file__).resolve().parent.parent / "minigpt" / "data" / "zh_classics_demo.jsonl.xz"


def select(texts: list[str]) -> list[str]:
    """The demo subset of zh_classics' texts, in corpus order."""
    starts = [i for i, text in enumerate(texts) if text.replace("\n", "/").startswith(CLASSICS_START)]
    if not starts:
        raise SystemExit(f"error: no record starts with {CLASSICS_START!r}; is this zh_classics.jsonl?")
    chosen = texts[:SONG_CI_END:SONG_CI_STRIDE] + texts[starts[0]:]
    return [text for text in chosen if MISSING_GLYPH not in text and len(text) <= MAX_CHARS]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    texts = [json.loads(line)["text"] for line in Path(argv[0]).read_text(encoding="utf-8").splitlines()]
    chosen = select(texts)
    payload = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in chosen).encode()
    OUT.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    print(f"{len(chosen)} of {len(texts)} texts, {len(payload) / 1e6:.2f} MB -> {OUT} "
          f"({OUT.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
