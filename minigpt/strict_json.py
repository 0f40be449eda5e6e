"""JSON read from files a crash, a full disk or another person may have damaged: bounded, finite, flat enough.

`json.loads` accepts `NaN`/`Infinity`, numbers that overflow to infinity, and nesting deep enough to raise
`RecursionError`; read whole, a multi-gigabyte file fills memory. `read_json` refuses all of these with a
`JSONFileError` naming the file and the reason, so a caller can skip the file instead of crashing on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class JSONFileError(ValueError):
    """A JSON file that is missing, too large, not UTF-8, not JSON, or holds a non-finite number."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} overflows to {value}")
    return value


def loads(text: str, source: str) -> Any:
    """Parse `text` (from `source`, for messages) as strict JSON: finite numbers only."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise JSONFileError(f"{source}: nested too deeply to be a file this program wrote") from None
    except (ValueError, OverflowError) as err:
        raise JSONFileError(f"{source}: not valid JSON ({str(err)[:200]})") from None


def read_json(path: str | Path, max_bytes: int) -> Any:
    """The JSON value in `path`, read only if it is at most `max_bytes` long (see the module docstring)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise JSONFileError(f"{path}: missing") from None
    except OSError as err:
        raise JSONFileError(f"{path}: cannot be read ({err.strerror or err})") from None
    if len(data) > max_bytes:
        raise JSONFileError(f"{path}: larger than {max_bytes:,} bytes, too large to be a file this program "
                            "wrote")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONFileError(f"{path}: not UTF-8 text") from None
    return loads(text, str(path))
