"""Raw input files: find them, cut them into records, and parse each record for a dataset kind.

A `.txt` file is a sequence of documents separated by blank lines (paragraphs); a `.jsonl` or
`.jsonl.gz` file holds one JSON object per line; a `.parquet` file holds one record per row (read by
`minigpt.data.parquet` with the optional pyarrow, each row already a dict). Parsing never raises on bad
input: it returns a `Skip` with a reason, which the builder counts per file (see docs/data.md for the
reasons). A UTF-8 byte order mark at the start of a file is dropped.

`iter_raw_records` reads a file record by record; `iter_blocks` reads it in blocks of whole records
(for the builder, which hands each block to a worker and can resume after the last block written),
which `block_records` cuts into the same records.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import re
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from minigpt.i18n import _
from minigpt.tokenizer import CHAT_ROLES, is_utf8_text

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
PARQUET_INSTALL = 'pip install -e ".[parquet]"'
MAX_DOCUMENT_CHARS = 1 << 16
"""Pretraining documents longer than this many characters are cut into pieces (see `cut_long_text`)."""


class InputError(ValueError):
    """An input path that does not exist, matches nothing, or has an unsupported suffix."""


@dataclass
class Skip:
    """A record that cannot be used, and why (a short reason name counted in the stats)."""

    line: int
    reason: str
    detail: str = ""


@dataclass
class Example:
    """One usable record: `text` for pretraining, `messages` for SFT/RLHF, `chosen`/`rejected` for DPO.

    `prompt_messages` is the prompt part for DPO and RLHF; `extra` holds what RLHF keeps beside the
    prompt tokens (the reference answer and any other fields of the record).
    """

    line: int
    text: str | None = None
    messages: list[dict] | None = None
    prompt_messages: list[dict] | None = None
    chosen: list[dict] | None = None
    rejected: list[dict] | None = None
    extra: dict = field(default_factory=dict)


def input_format(path: Path) -> str:
    """'txt', 'jsonl' or 'parquet' from the file name; anything else is an InputError naming the file."""
    name = path.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise InputError(_("{path}: unsupported input suffix; use .txt, .jsonl, .jsonl.gz or .parquet").format(
        path=path))


def require_parquet_reader(path: Path) -> None:
    """InputError naming `path` and the install command when pyarrow, which reads Parquet, is missing."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as err:
        raise InputError(_("{path}: reading Parquet needs pyarrow, which is not installed; install it with "
                           "{command}").format(path=path, command=PARQUET_INSTALL)) from err


def record_columns(kind: str | None, text_field: str = "text") -> list[str] | None:
    """The Parquet columns a `kind` dataset reads (None: every column, as RLHF keeps them all); kind None:
    what a tokenizer learns from (the text field and the chat fields)."""
    if kind is None:
        return [text_field, *CHAT_FIELDS]
    if kind == "rlhf":
        return None
    return [text_field] if kind == "pretrain" else list(USED_FIELDS[kind])


