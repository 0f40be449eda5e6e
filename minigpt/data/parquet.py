"""Parquet input files, read with pyarrow one batch at a time (an optional extra: `pip install -e ".[parquet]"`).

Each row becomes the same dict a JSONL line parses to, so validation and skip counting are shared
with JSONL: a column is a field, a null cell is a missing field, a list of structs with `role` and
`content` is a conversation. Only the columns a dataset kind uses are read (Parquet is columnar:
the others are never decoded), and rows are numbered from 1, like lines. Only `minigpt.data.sources`
imports this module, and only for a Parquet file: the core never needs pyarrow.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from minigpt.i18n import _

BATCH_ROWS = 1024
"""Rows per batch read from a row group: a batch's strings are all that is decoded at a time."""


class ParquetReadError(ValueError):
    """A file that is not Parquet, is truncated, or has a corrupt row group (the message names the file)."""


def _json_type(kind: pa.DataType) -> bool:
    """Whether values of this Arrow type become JSON values (strings, numbers, booleans, lists, structs)."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_boolean(kind) \
            or pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind):
        return True
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _json_type(kind.value_type)
    if pa.types.is_struct(kind):
        return all(_json_type(kind.field(i).type) for i in range(kind.num_fields))
    return False


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ParquetReadError(_("{path}: not a readable Parquet file ({error})").format(path=path, error=err)) \
            from err


def iter_rows(path: Path, columns: list[str] | None = None, first_row: int = 1) -> Iterator[tuple[int, dict]]:
    """(row number from 1, row as a dict) of every row from `first_row` on, reading `columns` only (None: every
    column whose values are JSON-like); a null cell is left out of its row's dict. Streams one row group at a
    time, in batches of BATCH_ROWS rows, so a corrupt row group is reported by its first row. Row groups before
    `first_row` are passed over by their row counts, unread, and rows before it are never made into dicts (a
    resumed build starts there).
    """
    parquet = _open(path)
    schema = parquet.schema_arrow
    if columns is None:
        wanted = [f.name for f in schema if _json_type(f.type)]
    else:
        wanted = [name for name in dict.fromkeys(columns) if name in schema.names]
    number = 0
    try:
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if number + rows < first_row:  # wholly before the first row wanted
                number += rows
                continue
            if not wanted:  # none of the fields this kind reads: every row is a record missing them
                for _row in range(rows):
                    number += 1
                    if number >= first_row:
                        yield number, {}
                continue
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=wanted,
                                              use_threads=False):
                skip = min(batch.num_rows, max(0, first_row - 1 - number))
                number += skip
                for row in batch.slice(skip).to_pylist():
                    number += 1
                    yield number, {key: value for key, value in row.items() if value is not None}
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ParquetReadError(_("{path}: row {row} and after cannot be read ({error})").format(
            path=path, row=number + 1, error=err)) from err
