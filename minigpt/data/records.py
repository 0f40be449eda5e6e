"""Reading record files a user hands over whole (evaluation items, task files, training prompts to exclude):
JSONL and CSV, every problem a `RecordError` that names the file, the line and, where there is one, the field.

Unlike the dataset builder (`sources.py`, which skips and counts bad records of a corpus), these readers refuse
a file with a bad record: an evaluation that silently left items out would report a wrong score.
"""

from __future__ import annotations

import codecs
import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minigpt.data.sources import JSONLineError, lone_surrogate_field, parse_json_line
from minigpt.i18n import _

MAX_CSV_FIELD_CHARS = 131_072
"""The csv module's default field limit: a longer field is most likely an unclosed quote swallowing lines."""


class RecordError(ValueError):
    """A record file that cannot be used: missing, not UTF-8, malformed, or a record without a needed field."""


def decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file, a byte-order mark skipped. Bytes that are not UTF-8
    become lone surrogates (`surrogateescape`), so the caller can name the field that holds them."""
    if not path.is_file():
        raise RecordError(_("{path}: no such file").format(path=path))
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            yield number, raw.decode("utf-8", "surrogateescape")


def _bad_byte(text: str) -> str | None:
    """'byte 0xff at column 17' for the first byte of `text` that was not UTF-8, else None."""
    for column, char in enumerate(text, start=1):
        if "\udc80" <= char <= "\udcff":
            return _("byte 0x{byte:02x} at column {column}").format(byte=ord(char) - 0xDC00, column=column)
    return None


def check_text_fields(where: str, record: Any) -> None:
    """Refuse a record holding a string that is not UTF-8 text (a raw non-UTF-8 byte or a JSON escape of half a
    surrogate pair): no tokenizer can encode it. `where` is "FILE:LINE"."""
    try:
        field = lone_surrogate_field(record)
    except RecursionError:
        raise RecordError(_("{where}: nested too deeply to read").format(where=where)) from None
    if field:
        raise RecordError(_("{where}: field {field!r} is not valid UTF-8 text").format(where=where, field=field))


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a UTF-8 JSONL file."""
    for number, line in decoded_lines(path):
        if not line.strip():
            continue
        try:
            value = parse_json_line(line)
        except JSONLineError as err:
            if err.too_deep:
                raise RecordError(_("{path}:{line}: JSON nested too deeply to read").format(
                    path=path, line=number)) from None
            problem = _bad_byte(line)
            message = (_("{path}:{line}: not valid UTF-8 ({problem})") if problem
                       else _("{path}:{line}: not valid JSON ({problem})"))
            raise RecordError(message.format(path=path, line=number, problem=problem or err.problem)) from None
        if "\\u" in line or _bad_byte(line):
            check_text_fields(f"{path}:{number}", value)
        yield number, value


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a UTF-8 JSONL file; a line that is not a JSON object
    is a RecordError naming the file and line."""
    for number, value in json_lines(path):
        if not isinstance(value, dict):
            raise RecordError(_("{path}:{line}: expected a JSON object").format(path=path, line=number))
        yield number, value


def csv_records(path: Path) -> list[tuple[int, dict]]:
    """(first line number, row) of every row of a UTF-8 CSV file with a header line, as a dict by column name.

    A field longer than MAX_CSV_FIELD_CHARS or holding bytes that are not UTF-8 is a RecordError naming the
    file, line and column."""
    reader = csv.DictReader(text for _number, text in decoded_lines(path))
    previous_limit = csv.field_size_limit(sys.maxsize)  # measured by _check_row instead, to name the column
    rows = []
    try:
        check_text_fields(f"{path}:1", {"header": reader.fieldnames or []})
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                return rows
            _check_row(f"{path}:{start}", row)
            rows.append((start, row))
    except csv.Error as err:
        raise RecordError(_("{path}:{line}: not valid CSV ({error})").format(path=path, line=reader.line_num,
                                                                              error=err)) from None
    finally:
        csv.field_size_limit(previous_limit)


def _check_row(where: str, row: dict) -> None:
    for name, value in row.items():
        if isinstance(value, str) and len(value) > MAX_CSV_FIELD_CHARS:
            raise RecordError(_("{where}: field {name!r} is {length:,} characters long (at most {limit:,}; an "
                                "unclosed quote makes one field of the lines after it)").format(
                where=where, name=name, length=len(value), limit=MAX_CSV_FIELD_CHARS))
    check_text_fields(where, {str(name): value for name, value in row.items()})