def record_bytes(raw: bytes | dict) -> int:
    """The size of a raw record in bytes (a Parquet row: the UTF-8 length of its strings, about)."""
    if isinstance(raw, bytes):
        return len(raw)
    return sum(len(v) if isinstance(v, str) else 8 for v in raw.values())


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files named by `inputs` (paths or glob patterns, each pattern's matches sorted), without duplicates."""
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        if glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                raise InputError(_("input pattern {pattern!r} matches no file").format(pattern=text))
        else:
            if not Path(text).is_file():
                raise InputError(_("input {path}: no such file").format(path=text))
            matches = [Path(text)]
        for match in matches:
            if input_format(match) == "parquet":
                require_parquet_reader(match)
            if match.resolve() not in {f.resolve() for f in files}:
                files.append(match)
    if not files:
        raise InputError(_("no input files given"))
    return files


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _numbered_lines(handle) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line, without the UTF-8 byte order mark some editors put first."""
    for number, line in enumerate(handle, start=1):
        if number == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        yield number, line


def iter_raw_records(path: Path, columns: list[str] | None = None, first_row: int = 1
                     ) -> Iterator[tuple[int, bytes | dict]]:
    """(first line number, raw bytes) of each record: a paragraph of a .txt file or a line of a .jsonl file;
    (row number, row dict) of a .parquet file, reading only `columns` (None: all; see `record_columns`).
    Only the records from line or row `first_row` on are yielded: a Parquet file's earlier rows are not
    decoded (a text file's are read and passed over; `iter_blocks` resumes it by byte offset instead).

    Raises InputError (naming the file) when a compressed or Parquet file is corrupt or truncated.
    """
    fmt = input_format(path)
    if fmt == "parquet":
        require_parquet_reader(path)
        from minigpt.data.parquet import ParquetReadError, iter_rows
        try:
            yield from iter_rows(path, columns, first_row)
        except ParquetReadError as err:
            raise InputError(str(err)) from err
        return
    records = _text_records(path, fmt)
    yield from records if first_row <= 1 else ((line, raw) for line, raw in records if line >= first_row)


def _text_records(path: Path, fmt: str) -> Iterator[tuple[int, bytes]]:
    try:
        with _open_binary(path) as handle:
            if fmt == "jsonl":
                yield from _numbered_lines(handle)
                return
            paragraph: list[bytes] = []
            start = 0
            for number, line in _numbered_lines(handle):
                if line.strip():
                    if not paragraph:
                        start = number
                    paragraph.append(line)
                elif paragraph:
                    yield start, b"".join(paragraph)
                    paragraph = []
            if paragraph:
                yield start, b"".join(paragraph)
    except (EOFError, OSError, zlib.error) as err:
        raise InputError(_("{path}: cannot be read to the end ({error})").format(path=path, error=err)) from err


BLOCK_BYTES = 1 << 20
"""How much of a file `iter_blocks` reads at a time (a block holds whole records, so it can be longer)."""
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")
"""The end of a line followed by a blank one (whitespace only, as `bytes.strip` sees it): a paragraph ends."""


@dataclass
class Block:
    """Whole records of a file: `data` starts at line `first_line` and ends at byte `end` of the
    (decompressed) file, before line `end_line`."""

    data: bytes
    first_line: int
    end: int
    end_line: int


def _record_end(fmt: str, data: bytes) -> int:
    """Length of the longest prefix of `data` that holds only whole records (0: none yet)."""
    if fmt == "jsonl":
        return data.rfind(b"\n") + 1
    last = deque(_BLANK_LINE.finditer(data, max(0, len(data) - (1 << 16))), maxlen=1)
    if not last:  # a long paragraph: look at the whole block
        last = deque(_BLANK_LINE.finditer(data), maxlen=1)
    return last[0].end() if last else 0


def iter_blocks(path: Path, start: int = 0, first_line: int = 1, size: int | None = None) -> Iterator[Block]:
    """The file from byte `start` (a record boundary a previous block ended at) in blocks of whole records,
    about `size` (default BLOCK_BYTES) bytes each; a record longer than that comes whole in a longer block.

    Raises InputError (naming the file) when a compressed file is corrupt or truncated, after yielding
    the whole records read before the damage.
    """
    fmt = input_format(path)
    with _open_binary(path) as handle:
        size = max(size or BLOCK_BYTES, 64)  # the byte order mark comes in the first read
        pending, offset, line, want, eof = b"", start, first_line, size, False
        try:
            if start:
                handle.seek(start)
            while True:
                parts = [pending]
                have = len(pending)
                while not eof and have < want:
                    data = handle.read1(want - have)
                    eof = not data
                    parts.append(data)
                    have += len(data)
                pending = b"".join(parts)
                if offset == 0 and pending.startswith(codecs.BOM_UTF8):  # the file's first bytes
                    pending, offset = pending[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
                if not pending:
                    return
                cut = len(pending) if eof else _record_end(fmt, pending)
                if cut == 0:  # a record longer than `size`: read on
                    want = len(pending) * 2
                    continue
                block, pending, want = pending[:cut], pending[cut:], size
                lines = block.count(b"\n")
                yield Block(block, line, offset + cut, line + lines)
                offset, line = offset + cut, line + lines
        except (EOFError, OSError, zlib.error) as err:
            pending = b"".join(parts)
            cut = _record_end(fmt, pending)
            if cut:
                yield Block(pending[:cut], line, offset + cut, line + pending[:cut].count(b"\n"))
            raise InputError(_("{path}: cannot be read to the end ({error})").format(path=path, error=err)) from err


def block_records(fmt: str, block: Block) -> list[tuple[int, bytes]]:
    """(first line number, raw bytes) of each record of `block`, as `iter_raw_records` gives them."""
    lines = block.data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if fmt == "jsonl":
        return list(enumerate(lines, start=block.first_line))
    records, paragraph, start = [], [], 0
    for number, line in enumerate(lines, start=block.first_line):
        if line.strip():
            if not paragraph:
                start = number
            paragraph.append(line)
        elif paragraph:
            records.append((start, b"\n".join(paragraph) + b"\n"))
            paragraph = []
    if paragraph:
        end = b"\n" if block.data.endswith(b"\n") else b""
        records.append((start, b"\n".join(paragraph) + end))
    return records


def lone_surrogate_field(value, name: str = "") -> str | None:
    """The name of the first string in a parsed JSON value holding a lone surrogate ("\\ud800"), else None.

    JSON's \\u escapes can spell half a surrogate pair, which is no character: such a string cannot
    be encoded as UTF-8, so the tokenizer and the shard writer would fail on it.
    """
    if isinstance(value, str):
        return None if is_utf8_text(value) else name or "value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        label = f"{name}.{key}" if isinstance(key, str) else f"{name}[{key}]"
        if isinstance(key, str) and not is_utf8_text(key):  # the key itself: name it printably
            return label.encode("utf-8", "backslashreplace").decode().lstrip(".")
        found = lone_surrogate_field(item, label)
        if found:
            return found.lstrip(".")
    return None


USED_FIELDS = {"sft": ("conversations", "messages", "instruction", "input", "output"),
               "dpo": ("prompt", "chosen", "rejected")}
"""The record fields each kind reads (pretrain: the text field; rlhf keeps every field)."""
CHAT_FIELDS = ("conversations", "messages", "instruction", "input", "output", "prompt", "chosen", "rejected",
               "reference")
"""Every field whose strings a tokenizer learns from when a record has no text field."""


def _may_hold_surrogate(text: str) -> bool:
    """Only a \\uD800-\\uDFFF escape makes a lone surrogate: text without `\\ud` needs no further check."""
    return "\\ud" in text or "\\uD" in text


def _used_lone_surrogate(kind: str, record: dict, text_field: str) -> str | None:
    """`lone_surrogate_field` of the fields a `kind` dataset uses (a broken field it ignores is harmless)."""
    if kind == "rlhf":
        return lone_surrogate_field(record)
    names = (text_field,) if kind == "pretrain" else USED_FIELDS[kind]
    return lone_surrogate_field({name: record[name] for name in names if name in record})


def _as_messages(value, default_role: str) -> list[dict] | None:
    """A string becomes one message of `default_role`; a list must be well-formed messages; else None."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        return None
    messages = []
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES \
                or not isinstance(message.get("content"), str):
            return None
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _sft_messages(record: dict) -> list[dict] | str:
    key = "conversations" if "conversations" in record else "messages"  # `messages`: Hugging Face chat sets
    if key in record:
        messages = _as_messages(record[key], "user")
        return messages if messages is not None and isinstance(record[key], list) \
            else "malformed_conversation"
    if "instruction" in record and "output" in record:
        parts = [record["instruction"], record.get("input", "")]
        if not all(isinstance(p, str) for p in parts) or not isinstance(record["output"], str):
            return "field_not_string"
        prompt = "\n\n".join(p for p in parts if p.strip())
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    return "missing_field"


def _check_responses(messages: list[dict]) -> str | None:
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        return "no_assistant_turn"
    if any(not m["content"].strip() for m in assistant):
        return "empty_response"
    return None


class JSONLineError(ValueError):
    """One JSONL line that is not JSON: `problem` says why (the parser's message), `too_deep` when it nests
    deeper than the parser can follow."""

    def __init__(self, problem: str, too_deep: bool = False):
        super().__init__(problem)
        self.problem, self.too_deep = problem, too_deep


def parse_json_line(text: str) -> Any:
    """The JSON value of one line of a JSONL file: the one place a line is parsed, for the dataset builder
    (which skips and counts a bad line) and for `records.json_lines` (which refuses the file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise JSONLineError(err.msg) from None
    except RecursionError:
        raise JSONLineError(_("nested too deeply"), too_deep=True) from None


def parse_record(kind: str, fmt: str, line: int, raw: bytes | dict, text_field: str = "text") -> Example | Skip:
    """Decode and validate one raw record for a dataset of `kind` ('pretrain', 'sft', 'dpo', 'rlhf').

    A Parquet row arrives as a dict and is validated as the JSON object of a JSONL line is.
    """
    if isinstance(raw, dict):
        return _parse_object(kind, line, raw, text_field)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Skip(line, "not_utf8", _("byte {offset}").format(offset=err.start))
    if fmt == "txt":
        text = text.rstrip("\r\n")
        if kind != "pretrain":
            return Skip(line, "not_jsonl", _("{kind} data must be JSONL").format(kind=kind))
        return Example(line, text=text) if text.strip() else Skip(line, "empty_document")
    if not text.strip():
        return Skip(line, "empty_line")
    try:
        record = parse_json_line(text)
    except JSONLineError as err:
        return Skip(line, "malformed_json", err.problem)
    if not isinstance(record, dict):
        return Skip(line, "not_an_object")
    bad_field = _may_hold_surrogate(text) and _used_lone_surrogate(kind, record, text_field)
    if bad_field:
        return Skip(line, "lone_surrogate", _("field {name}").format(name=bad_field))
    return _parse_object(kind, line, record, text_field)


def _parse_object(kind: str, line: int, record: dict, text_field: str) -> Example | Skip:
    if kind == "pretrain":
        return _parse_pretrain(line, record, text_field)
    if kind == "sft":
        messages = _sft_messages(record)
        if isinstance(messages, str):
            return Skip(line, messages)
        problem = _check_responses(messages)
        return Skip(line, problem) if problem else Example(line, messages=messages)
    if kind == "dpo":
        return _parse_dpo(line, record)
    return _parse_rlhf(line, record)


def pretrain_texts(fmt: str, records: list[tuple[int, bytes]], text_field: str = "text"
                   ) -> tuple[list[int], list[str], list[Skip]]:
    """`parse_record` of each pretraining record, as (lines, texts) of the usable ones and the Skips.

    The common JSONL record (an object whose text field is a non-empty string) is parsed with orjson,
    ~3x faster than json; anything else goes through `parse_record`, so the outcome is the same record
    for record. (orjson refuses every lone surrogate, which `parse_record` then finds and names.)
    """
    lines, texts, skips = [], [], []
    for line, raw in records:
        if fmt == "jsonl":
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                record = None
            if type(record) is dict:
                value = record.get(text_field)
                if type(value) is str and value.strip():
                    lines.append(line)
                    texts.append(value)
                    continue
        parsed = parse_record("pretrain", fmt, line, raw, text_field)
        if isinstance(parsed, Skip):
            skips.append(parsed)
        else:
            lines.append(line)
            texts.append(parsed.text)
    return lines, texts, skips


def _parse_pretrain(line: int, record: dict, text_field: str) -> Example | Skip:
    if text_field not in record:
        return Skip(line, "missing_field", text_field)
    value = record[text_field]
    if not isinstance(value, str):
        return Skip(line, "field_not_string", text_field)
    return Example(line, text=value) if value.strip() else Skip(line, "empty_document")


def _parse_dpo(line: int, record: dict) -> Example | Skip:
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in record]
    if missing:
        return Skip(line, "missing_field", ",".join(missing))
    prompt = _as_messages(record["prompt"], "user")
    chosen = _as_messages(record["chosen"], "assistant")
    rejected = _as_messages(record["rejected"], "assistant")
    if prompt is None or chosen is None or rejected is None:
        return Skip(line, "malformed_conversation")
    if not any(m["content"].strip() for m in prompt):
        return Skip(line, "empty_prompt")
    for response in (chosen, rejected):
        problem = _check_responses(response)
        if problem:
            return Skip(line, problem)
    if chosen == rejected:
        return Skip(line, "chosen_equals_rejected")
    return Example(line, prompt_messages=prompt, chosen=chosen, rejected=rejected)


def _parse_rlhf(line: int, record: dict) -> Example | Skip:
    if "prompt" not in record:
        return Skip(line, "missing_field", "prompt")
    prompt = _as_messages(record["prompt"], "user")
    if prompt is None:
        return Skip(line, "malformed_conversation")
    if not any(m["content"].strip() for m in prompt):
        return Skip(line, "empty_prompt")
    reference = record.get("reference")
    if reference is not None and not isinstance(reference, str):
        return Skip(line, "field_not_string", "reference")
    extra = {key: value for key, value in record.items() if key != "prompt"}
    extra["reference"] = reference
    return Example(line, prompt_messages=prompt, extra=extra)


def training_texts(fmt: str, raw: bytes | dict, text_field: str = "text") -> list[str]:
    """The strings a tokenizer should learn from in one raw record (any kind); [] when unusable.

    JSONL records and Parquet rows give `text_field` when present, otherwise every string of the chat
    fields (conversations or messages, instruction/input/output, prompt/chosen/rejected/reference).
    """
    if isinstance(raw, dict):
        texts = [raw[text_field]] if isinstance(raw.get(text_field), str) else _chat_texts(raw)
        return [t for t in texts if t.strip()]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return []
    if fmt == "txt":
        return [text.rstrip("\r\n")] if text.strip() else []
    try:
        record = parse_json_line(text) if text.strip() else None
    except JSONLineError:
        return []
    if not isinstance(record, dict):
        return []
    texts = [record[text_field]] if isinstance(record.get(text_field), str) else _chat_texts(record)
    if _may_hold_surrogate(text):  # a string with a lone surrogate cannot be trained on; the others can
        texts = [t for t in texts if is_utf8_text(t)]
    return [t for t in texts if t.strip()]


def cut_long_text(text: str, max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """`text` in pieces of at most `max_chars` characters, each cut just after its last newline
    (mid-line only for a line longer than `max_chars`); the pieces join back to `text`.

    A corpus of one huge document (a book as one .txt paragraph) then still splits into train and
    validation by piece, instead of sending everything to one side.
    """
    pieces = []
    while len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars) + 1 or max_chars
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + [text]


def _chat_texts(record: dict) -> list[str]:
    """Every string of a record's chat fields (SFT, DPO and RLHF layouts alike)."""
    texts: list[str] = []
    for key in CHAT_FIELDS:
        value = record.get(key)
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            texts += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return texts
